"""Outbound room: suppressed addresses - never sent to, whatever else says so.

Lifting a suppression does not change the contact's status: a contact that bounced,
complained or unsubscribed stays stopped, and `remove()` says so, so that the caller can
point at `contacts.reactivate()` (which lifts both, and records who and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import class_row, dict_row

from mailflow.consumers import inline
from mailflow.errors import NotFoundError
from mailflow.events.store import EventStore
from mailflow.infra import personal
from mailflow.mail.addresses import without_address
from mailflow.outbound import queries as q
from mailflow.outbound import streams
from mailflow.outbound.contacts import STOPPED_STATUSES, address
from mailflow.outbound.events import ContactStatusChanged, SuppressionAdded, SuppressionRemoved


@dataclass(frozen=True)
class Suppression:
    email: str | None  # None: the person was erased; only the subject is left
    subject: str
    reason: str
    detail: str
    created_at: datetime


@dataclass(frozen=True)
class Removed:
    email: str
    contact_status: str | None  # None: no contact has this address

    @property
    def still_stopped(self) -> bool:
        """The contact is bounced, complained or unsubscribed: nothing is sent to it yet."""
        return self.contact_status in STOPPED_STATUSES


def added(
    conn: psycopg.Connection, tenant: str, subject: str, email: str, reason: str, detail: str = ""
) -> SuppressionAdded:
    """A SuppressionAdded for the address, sealed under its subject's key (Erased if the
    person was erased: they are suppressed for good already)."""
    (sealed,) = personal.seal_many(conn, tenant, [(subject, {"email": email})])
    return SuppressionAdded(subject=subject, sealed=sealed, reason=reason, detail=without_address(detail, email))


def add(
    store: EventStore, raw_email: str, reason: str = "manual", detail: str = "", contact_status: str | None = None
) -> str:
    """Suppress an address; with contact_status also mark the contact (e.g. bounced)."""
    email = address(raw_email)
    with inline.writing(store) as w:
        subject = store.subject(w.conn, email)
        tenant = str(store.tenant)
        items = [(streams.suppression(subject), added(w.conn, tenant, subject, email, reason, detail).to_new())]
        if contact_status:
            changed = ContactStatusChanged(
                subject=subject, status=contact_status, reason=without_address(reason, email)
            )
            items.append((streams.contact(subject), changed.to_new()))
        w.record(items)
    return email


def remove(store: EventStore, raw_email: str) -> Removed:
    """Lift a suppression; the contact's status is left as it is (see the module docstring).
    The suppression of an erased person is never lifted."""
    email = address(raw_email)
    with inline.writing(store) as w:
        subject = store.subject(w.conn, email)
        w.conn.execute(q.LOCK_ADDRESS, (subject,))
        with w.conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(q.LOCK_SUPPRESSION, (subject,)).fetchone()
            if row is None:
                raise NotFoundError(f"{email} is not suppressed")
            if row["reason"] == "erased":
                raise personal.Erased()
            contact = cur.execute(q.LOCK_CONTACT, (subject,)).fetchone()
        w.record([(streams.suppression(subject), SuppressionRemoved(subject=subject).to_new())])
    return Removed(email, contact["status"] if contact else None)


def listing(conn: psycopg.Connection, limit: int = 1000) -> list[Suppression]:
    with conn.cursor(row_factory=class_row(Suppression)) as cur:
        return cur.execute(q.LIST_SUPPRESSIONS, (limit,)).fetchall()
