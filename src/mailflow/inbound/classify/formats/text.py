"""Inbound room, classification: find the bounced recipients and their diagnostics in the
prose of MTAs that write no RFC 3464 fields (qmail, exim, sendmail transcripts, Gmail, ...),
and where the quoted original message starts."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from mailflow.inbound.classify.formats.fields import ADDRESS, canonical

_MARKERS = re.compile(
    r"^[ \t>]*(?:"
    r"-{2,}.*(?:original|copy of|below this line|returned message|undelivered message|header|included|unsent|"
    r"rfc822|message text|attached|forwarded).*"
    r"|[=_*]{5,}.*(?:original|copy|header).*"
    r"|(?:original message|original message headers?|message headers follow|the original message headers?|"
    r"the header of the original message|included is a copy|the original message follows)\s*(?:is )?(?:follows?|below)?\s*:?\s*"
    r"|content-type:\s*message/rfc822.*"
    r"|below (?:this line )?is a copy of the message.*"
    r"|a copy of the original message (?:below|follows).*"
    r"|your message (?:reads|headers?)(?: \(in part\))?:.*"
    r")$",
    re.IGNORECASE,
)
_MAX_FOUND = 100  # addresses in a report's prose worth reading as recipients
_LONGEST_MARKER = 300  # longer lines are text, not a separator (and would make the pattern slow)
_HEADER = re.compile(
    r"^(?:Return-Path|Received|Message-I[dD]|Date|MIME-Version|From|To|Subject|X-[\w-]+|DKIM-Signature):\s",
    re.IGNORECASE,
)
_STRONG = re.compile(r"^(?:Return-Path|Received|Message-I[dD]|MIME-Version|DKIM-Signature):\s", re.IGNORECASE)
_NOT_RECIPIENT = re.compile(
    r"(?:mail from|from:|return-path|reply-to|sender:|envelope-from|errors-to|postmaster|\bsent by\b|"
    r"please (?:contact|send|include)|for (?:further )?assistance|helo|ehlo|\bfrom\s+$|\bF=\[$)",
    re.IGNORECASE,
)
_QUOTED_HEADER = re.compile(r"^\s*(?:To|Cc|From|Sent|Date|Subject|Reply-To)\s*:", re.IGNORECASE)
_DAEMON_LOCAL = re.compile(
    r"^(?:mailer-daemon|postmaster|mail-daemon|mmdf|root|abuse|noreply|no-reply|bounce[s]?)$", re.I
)
_TEMPORARY = re.compile(r"retry timeout exceeded|temporary failure|still (?:trying|being retried)", re.IGNORECASE)
_ERRORLINE = re.compile(r"(?<![\d.])[45]\d\d(?:[ -]|$)|\b[45]\.\d{1,3}\.\d{1,3}\b|#[45]\.\d")
_HOST = re.compile(r"\b(?:remote )?host:?\s+([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)\.?\s*(?:[\[(]|said)", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")


@dataclass(frozen=True)
class Found:
    """What one reader found about a recipient, before reasons.py has judged it."""

    address: str
    status: str = ""
    diagnostic: str = ""
    remote_mta: str = ""
    action: str = "failed"
    reason: str = ""  # when the format itself says why (a complaint in a provider's notice)


def strip_html(text: str) -> str:
    text = re.sub(r"(?i)<br\s*/?>|</p>|</div>|</tr>", "\n", text)
    return html.unescape(_TAG.sub(" ", text))


def cut_original(prose: str) -> tuple[str, str]:
    """(the report's own text, the quoted original message's text or ''): cut at the first
    marker line, or at the first block of header lines, whichever comes first."""
    lines = prose.splitlines(keepends=True)
    cut, skip = len(prose), 0
    pos = 0
    for i, line in enumerate(lines):
        stripped = line.lstrip(" \t>")
        if len(line) <= _LONGEST_MARKER and _MARKERS.match(line.rstrip("\r\n")):
            cut, skip = pos, len(line)
            break
        if (
            _STRONG.match(stripped)
            and i + 1 < len(lines)
            and (_HEADER.match(lines[i + 1].lstrip(" \t>")) or lines[i + 1][:1] in " \t")
        ):
            cut = pos
            break
        pos += len(line)
    own = prose[:cut]
    rest = prose[cut + skip :]
    quoted = "\n".join(
        line.lstrip(" \t>") if _HEADER.match(line.lstrip(" \t>")) else line for line in rest.lstrip("\r\n").splitlines()
    )
    return own, quoted


def temporary(notes: str) -> bool:
    return bool(_TEMPORARY.search(notes[:3000]))


def first_error(notes: str) -> str:
    for line in notes.splitlines():
        if _ERRORLINE.search(line):
            return line.strip()
    return ""


def _candidates(notes: str, exclude: set[str]) -> list[tuple[str, int]]:
    """Addresses of the report's text in order, with the line each first appears on."""
    seen: dict[str, int] = {}
    for i, line in enumerate(notes.splitlines()):
        for m in ADDRESS.finditer(line):
            address = canonical(m.group(0))
            local = address.split("@", 1)[0]
            if address in exclude or address in seen or _DAEMON_LOCAL.match(local) or "/" in local:
                continue
            before = line[: m.start()]
            if _NOT_RECIPIENT.search(before[-40:]):
                exclude = exclude | {address}  # a sender here is a sender everywhere
                continue
            if _QUOTED_HEADER.match(line):
                continue
            if "message-id" in before.lower():
                continue
            seen[address] = i
    return list(seen.items())


def near(address: str, notes: str, stop_lines: frozenset[int] = frozenset(), start: int | None = None) -> str:
    """The diagnostic around an address: its line (`start`, else the first it is on) and what
    follows, to the end of that paragraph."""
    lines = notes.splitlines()
    if start is None:
        start = next((i for i, line in enumerate(lines) if address in line.lower()), None)
    if start is None or start >= len(lines):
        return ""
    out = [lines[start]]
    for j in range(start + 1, min(len(lines), start + 12)):
        if j in stop_lines:
            break
        line = lines[j]
        if not line.strip():
            last = out[-1].strip()
            if (len(out) > 1 or len(last) > len(address) + 6) and not last.endswith(":") and not _intro(lines, j):
                break
            continue
        out.append(line)
    return "\n".join(out)


def _intro(lines: list[str], blank: int) -> bool:
    """The next paragraph after a blank line only announces what follows ('... response:')."""
    following = next((line.strip() for line in lines[blank + 1 : blank + 4] if line.strip()), "")
    return following.endswith(":") and len(following) < 80


def before(address: str, notes: str, count: int = 3) -> str:
    """The lines just before an address's first line (some MTAs give the reason first)."""
    lines = notes.splitlines()
    start = next((i for i, line in enumerate(lines) if address in line.lower()), None)
    if start is None:
        return ""
    return "\n".join(line for line in lines[max(0, start - count) : start] if line.strip())


def transcript_for(diagnostic: str, notes: str) -> str:
    """The transcript lines that led to a diagnostic: the SMTP command it answered."""
    words = re.sub(r"^\s*[\w-]+\s*;\s*", "", diagnostic)[:40].strip()
    if len(words) < 8:
        return ""
    lines = notes.splitlines()
    return "\n".join("\n".join(lines[max(0, i - 2) : i + 1]) for i, line in enumerate(lines) if words in line)


def recipients(notes: str, exclude: set[str]) -> list[Found]:
    found = _candidates(notes, exclude)[:_MAX_FOUND]
    stops = frozenset(i for _, i in found)
    out = []
    for address, line in found:
        diagnostic = near(address, notes, stops - {line}, line)
        if not _ERRORLINE.search(diagnostic) and len(found) == 1:
            diagnostic = (diagnostic + "\n" + first_error(notes)).strip()
        host = _HOST.search(diagnostic)
        out.append(Found(address=address, diagnostic=diagnostic, remote_mta=host.group(1).lower() if host else ""))
    return out
