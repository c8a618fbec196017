"""Inbound room, classification: reading header values and addresses out of any message,
however broken - the one place the classifier's parsers (arf, autoreply, reply, the
dispatcher) get them from. Every function returns '' or [] rather than raise."""

from __future__ import annotations

from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses

__all__ = ["address_list", "first_address", "header", "message_ids"]


def header(msg: Message, name: str) -> str:
    """A header's first value on one line, RFC 2047 words decoded and raw 8-bit bytes read as
    UTF-8 (SMTPUTF8 mail, and clients that never encoded); '' when absent or unreadable."""
    try:
        wanted = name.lower()
        value = next((v for k, v in msg.raw_items() if k.lower() == wanted), None)
        if value is None:
            return ""
        text = str(value)
        if not text.isascii():  # the parser keeps undecodable bytes as surrogates
            data = text.encode("utf-8", "surrogateescape")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # 8-bit but not UTF-8: most often a Windows code page
                text = data.decode("cp1252", "replace")
        if "=?" in text:
            try:
                text = str(make_header(decode_header(text)))
            except Exception:  # noqa: BLE001 - a broken encoded word stays as it was written
                pass
        return " ".join(text.split())
    except Exception:  # noqa: BLE001 - a header the parser cannot decode is a header we do not have
        return ""


def address_list(value: str) -> list[str]:
    """The addresses in a header value, lower case, only those with an @ ('Undisclosed
    recipients' is none)."""
    try:
        pairs = getaddresses([value])
    except Exception:  # noqa: BLE001 - the stdlib's address parser raises on some garbage
        return []
    found = []
    for _name, address in pairs:
        address = address.strip().strip("<>").strip().lower()
        if "@" in address and " " not in address and not address.startswith("@") and not address.endswith("@"):
            found.append(address)
    return found


def first_address(value: str) -> str:
    """The first address in a header value (lower case), '' when there is none."""
    found = address_list(value)
    return found[0] if found else ""


def message_ids(value: str) -> tuple[str, ...]:
    """The <message-ids> in an In-Reply-To or References value, in order, each with its
    angle brackets; a bare id without brackets (some clients write them) counts too."""
    tokens = value.replace(">", "> ").split()
    if len(tokens) == 1 and "@" in tokens[0] and not tokens[0].startswith("<"):
        return (f"<{tokens[0].strip(',;<>')}>",)
    found = [t.strip(",;") for t in tokens]
    return tuple(dict.fromkeys(t for t in found if t.startswith("<") and t.endswith(">") and "@" in t and len(t) > 3))
