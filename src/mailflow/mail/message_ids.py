"""Mail room: Message-IDs mailflow makes for the messages it sends, and finding them again.

A message's id is derived from its job id (stable across attempts, so a resent attempt is
recognisably the same message), which lets inbound mail that answers or bounces it
(In-Reply-To, References, a DSN's original headers) name the job it is about.
"""

from __future__ import annotations


def message_id(job_id: str, domain: str) -> str:
    return f"<{job_id}@{domain}>"


def job_from_message_id(value: str) -> str | None:
    """The job id in a Message-ID (or In-Reply-To/References entry) we generated, else None."""
    inner = value.strip().strip("<>")
    return inner.split("@", 1)[0] if "@" in inner else None
