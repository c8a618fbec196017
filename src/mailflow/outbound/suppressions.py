"""Outbound room: suppressed addresses - never sent to, whatever else says so.

Lifting a suppression does not change the contact's status: a contact that bounced,
complained or unsubscribed stays stopped, and `remove()` says so, so that the caller can
point at `contacts.reactivate()` (which lifts both, and records who and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row, dict_row

from mailflow.consumers import inline
from mailflow.errors import NotFoundError
from mailflow.outbound import queries as q
from mailflow.outbound import streams
from mailflow.outbound.contacts import STOPPED_STATUSES, address
from mailflow.outbound.events import ContactStatusChanged, SuppressionAdded, SuppressionRemoved


@dataclass(frozen=True)
class Suppression:
    email: str
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


def add(store, raw_email: str, reason: str = "manual", detail: str = "", contact_status: str | None = None) -> str:
    """Suppress an address; with contact_status also mark the contact (e.g. bounced)."""
    email = address(raw_email)
    items = [(streams.suppression(email), SuppressionAdded(email=email, reason=reason, detail=detail).to_new())]
    if contact_status:
        items.append(
            (streams.contact(email), ContactStatusChanged(email=email, status=contact_status, reason=reason).to_new())
        )
    inline.record(store, items)
    return email


def remove(store, raw_email: str) -> Removed:
    """Lift a suppression; the contact's status is left as it is (see the module docstring)."""
    email = address(raw_email)
    with inline.writing(store) as w:
        w.conn.execute(q.LOCK_ADDRESS, (email,))
        with w.conn.cursor(row_factory=dict_row) as cur:
            if cur.execute(q.LOCK_SUPPRESSION, (email,)).fetchone() is None:
                raise NotFoundError(f"{email} is not suppressed")
            contact = cur.execute(q.LOCK_CONTACT, (email,)).fetchone()
        w.record([(streams.suppression(email), SuppressionRemoved(email=email).to_new())])
    return Removed(email, contact["status"] if contact else None)


def listing(conn, limit: int = 1000) -> list[Suppression]:
    with conn.cursor(row_factory=class_row(Suppression)) as cur:
        return cur.execute(q.LIST_SUPPRESSIONS, (limit,)).fetchall()
