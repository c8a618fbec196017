"""Inbound room, classification: why a recipient bounced (a reason in sisimai's vocabulary) and
whether to stop sending to it, as pure functions of the status, the reply code and the text.

The text decides first, because servers put generic codes on specific failures (a full
mailbox answered with 5.1.1, an unknown user with 5.7.1); the enhanced status code decides
when no pattern matches, then the reply code. The patterns live in wording.py; the SMTP
command a refusal answered (from the report's transcript) decides whether "unknown user"
means the address (RCPT TO), the sender (MAIL FROM, `rejected`) or a filter (`filtered`).
"""

from __future__ import annotations

import functools
import re

from mailflow.inbound.classify.wording import DEFINITE_UNKNOWN, TEXT, WEAK
from mailflow.mail.status import find_enhanced

# Reasons that mean the address itself is bad: sending again cannot succeed.
_HARD = frozenset({"userunknown", "hostunknown", "hasmoved"})


# Enhanced status code (subject, detail) -> reason, when the text says nothing we know.
_STATUS: dict[tuple[int, int], str] = {
    (1, 0): "userunknown",
    (1, 1): "userunknown",
    (1, 2): "hostunknown",
    (1, 3): "userunknown",
    (1, 4): "userunknown",
    (1, 6): "hasmoved",
    (1, 7): "rejected",
    (1, 8): "rejected",
    (1, 10): "notaccept",
    (2, 1): "suspend",
    (2, 2): "mailboxfull",
    (2, 3): "exceedlimit",
    (2, 4): "systemerror",
    (3, 1): "systemfull",
    (3, 2): "notaccept",
    (3, 3): "systemerror",
    (3, 4): "mesgtoobig",
    (3, 5): "systemerror",
    (4, 0): "networkerror",
    (4, 1): "networkerror",
    (4, 2): "networkerror",
    (4, 3): "systemerror",
    (4, 4): "networkerror",
    (4, 5): "systemfull",
    (4, 6): "networkerror",
    (4, 7): "expired",
    (5, 0): "syntaxerror",
    (5, 1): "syntaxerror",
    (5, 2): "syntaxerror",
    (5, 3): "toomanyconn",
    (5, 4): "syntaxerror",
    (5, 5): "syntaxerror",
    (6, 0): "contenterror",
    (6, 1): "contenterror",
    (6, 2): "contenterror",
    (6, 3): "contenterror",
    (6, 4): "contenterror",
    (6, 5): "contenterror",
    (7, 0): "blocked",
    (7, 1): "blocked",
    (7, 2): "blocked",
    (7, 4): "securityerror",
    (7, 5): "securityerror",
    (7, 6): "securityerror",
    (7, 7): "securityerror",
    (7, 8): "securityerror",
    (7, 9): "policyviolation",
    (7, 13): "suspend",
    (7, 23): "authfailure",
    (7, 24): "authfailure",
    (7, 25): "requireptr",
    (7, 26): "authfailure",
    (7, 27): "notaccept",
}

# Reason -> the detail of the status code reported when a bounce carries none (x.0.9NN),
# the convention the reference parser's verdicts follow.
PSEUDO_DETAIL: dict[str, int] = {
    "undefined": 900,
    "onhold": 901,
    "filtered": 910,
    "userunknown": 911,
    "hostunknown": 912,
    "rejected": 918,
    "suspend": 921,
    "mailboxfull": 922,
    "systemerror": 930,
    "notaccept": 932,
    "mesgtoobig": 934,
    "mailererror": 939,
    "networkerror": 944,
    "expired": 947,
    "blocked": 971,
    "requireptr": 973,
    "failedstarttls": 976,
    "spamdetected": 980,
}


def from_text(text: str) -> str:
    """The reason the words of a diagnostic give, or '' when none of ours matches."""
    found = matching(text)
    return found[0] if found else ""


def matching(text: str) -> tuple[str, ...]:
    """Every reason whose words appear in the text (its first 4,000 characters: the report,
    not a quoted message), most specific first."""
    if not text:
        return ()
    return _matching(text[:4000])


@functools.lru_cache(maxsize=1024)
def _matching(text: str) -> tuple[str, ...]:
    return tuple(name for name, pattern in TEXT if pattern.search(text))


# Codes servers put on failures of every kind: they do not choose between text reasons.
_GENERIC = frozenset({(6, 1), (4, 1), (4, 2), (1, 0), (0, 0), (7, 0), (7, 1), (5, 0), (5, 1), (5, 2), (4, 0)})


def from_status(status: str) -> str:
    """The reason an enhanced status code gives on its own, or ''."""
    code = find_enhanced(status)
    if code is None:
        return ""
    if code.klass == 2:
        return "delivered"
    return _STATUS.get((code.subject, code.detail), "")


# What the report says about the SMTP command a failure answered: a transcript or an MTA
# naming the command outright, and words that only imply it ("Recipient address rejected"
# is what servers usually answer to RCPT TO, but a filter may say it after DATA).
_COMMANDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("CONN", re.compile(r"after initial connection|in reply to (?:the )?greeting|greeting (?:wait|reply)", re.I)),
    ("MAIL", re.compile(r"after MAIL FROM|in reply to MAIL FROM|>>> MAIL From", re.IGNORECASE)),
    (
        "RCPT",
        re.compile(
            r"after RCPT(?: TO| command)|in reply to RCPT TO|>>> RCPT To|RCPT TO response|"
            r"RCPT TO:<[^>]*>\s*(?:<<<\s*)?[45]\d\d",
            re.IGNORECASE,
        ),
    ),
    (
        "DATA",
        re.compile(
            r"after (?:end of )?data|in reply to (?:end of )?data|>>> DATA\s*\n\s*<<< [45]|for TEXT command", re.I
        ),
    ),
)
_IMPLIED: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("MAIL", re.compile(r"sender was rejected", re.IGNORECASE)),
    ("RCPT", re.compile(r"does not like recipient|recipient address rejected", re.IGNORECASE)),
)


def command(transcript: str) -> str:
    """The SMTP command a failure answered ('CONN' for the greeting, 'MAIL', 'RCPT', 'DATA'
    or ''): the first the report names outright, else the first its words imply."""
    for table in (_COMMANDS, _IMPLIED):
        best, where = "", len(transcript) + 1
        for name, pattern in table:
            m = pattern.search(transcript)
            if m and m.start() < where:
                best, where = name, m.start()
        if best:
            return best
    return ""


def reason(
    status: str,
    reply_code: str,
    diagnostic: str,
    action: str = "failed",
    transcript: str = "",
    address: str = "",
) -> str:
    """Why a recipient bounced, in sisimai's vocabulary ('undefined' when nothing says).

    `transcript` is the report's text around the diagnostic. "Unknown user" is believed when
    the status code blames the address or the refusal answered RCPT TO. Otherwise: refused at
    MAIL FROM, the sender was refused (`rejected`); under a mailbox or policy status (5.2.x,
    5.7.x), answered to DATA with a generic 5.0.0, or under a generic x.0.0 without naming
    the `address` it refuses, a filter was speaking (`filtered`). A
    permanent refusal of the greeting that gives no reason refuses the client (`blocked`)."""
    found = _reason(status, reply_code, diagnostic, action)
    said = command(transcript or diagnostic)
    definite = found == "userunknown" and bool(DEFINITE_UNKNOWN.search(diagnostic))
    if found == "userunknown" and said == "MAIL" and not definite:
        return "rejected"  # whatever the code says, MAIL FROM names only the sender
    if found == "userunknown" and not definite and said != "RCPT" and from_status(status) != "userunknown":
        code = find_enhanced(status)
        if said == "MAIL":
            return "rejected"
        if code is not None and (code.subject, code.detail) == (2, 1):
            return "suspend"  # 5.2.1: the mailbox exists but is disabled
        if code is not None and (code.subject in (2, 7) or (said == "DATA" and code.subject == 0)):
            return "filtered"
        if code is not None and (code.subject, code.detail) == (0, 0) and address and address not in diagnostic.lower():
            return "filtered"  # a generic refusal that does not even name the address it refuses
    if said == "MAIL" and found in ("hostunknown", "undefined", "syntaxerror"):
        return "rejected"
    if said == "CONN" and found == "undefined" and reply_code.startswith("5"):
        return "blocked"  # refused at the greeting, before the client said anything: the host
    return found


def _reason(status: str, reply_code: str, diagnostic: str, action: str) -> str:
    action = action.lower()
    if action == "delivered" or (status.startswith("2.") and action != "delayed"):
        return "delivered"
    found = matching(diagnostic)
    code = find_enhanced(status)
    if code is not None and (code.subject, code.detail) == (4, 7) and action != "delivered":
        return "expired"
    if found and code is not None and (code.subject, code.detail) not in _GENERIC:
        hint = _STATUS.get((code.subject, code.detail), "")
        if hint in found:
            return hint
    if found:
        return found[0]
    if action == "delayed":
        return "expired"
    by_status = from_status(status)
    if by_status:
        return by_status
    weak = next((name for name, pattern in WEAK if pattern.search(diagnostic)), "")
    if weak:
        return weak
    if reply_code.startswith("4"):
        return "onhold"
    return "undefined"


def hard(reason: str, status: str, reply_code: str) -> bool:
    """Whether to stop sending to the address (sisimai's hardbounce): only when the reason
    says the address itself is bad, and for a domain that accepts no mail, only when the
    failure was permanent."""
    if reason in _HARD:
        return True
    if reason == "notaccept":
        return status.startswith("5") or reply_code.startswith("5")
    return False


def pseudo_status(reason: str, temporary: bool, answered: str = "") -> str:
    """The status to report for a bounce that carries no enhanced status code. A refusal
    answered to MAIL FROM says nothing about the recipient, so whatever its words it gets the
    placeholder of a failure held for the sender's side (x.0.901), not the reason's own; an
    expired message keeps its own, since time, not that answer, ended it."""
    refused_sender = answered == "MAIL" and reason != "expired"
    detail = PSEUDO_DETAIL["onhold"] if refused_sender else PSEUDO_DETAIL.get(reason)
    if detail is None:
        return ""
    return f"{4 if temporary else 5}.0.{detail}"
