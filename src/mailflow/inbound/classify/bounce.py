"""Inbound room, classification: read a bounce - an RFC 3464 delivery status notification or
the plain-text report of an MTA that writes none - into its recipients and the original message.

`parse()` is pure and never raises. The recipients come from the first reader that finds
any: the message/delivery-status fields; an SES JSON notice (formats/sesjson.py); DSN fields
written into the text; the MTA's prose (formats/text.py); the original's To as a last
resort; a bounce attached to a forward; and a second report saved after the first in the same
file (an mbox of two). A mailing list refusing a post from a non-member is a bounce of that
post. reasons.py says why each one bounced and whether the address is dead. The original message comes from message/rfc822, text/rfc822-headers, or
the headers quoted after the report's text. Sizes are bounded, so hostile input stays cheap.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

from mailflow.inbound.classify import reasons
from mailflow.inbound.classify.autoreply import is_list_mail
from mailflow.inbound.classify.formats import providers, sesjson
from mailflow.inbound.classify.formats import text as textformat
from mailflow.inbound.classify.formats.fields import (
    ADDRESS,
    canonical,
    decode_header,
    diagnostic_parts,
    field_blocks,
    part_text,
)
from mailflow.inbound.classify.model import Original, Recipient
from mailflow.mail.status import enhanced_code

# Bounds that keep a hostile or broken message cheap: a report's own text is short, and no
# real bounce names thousands of recipients.
_MAX_PROSE = 200_000
_MAX_NOTES = 20_000
_MAX_RECIPIENTS = 500


@dataclass(frozen=True)
class Bounce:
    recipients: tuple[Recipient, ...]
    original: Original


_DAEMON = re.compile(
    r"mailer[- ]?daemon|post_?master|mail delivery|sysadmin|ndr administrator|mdaemon|mail ?administrator|mailadmin|"
    r"^(?:root|mail|smtp|daemon|mta|bounces?|nobody|noreply|no-reply|qmail|internet mail delivery|"
    r"mail system|mail ?delivery ?system|mail_delivery)\b",
    re.IGNORECASE,
)
_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (?:status|failure|failed|notification|report|problem|has failed)|"
    r"failure notice|returned mail|returned to sender|non[- ]?delivery|could not be delivered|"
    r"mail delivery failed|delivery unsuccessful|mail system error|not delivered|"
    r"rejected|bounce|nondeliverable|undeliverable|permanent error|warning: could not|"
    r"message you sent|failed delivery|delivery notification|notice of|error sending|"
    r"mail failure|delivery error|unable to deliver|message not sent|returned|failure|"
    r"\bdsn\b|mail could not|cannot be delivered|delayed|problem with|sicherheitssystem|"
    r"zustellung|fehlgeschlagen|unzustellbar|non recapitabile|non remis|echec|no entregado",
    re.IGNORECASE,
)
_ANSWER = re.compile(r"\s*(?:re|aw|sv|antw)\s*:", re.IGNORECASE)
_EVIDENCE = re.compile(
    r"(?<![\d.])[45]\d\d[ -]|\b[45]\.\d{1,3}\.\d{1,3}\b|could not be delivered|undeliver|"
    r"delivery (?:has |to the following .{0,40})?failed|failed permanently|permanent (?:error|failure)|"
    r"returned to (?:the )?sender|following (?:address|recipient)|unable to deliver|not delivered",
    re.IGNORECASE,
)
_AUTO_REPLY = re.compile(
    r"out of (?:the )?office|auto(?:matic)?[- ]?(?:reply|respons|antwort)|abwesenheit|vacation|away from",
    re.IGNORECASE,
)
# A mailing list manager refusing a post because its sender is not subscribed: the post
# bounced, and the list is the address that refused it.
_NOT_A_MEMBER = re.compile(r"\bnot (?:a )?member\b|\bnon-?member\b", re.IGNORECASE)


def parse(msg: Message) -> Bounce | None:
    """The bounce `msg` is, or None when it is not one. Never raises."""
    try:
        return _parse(msg)
    except Exception:  # noqa: BLE001 - malformed mail must never stop the pipeline
        return None


def parse_bytes(raw: bytes) -> Bounce | None:
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception:  # noqa: BLE001
        return None
    return parse(msg)


def _attached(msg: Message) -> Message | None:
    """The first attached message: a bounce forwarded as an attachment is read inside it."""
    for part in _walk(msg):
        if part.get_content_type() in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return inner[0]
    return None


def _parse(msg: Message, depth: int = 0) -> Bounce | None:
    dsn_text, notes, prose, original = _split(msg)
    sender = decode_header(msg.get("From", ""))
    subject = decode_header(msg.get("Subject", ""))
    daemon = bool(_DAEMON.search(sender) or _DAEMON.search(_local(sender)))
    # A subject alone is weak evidence ("Re: Problem with my order" is a person): it counts
    # only when it is not an answer and the text reads like a delivery report.
    worded = bool(_SUBJECT.search(subject)) and not _ANSWER.match(subject) and bool(_EVIDENCE.search(notes[:20_000]))
    refused_post = is_list_mail(msg) and bool(_NOT_A_MEMBER.search(subject) or _NOT_A_MEMBER.search(notes[:2000]))
    if not (dsn_text or daemon or worded or refused_post):
        return None
    # An answer titled as automatic is one, unless it reads like a delivery report: a
    # no-reply sender's "AutoResponse: this inbox is no longer in use" is not a bounce.
    if not dsn_text and _AUTO_REPLY.search(subject) and not (daemon and _EVIDENCE.search(notes[:20_000])):
        return None
    mine = {a for a in (_addr(original.sender), _addr(original.return_path)) if a}
    recipients: list[Recipient] = []
    if dsn_text:
        recipients = _from_dsn(dsn_text, notes)
    if not recipients:
        recipients = [_finish(r, "") for r in sesjson.recipients(prose)]
    if not recipients and "recipient:" in prose.lower():
        recipients = _from_dsn(prose, notes)
    if not recipients:
        recipients = [_finish(r, notes) for r in textformat.recipients(notes, mine | {_addr(sender)})]
    if not recipients and (dsn_text or daemon) and original.to:
        recipients = _fallback_to_original(original, notes)
    if depth < 1 and not dsn_text and all(r.reason == "undefined" for r in recipients):
        inner = _attached(msg)
        found = _parse(inner, depth + 1) if inner is not None else None
        if found is not None:
            return found
    if depth < 1 and recipients:
        following = _following(msg)
        found = _parse(following, depth + 1) if following is not None else None
        recipients += found.recipients if found is not None else ()
    if not recipients:
        return None
    return Bounce(recipients=tuple(recipients[:_MAX_RECIPIENTS]), original=original)


# An mbox separator line ("From MAILER-DAEMON  Thu Apr 29 23:34:45 2015"): what follows it
# is another whole message.
_MBOX_FROM = re.compile(r"^From \S+ +\w{3} \w{3} +\d{1,2} \d\d:\d\d:\d\d \d{4}\s*$", re.MULTILINE)


def _following(msg: Message) -> Message | None:
    """A second message saved after this one in the same file (an mbox of two reports): the
    text after the closing boundary that starts with an mbox separator line."""
    epilogue = (msg.epilogue if msg.is_multipart() else None) or ""
    m = _MBOX_FROM.search(epilogue)
    if m is None:
        return None
    return email.message_from_string(epilogue[m.end() :].lstrip("\r\n"), policy=email.policy.compat32)


def _local(sender: str) -> str:
    m = ADDRESS.search(sender)
    return m.group(0).split("@", 1)[0] if m else ""


def _addr(value: str) -> str:
    m = ADDRESS.search(value or "")
    return canonical(m.group(0)) if m else ""


def _split(msg: Message) -> tuple[str, str, str, Original]:
    """(delivery-status text, the notification's own prose, the original message) of a bounce."""
    dsn: list[str] = []
    notes: list[str] = []
    original: Original | None = None
    for part in _walk(msg):
        ctype = part.get_content_type()
        if ctype in ("message/delivery-status", "message/global-delivery-status"):
            dsn.append(_delivery_status_text(part))
        elif ctype in ("message/rfc822", "message/global"):
            if original is None:
                inner = part.get_payload()
                if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                    original = _original(inner[0])
                elif isinstance(inner, str):
                    original = _original(email.message_from_string(inner, policy=email.policy.compat32))
        elif ctype in ("text/rfc822-headers", "text/global-headers"):
            if original is None:
                original = _original(email.message_from_string(part_text(part), policy=email.policy.compat32))
        elif (ctype.startswith(("text/", "multipart/"))) and not part.get_filename():
            body = part_text(part)
            if ctype == "text/html" and notes:
                continue
            if ctype == "text/html":
                body = textformat.strip_html(body)
            notes.append(body)
    prose = _iso2022("\n".join(notes)[:_MAX_PROSE])
    own, quoted = textformat.cut_original(prose)
    if original is None:
        original = _original(email.message_from_string(quoted, policy=email.policy.compat32)) if quoted else Original()
    return "\n\n".join(dsn), own, prose, original


def _walk(msg: Message) -> list[Message]:
    """Leaf parts outside any attached message, and the attached messages themselves."""
    out: list[Message] = []
    stack = [msg]
    while stack and len(out) < 200:
        part = stack.pop(0)
        ctype = part.get_content_type()
        if part.is_multipart() and not ctype.startswith("message/"):
            payload = part.get_payload()
            if isinstance(payload, list):
                stack[0:0] = [p for p in payload if isinstance(p, Message)]
            continue
        if ctype.startswith("multipart/") and part is msg:
            rebuilt = _rebuild(part)
            if rebuilt is not None:
                stack.insert(0, rebuilt)
                continue
        out.append(part)
    return out


_BOUNDARY = re.compile(r"^--([^\s-][^\s]*|-[^\s]+?)\s*$", re.MULTILINE)


def _rebuild(part: Message) -> Message | None:
    """A multipart message whose declared boundary is not in its body, parsed again with the
    boundary its body does use."""
    body = part.get_payload()
    if not isinstance(body, str):
        return None
    m = _BOUNDARY.search(body)
    if not m:
        return None
    boundary = m.group(1)
    if boundary.endswith("--") and body.count(boundary) < 2:
        return None
    again = email.message_from_string(
        f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n{body}', policy=email.policy.compat32
    )
    return again if again.is_multipart() else None


def _delivery_status_text(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):
        blocks = []
        for block in payload:
            if isinstance(block, Message):
                lines = [f"{k}: {v}" for k, v in block.items()]
                inner = block.get_payload()
                if isinstance(inner, str) and inner.strip():
                    lines.append(inner)
                blocks.append("\n".join(lines))
        return _iso2022("\n\n".join(blocks))
    return _iso2022(part_text(part))


def _iso2022(text: str) -> str:
    """Text a Japanese MTA wrote in ISO-2022-JP without declaring it (raw escapes)."""
    if "\x1b$" not in text:
        return text
    try:
        return text.encode("latin-1").decode("iso-2022-jp")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _original(inner: Message) -> Original:
    return Original(
        message_id=decode_header(inner.get("Message-ID", "")).strip(),
        return_path=decode_header(inner.get("Return-Path", "")).strip(),
        sender=decode_header(inner.get("From", "")).strip(),
        to=decode_header(inner.get("To", "")).strip(),
        subject=decode_header(inner.get("Subject", "")).strip(),
    )


def _from_dsn(dsn_text: str, notes: str) -> list[Recipient]:
    out: list[Recipient] = []
    for block in field_blocks(dsn_text):  # the per-message block has no recipient: skipped
        if len(out) >= _MAX_RECIPIENTS:
            break
        final = block.get("final-recipient") or block.get("x-actual-recipient") or block.get("original-recipient")
        if not final:
            continue
        address = _dsn_address(final) or _dsn_address(block.get("original-recipient", ""))
        if not address:
            continue
        action = ((block.get("action") or "").split() or ["failed"])[0].lower()
        status = enhanced_code(block.get("status", "")) or ""
        diagnostic = block.get("diagnostic-code", "") or _status_comment(block.get("status", ""))
        remote = block.get("remote-mta", "")
        rec = textformat.Found(
            address=address,
            status=status,
            diagnostic=diagnostic,
            remote_mta=remote.split(";", 1)[-1].strip(),
            action=action,
        )
        out.append(_finish(rec, notes))
    return out  # one row per recipient block, as reported: a repeated report repeats its rows


_COMMENT = re.compile(r"\(([^()]{4,200})\)")


def _status_comment(status: str) -> str:
    """The words an MTA puts in a Status field's comment ("4.0.0 (host name lookup failure)"):
    the only diagnostic a DSN without a Diagnostic-Code has. A bare class word is none."""
    m = _COMMENT.search(status)
    if m is None or re.fullmatch(r"\s*(?:permanent|temporary|transient)(?: failure| error)?\s*", m.group(1), re.I):
        return ""
    return m.group(1).strip()


def _dsn_address(value: str) -> str:
    value = value.split(";", 1)[-1]
    m = ADDRESS.search(value)
    return canonical(m.group(0)) if m else ""


def _dedupe(recipients: list[Recipient]) -> list[Recipient]:
    seen: set[str] = set()
    out = []
    for r in recipients:
        if r.address in seen:
            continue
        seen.add(r.address)
        out.append(r)
    return out


_FIRST_REPLY = re.compile(r"(?<![\d.])([245]\d\d)-(?:([245]\.\d{1,3}\.\d{1,3})\s)?")


def _unfold(diagnostic: str) -> str:
    """One line of a multi-line SMTP reply, without the code (and status) it repeats per line."""
    m = _FIRST_REPLY.search(diagnostic)
    if not m:
        return diagnostic
    repeat = re.compile(r"\s" + m.group(1) + r"[- ]" + (re.escape(m.group(2)) + r"\s" if m.group(2) else ""))
    return diagnostic[: m.end()] + repeat.sub(" ", diagnostic[m.end() :])


def _finish(found: textformat.Found, notes: str) -> Recipient:
    """Status, reply code, reason and verdict of one recipient from what was found about it."""
    notes = notes[:_MAX_NOTES]
    diagnostic = " ".join(found.diagnostic.split())
    diagnostic = _unfold(diagnostic)
    reply_code, diag_status, words = diagnostic_parts(diagnostic)
    status = found.status
    if diag_status and (not status or diag_status.split(".")[0] == status.split(".")[0]):
        status = diag_status
    context = diagnostic or notes_about(found.address, notes) or textformat.first_error(notes)
    if not diagnostic and not reply_code:  # the report's prose may quote the reply the fields lack
        reply_code, prose_status, _ = diagnostic_parts(" ".join(context.split()))
        if prose_status and (not status or status.endswith(".0.0")) and prose_status[0] == (status or prose_status)[0]:
            status = prose_status
    lines = found.diagnostic.splitlines()
    if len(lines) > 3 and reasons.matching("\n".join(lines[:3])):
        context = " ".join(" ".join(lines[:3]).split())  # what follows may be another host's answer
    if not reasons.matching(context):
        context = context + "\n" + textformat.before(found.address, notes)
    said = textformat.transcript_for(diagnostic, notes) + "\n" + textformat.near(found.address, notes) + "\n" + context
    why = reasons.reason(status, reply_code, context, found.action, said, found.address)
    if why == "undefined" and not diagnostic:
        why = reasons.reason(status, reply_code, notes, found.action)
    why = found.reason or providers.reason(notes, why)
    if not status:
        temporary = found.action == "delayed" or reply_code.startswith("4") or textformat.temporary(context)
        status = reasons.pseudo_status(why, temporary, reasons.command(said))
    return Recipient(
        address=found.address,
        status=status,
        reply_code=reply_code,
        reason=why,
        hard=reasons.hard(why, status, reply_code),
        action=found.action,
        remote_mta=found.remote_mta,
        diagnostic=diagnostic or words,
    )


def notes_about(address: str, notes: str) -> str:
    return textformat.near(address, notes)


def _fallback_to_original(original: Original, notes: str) -> list[Recipient]:
    out = []
    for m in ADDRESS.finditer(original.to):
        found = textformat.Found(address=canonical(m.group(0)), diagnostic=textformat.first_error(notes))
        out.append(_finish(found, notes))
    return _dedupe(out)[:1]
