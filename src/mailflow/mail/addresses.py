"""Mail room: email addresses in the one canonical form mailflow stores, compares and suppresses."""

from __future__ import annotations

import re

from email_validator import EmailNotValidError, validate_email

__all__ = ["EmailNotValidError", "domain_of", "normalize_email", "without_address"]

RECIPIENT = "<recipient>"


def normalize_email(raw: str) -> str:
    """A deliverable-looking address in canonical form, or EmailNotValidError."""
    result = validate_email(raw.strip(), check_deliverability=False)
    return result.normalized.lower()


def domain_of(address: str) -> str:
    """The domain part of a canonical address ('' if it has none)."""
    return address.rpartition("@")[2] if "@" in address else ""


def without_address(text: str, address: str) -> str:
    """`text` (a server's reply, a diagnostic) with the address in it, in any letter case and
    with or without angle brackets, replaced by <recipient>: what mailflow records of a reply
    names the job, not the person, so that the address can be erased from every row."""
    if not address or "@" not in address:
        return text
    return re.sub(r"<?" + re.escape(address) + r">?", RECIPIENT, text, flags=re.IGNORECASE)
