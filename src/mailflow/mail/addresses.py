"""Mail room: email addresses in the one canonical form mailflow stores, compares and suppresses."""

from __future__ import annotations

from email_validator import EmailNotValidError, validate_email

__all__ = ["EmailNotValidError", "domain_of", "normalize_email"]


def normalize_email(raw: str) -> str:
    """A deliverable-looking address in canonical form, or EmailNotValidError."""
    result = validate_email(raw.strip(), check_deliverability=False)
    return result.normalized.lower()


def domain_of(address: str) -> str:
    """The domain part of a canonical address ('' if it has none)."""
    return address.rpartition("@")[2] if "@" in address else ""
