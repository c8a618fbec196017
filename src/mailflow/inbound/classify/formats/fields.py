"""Inbound room, classification: the small readers every bounce format shares - addresses,
decoded headers and parts, RFC 3464 field blocks, and the parts of a diagnostic line."""

from __future__ import annotations

import email.header
import re
from email.message import Message

from mailflow.mail.status import enhanced_code

# Starts only where a local part can start (the look-behind), and never gives characters
# back (possessive), so that a long run of letters costs linear time.
ADDRESS = re.compile(
    r"(?<![A-Za-z0-9!#$%&'*+/=?^_`{|}~.-])[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]++@[A-Za-z0-9-]++(?:\.[A-Za-z0-9-]++)+"
)
_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)\s*:\s?(.*)$")
_REPLY = re.compile(r"(?<![\d.\w-])([245][0-5]\d)(?=[\s,;)\-]|$)")
_AFTER_REPLY = re.compile(r"(?<![\d.])[245]\d\d[ -]'?([245]\.\d{1,3}\.\d{1,3})\b")
_TYPE = re.compile(r"^\s*(?:smtp|x-[a-z0-9-]+|x-unix|x-postfix|mta|dns)\s*;\s*", re.IGNORECASE)


def canonical(address: str) -> str:
    return address.strip().strip("<>.'\"").lower()


def decode_header(value: object) -> str:
    """A header's text with RFC 2047 words decoded; never raises."""
    if value is None:
        return ""
    raw = str(value)
    try:
        parts = email.header.decode_header(raw)
    except Exception:  # noqa: BLE001
        return raw
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            out.append(_decode(chunk, charset))
        else:
            out.append(chunk)
    return "".join(out) if len(parts) > 1 or isinstance(parts[0][0], bytes) else raw


def _decode(data: bytes, charset: str | None) -> str:
    for name in (charset, "utf-8"):
        if not name:
            continue
        try:
            return data.decode(name)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("latin-1")


def part_text(part: Message) -> str:
    """A leaf part's decoded text (transfer encoding and charset); never raises."""
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        data = None
    if isinstance(data, bytes):
        charset = part.get_content_charset() or "utf-8"
        if charset.lower() in ("us-ascii", "ascii"):
            charset = "utf-8"
        return _decode(data, charset)
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload
    if isinstance(payload, list):
        return "\n\n".join(p.as_string() for p in payload if isinstance(p, Message))
    return ""


def field_blocks(text: str) -> list[dict[str, str]]:
    """RFC 3464 field groups: one dict per blank-line separated block (lower-case names),
    a new block also where a recipient's fields start without a blank line."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current, last = {}, ""
            continue
        if line[0] in " \t" and last:
            current[last] += " " + line.strip()
            continue
        m = _FIELD.match(line)
        if not m:
            last = ""
            continue
        name, value = m.group(1).lower(), m.group(2).strip()
        complete = "final-recipient" in current and "status" in current
        if (name == "final-recipient" and "final-recipient" in current) or (
            name == "original-recipient" and ("original-recipient" in current or complete)
        ):
            blocks.append(current)
            current = {}
        if name in current:
            continue
        current[name] = value
        last = name
    if current:
        blocks.append(current)
    return blocks


def diagnostic_parts(diagnostic: str) -> tuple[str, str, str]:
    """(SMTP reply code, enhanced status code, the words) of a diagnostic line. A transcript
    in one line ("250 2.1.5 Ok ... 451 4.3.0 Error") is read for its first failure."""
    text = _TYPE.sub("", diagnostic or "")
    head = text[:600]
    replies = list(_REPLY.finditer(head))
    failing = next((m for m in replies if m.group(1)[0] in "45"), None)
    chosen = failing or (replies[0] if replies else None)
    reply = chosen.group(1) if chosen else ""
    after = None
    for m in _AFTER_REPLY.finditer(head):
        if chosen is None or m.start() >= chosen.start():
            after = m
            break
    status = after.group(1) if after else enhanced_code(text[chosen.start() :] if chosen else text) or ""
    if not status:
        status = enhanced_code(text) or ""
    return reply, status, text.strip()
