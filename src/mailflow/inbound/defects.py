"""Inbound room: what makes a received message malformed - a pure function of its bytes.

A malformed message is still accepted and stored (refusing it would lose a bounce from a
broken MTA, and the reader may still want it), but it is marked: the defects go into the
MessageReceived event and the `inbound_messages.defects` column, and the built-in spam rules
count them. The names are Python's own email defect classes (`StartBoundaryNotFoundDefect`,
`InvalidBase64CharactersDefect`, ...) plus mailflow's checks: `no_headers`, `no_body_separator`,
`8bit_header`, `nested_too_deep` (message/rfc822 parts inside each other more than
MAX_NESTING times), `header_too_long` (one header over MAX_HEADER_BYTES).

The parse is bounded: at most MAX_PARTS parts are walked, and nesting past MAX_NESTING is
reported, not followed.
"""

from __future__ import annotations

import re
from email import message_from_bytes, policy
from email.message import Message
from email.parser import BytesHeaderParser

MAX_NESTING = 8
MAX_PARTS = 500
MAX_HEADER_BYTES = 64 * 1024  # one header's unfolded length; RFC 5322 lines are 998 bytes at most

_HEADER_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+:", re.MULTILINE)


def header_block(data: bytes) -> bytes:
    """The header section (up to the first empty line; all of it if there is none)."""
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def headers(data: bytes) -> Message:
    """The headers alone, parsed leniently (routes match them; the body is not read)."""
    return BytesHeaderParser(policy=policy.compat32).parsebytes(header_block(data))


def find(data: bytes) -> list[str]:
    """The message's defects, sorted and each named once (empty: well-formed)."""
    found: set[str] = set()
    head = header_block(data)
    if not _HEADER_LINE.match(head):
        found.add("no_headers")
    if b"\r\n\r\n" not in data:
        found.add("no_body_separator")
    if any(b > 0x7F for b in head):
        found.add("8bit_header")
    if _longest_header(head) > MAX_HEADER_BYTES:
        found.add("header_too_long")
    try:
        message = message_from_bytes(data, policy=policy.compat32)
    except Exception as exc:  # noqa: BLE001 - the parser gave up: that is the defect
        found.add(f"unparseable:{type(exc).__name__}")
        return sorted(found)
    _walk(message, found, depth=0, budget=[MAX_PARTS])
    return sorted(found)


def _longest_header(head: bytes) -> int:
    longest = current = 0
    for line in head.split(b"\r\n"):
        current = current + len(line) if line[:1] in (b" ", b"\t") else len(line)
        longest = max(longest, current)
    return longest


def _walk(part: Message, found: set[str], depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        found.add("too_many_parts")
        return
    found.update(type(d).__name__ for d in part.defects)
    if part.get_content_maintype() == "message":
        if depth >= MAX_NESTING:
            found.add("nested_too_deep")
            return
        depth += 1
    payload = part.get_payload()
    if isinstance(payload, list):
        for sub in payload:
            if isinstance(sub, Message):
                _walk(sub, found, depth, budget)
    elif not part.is_multipart() and part.get("Content-Transfer-Encoding", "").strip().lower() == "base64":
        # Decoding records InvalidBase64*Defect on the part; the bytes themselves are not kept.
        part.get_payload(decode=True)
        found.update(type(d).__name__ for d in part.defects)
