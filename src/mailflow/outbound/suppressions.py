"""Outbound room: suppressed addresses - never sent to, whatever else says so."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from email_validator import EmailNotValidError

from mailflow.errors import NotFoundError, UsageError
from mailflow.consumers import inline
from mailflow.outbound import queries as q
from mailflow.outbound.contacts import normalize_email
from mailflow.outbound.events import ContactStatusChanged, SuppressionAdded, SuppressionRemoved


@dataclass(frozen=True)
class Suppression:
    email: str
    reason: str
    detail: str
    created_at: datetime


def _email(raw: str) -> str:
    try:
        return normalize_email(raw)
    except EmailNotValidError as exc:
        raise UsageError(f"{raw!r} is not a valid email address: {exc}") from exc


def add(store, raw_email: str, reason: str = "manual", detail: str = "", contact_status: str | None = None) -> str:
    """Suppress an address; with contact_status also mark the contact (e.g. bounced)."""
    email = _email(raw_email)
    items = [(f"suppression-{email}", SuppressionAdded(email=email, reason=reason, detail=detail).to_new())]
    if contact_status:
        items.append(
            (f"contact-{email}", ContactStatusChanged(email=email, status=contact_status, reason=reason).to_new())
        )
    inline.record(store, items)
    return email


def remove(store, raw_email: str) -> str:
    email = _email(raw_email)
    with store.pool.connection() as conn:
        if conn.execute(q.IS_SUPPRESSED, (email,)).fetchone() is None:
            raise NotFoundError(f"{email} is not suppressed")
    inline.record(store, [(f"suppression-{email}", SuppressionRemoved(email=email).to_new())])
    return email


def listing(conn, limit: int = 1000) -> list[Suppression]:
    return [Suppression(*r) for r in conn.execute(q.LIST_SUPPRESSIONS, (limit,)).fetchall()]
