"""Inbound room, classification: abuse and feedback reports (ARF, RFC 5965) - the feedback
type, the recipients complained about and the headers of the original message.

A report is recognised by its structure first (multipart/report; report-type=feedback-report,
or any message carrying a message/feedback-report part, as some providers send inside a
multipart/mixed), then by the two common reports that are not ARF at all: Microsoft's JMRP
/ Hotmail complaints (`complaint about message from ...` with the original attached) and
Apple Mail's one-click unsubscribe (`X-Apple-Unsubscribe: true`, an opt-out). Pure: no I/O.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from dataclasses import dataclass, replace
from email.message import Message

from mailflow.inbound.classify.headers import address_list, first_address, header
from mailflow.inbound.classify.model import Original, Recipient

__all__ = ["Complaint", "original_of", "parse"]

_MAX_PARTS = 200  # walk no further into a hostile message than this
_HEADERS_TYPES = ("text/rfc822-headers", "text/rfc822-header")  # the second: a common misspelling (sisimai arf-12)
_JMRP_SUBJECT = re.compile(r"^\s*complaint about message from\b", re.IGNORECASE)
_JMRP_SENDERS = ("staff@hotmail.com", "abuse@hotmail.com", "staff@outlook.com")
_FEEDBACK_TYPE = re.compile(r"[a-z][a-z0-9_-]*")
_ENCLOSED_RECIPIENT_HEADERS = ("X-HmXmrOriginalRecipient", "Original-Rcpt-To", "X-Original-To")


@dataclass(frozen=True)
class Complaint:
    """What a feedback report says: its type (abuse, fraud, virus, other, not-spam,
    auth-failure, opt-out, dmarc, ...), one Recipient per address complained about (one with
    an empty address when the report names none: providers often redact it) and the original."""

    feedback_type: str
    recipients: tuple[Recipient, ...]
    original: Original


def parse(msg: Message) -> Complaint | None:
    """The complaint `msg` is, or None when it is not a feedback report."""
    parts = _parts(msg)
    report = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    if report is not None or _is_feedback_report(msg):
        fields = _fields(report) if report is not None else {}
        original = original_of(msg, parts)
        if fields.get("original-mail-from") and not original.return_path:
            original = replace(original, return_path=first_address(fields["original-mail-from"][0]))
        addresses = [a for v in fields.get("original-rcpt-to", []) for a in address_list(v)]
        addresses += [a for v in fields.get("removal-recipient", []) for a in address_list(v)]
        return Complaint(
            feedback_type=_feedback_type(fields),
            recipients=_recipients(addresses or _enclosed_recipients(parts, original)),
            original=original,
        )
    sender = first_address(header(msg, "From"))
    if sender in _JMRP_SENDERS and _JMRP_SUBJECT.match(header(msg, "Subject")):
        enclosed = [p for p in parts if p.get_content_type() in ("message/rfc822", *_HEADERS_TYPES)]
        if enclosed:
            original = original_of(msg, parts)
            return Complaint("abuse", _recipients(_enclosed_recipients(parts, original)), original)
    if header(msg, "X-Apple-Unsubscribe").lower() == "true":
        # Apple Mail's "unsubscribe" button: a message from the subscriber to the List-Unsubscribe
        # mailto address, nothing enclosed. The person asking is its From.
        return Complaint("opt-out", _recipients([sender] if sender else []), Original())
    return None


def _is_feedback_report(msg: Message) -> bool:
    return (
        msg.get_content_type() == "multipart/report"
        and str(msg.get_param("report-type", "", header="content-type")).strip().lower() == "feedback-report"
    )


def _parts(msg: Message) -> list[Message]:
    """Every part, depth first, at most _MAX_PARTS of them (the enclosed message's parts too)."""
    found: list[Message] = []
    stack = [msg]
    while stack and len(found) < _MAX_PARTS:
        part = stack.pop()
        found.append(part)
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))
    return found


def _fields(report: Message) -> dict[str, list[str]]:
    """The feedback report's fields by lower-case name, each with all its values in order.

    The stdlib parses a message/* part as an enclosed message, so the fields are the headers
    of its one subpart; a report whose body arrived as a string is parsed here."""
    payload = report.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        block: Message = payload[0]
    else:
        text = payload if isinstance(payload, str) else ""
        block = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(text.lstrip())
    fields: dict[str, list[str]] = {}
    for name, value in block.items():
        fields.setdefault(name.lower(), []).append(" ".join(str(value).split()))
    return fields


def _feedback_type(fields: dict[str, list[str]]) -> str:
    """RFC 5965's Feedback-Type, lower case; 'abuse' when a report says none (sisimai's default)."""
    for value in fields.get("feedback-type", []):
        m = _FEEDBACK_TYPE.match(value.strip().lower())
        if m:
            return m.group(0)
    return "abuse"


def original_of(msg: Message, parts: list[Message] | None = None) -> Original:
    """The headers of the message a report is about: its message/rfc822 part, else its
    text/rfc822-headers part. Empty when it encloses neither."""
    for part in parts if parts is not None else _parts(msg):
        if part is msg:
            continue
        kind = part.get_content_type()
        if kind == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return _original(payload[0])
        elif kind in _HEADERS_TYPES:
            text = _text(part)
            if text:
                return _original(email.parser.HeaderParser(policy=email.policy.compat32).parsestr(text.lstrip()))
    return Original()


def _original(headers: Message) -> Original:
    return Original(
        message_id=header(headers, "Message-ID"),
        return_path=first_address(header(headers, "Return-Path")),
        sender=first_address(header(headers, "From")),
        to=header(headers, "To"),
        subject=header(headers, "Subject"),
    )


def _enclosed_recipients(parts: list[Message], original: Original) -> list[str]:
    """Who received the original, when the report's fields do not say: the enclosed message's
    own record of it (Hotmail's X-HmXmrOriginalRecipient), else its To."""
    for part in parts:
        if part.get_content_type() == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                for name in _ENCLOSED_RECIPIENT_HEADERS:
                    found = [a for v in payload[0].get_all(name, []) for a in address_list(str(v))]
                    if found:
                        return found
            break
    return address_list(original.to)


def _recipients(addresses: list[str]) -> tuple[Recipient, ...]:
    """One row per address complained about (each once, in order); one with no address when
    the report names none, so that a complaint always says what it is."""
    unique = list(dict.fromkeys(addresses))
    return tuple(
        Recipient(address=a, reason="feedback", hard=False, action="delivered", status="") for a in unique or [""]
    )


def _text(part: Message) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - undecodable transfer encoding: nothing usable in it
        return ""
    if isinstance(payload, bytes):
        return payload.decode(part.get_content_charset() or "utf-8", errors="replace")
    raw = part.get_payload()
    return raw if isinstance(raw, str) else ""
