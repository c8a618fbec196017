"""Tenants room: create, list, suspend and resume tenants, and set their sending limits and tracking default.

The tenants table is an inline projection of the Tenant* events. These functions take an
operator's store: a tenant does not create or suspend tenants. A tenant's own writes check
its status (`refuse_if_suspended`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row, dict_row

from mailflow.consumers import inline
from mailflow.errors import ConflictError, NotFoundError, UsageError
from mailflow.events.envelope import Envelope, Metadata
from mailflow.events.store import EventStore
from mailflow.infra import personal
from mailflow.infra.tenancy import check_tenant_id
from mailflow.tenants import queries as q
from mailflow.tenants.events import (
    TenantCreated,
    TenantErased,
    TenantLimitsSet,
    TenantResumed,
    TenantSuspended,
    TenantTrackingSet,
)

STREAM = "tenant"  # each tenant's own stream: <id>/tenant


@dataclass
class Tenant:
    id: str
    name: str
    status: str
    hourly_limit: int | None
    daily_limit: int | None
    tracking: bool
    created_at: datetime
    contacts: int = 0
    campaigns: int = 0
    unfinished_jobs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "created_at": self.created_at.isoformat()}


def _operator(store: EventStore) -> None:
    if store.tenant is not None:
        raise UsageError("tenants are managed by the operator, not by a tenant")


def _md(tenant_id: str) -> Metadata:
    return Metadata(tenant=tenant_id, correlation_id=f"{tenant_id}/{STREAM}")


def create(store: EventStore, tenant_id: str, name: str | None = None) -> None:
    _operator(store)
    check_tenant_id(tenant_id)
    with inline.writing(store) as w:
        if w.conn.execute(q.LOCK_TENANT, (tenant_id,)).fetchone() is not None:
            raise ConflictError(f"tenant {tenant_id!r} exists already")
        w.record([(STREAM, TenantCreated(tenant_id=tenant_id, name=name or tenant_id).to_new(_md(tenant_id)))])


def _locked(conn: psycopg.Connection, tenant_id: str) -> str:
    row = conn.execute(q.LOCK_TENANT, (tenant_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no tenant {tenant_id!r} (see `mailflow tenants list`)")
    return str(row[1])


def suspend(store: EventStore, tenant_id: str, reason: str = "") -> bool:
    """Suspend; False if it already was."""
    _operator(store)
    with inline.writing(store) as w:
        if _locked(w.conn, tenant_id) == "suspended":
            return False
        w.record([(STREAM, TenantSuspended(tenant_id=tenant_id, reason=reason).to_new(_md(tenant_id)))])
    return True


def resume(store: EventStore, tenant_id: str) -> bool:
    """Resume; False if it was not suspended."""
    _operator(store)
    with inline.writing(store) as w:
        status = _locked(w.conn, tenant_id)
        if status == "erased":
            raise ConflictError(f"tenant {tenant_id!r} was erased; it cannot be resumed")
        if status == "active":
            return False
        w.record([(STREAM, TenantResumed(tenant_id=tenant_id).to_new(_md(tenant_id)))])
    return True


def refuse_unless_suspended(store: EventStore, tenant_id: str) -> str:
    """Erasing a tenant starts only once it is suspended (nothing of it is written meanwhile);
    returns its status (suspended, or erased: an erasure that was interrupted goes on)."""
    _operator(store)
    with inline.reading(store) as conn:
        status = _locked(conn, tenant_id)
    if status == "active":
        raise ConflictError(f"suspend tenant {tenant_id!r} first (`mailflow tenants suspend {tenant_id}`)")
    return status


def mark_erased(store: EventStore, tenant_id: str, people: int) -> None:
    """The end of a tenant's erasure, once everyone in it is erased: every subject key and
    secret of the tenant deleted, and TenantErased recorded."""
    _operator(store)
    with inline.writing(store) as w:
        _locked(w.conn, tenant_id)
        personal.shred_tenant(w.conn, tenant_id)
        w.conn.execute(q.DELETE_TENANT_SECRETS, (tenant_id,))
        w.record([(STREAM, TenantErased(tenant_id=tenant_id, people=people).to_new(_md(tenant_id)))])


def set_limits(store: EventStore, tenant_id: str, *, hourly: int | None, daily: int | None) -> None:
    _operator(store)
    for what, value in (("hourly", hourly), ("daily", daily)):
        if value is not None and value < 1:
            raise UsageError(f"the {what} limit must be at least 1 (omit it for no limit)")
    with inline.writing(store) as w:
        _locked(w.conn, tenant_id)
        event = TenantLimitsSet(tenant_id=tenant_id, hourly_limit=hourly, daily_limit=daily)
        w.record([(STREAM, event.to_new(_md(tenant_id)))])


def set_tracking(store: EventStore, tenant_id: str, tracking: bool) -> bool:
    """Whether the tenant's campaigns track opens and clicks unless they say otherwise; False if it already was so."""
    _operator(store)
    with inline.writing(store) as w:
        _locked(w.conn, tenant_id)
        with w.conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(q.TENANT_TRACKING, (tenant_id,)).fetchone()
        if row is not None and row["tracking"] is tracking:
            return False
        w.record([(STREAM, TenantTrackingSet(tenant_id=tenant_id, tracking=tracking).to_new(_md(tenant_id)))])
    return True


def listing(conn: psycopg.Connection, tenant_id: str | None = None) -> list[Tenant]:
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        return cur.execute(q.LIST_TENANTS, {"id": tenant_id}).fetchall()


def show(conn: psycopg.Connection, tenant_id: str) -> Tenant:
    found = listing(conn, tenant_id)
    if not found:
        raise NotFoundError(f"no tenant {tenant_id!r} (see `mailflow tenants list`)")
    return found[0]


def refuse_if_suspended(conn: psycopg.Connection, tenant_id: str) -> None:
    row = conn.execute(q.TENANT_STATUS, (tenant_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no tenant {tenant_id!r}")
    if row[0] in ("suspended", "erased"):
        raise ConflictError(f"tenant {tenant_id!r} is {row[0]}; its data can be read but not changed")


# -- the inline projection ------------------------------------------------------------------


def _apply(fn: Callable[[psycopg.Connection, dict[str, Any], datetime], object]):
    def apply(conn: psycopg.Connection, events: list[Envelope]) -> None:
        for env in events:
            fn(conn, env.data, env.recorded_at)

    return apply


PROJECTION = inline.register(
    inline.InlineProjection(
        "tenants",
        "tenants, their status, sending limits and tracking default (inline)",
        ("tenants",),
        {
            "TenantCreated": _apply(
                lambda c, d, at: c.execute(q.INSERT_TENANT, {"id": d["tenant_id"], "name": d["name"], "at": at})
            ),
            "TenantSuspended": _apply(
                lambda c, d, at: c.execute(q.SET_STATUS, {"id": d["tenant_id"], "status": "suspended", "at": at})
            ),
            "TenantErased": _apply(
                lambda c, d, at: c.execute(q.SET_STATUS, {"id": d["tenant_id"], "status": "erased", "at": at})
            ),
            "TenantResumed": _apply(
                lambda c, d, at: c.execute(q.SET_STATUS, {"id": d["tenant_id"], "status": "active", "at": at})
            ),
            "TenantLimitsSet": _apply(
                lambda c, d, at: c.execute(
                    q.SET_LIMITS,
                    {"id": d["tenant_id"], "hourly": d.get("hourly_limit"), "daily": d.get("daily_limit"), "at": at},
                )
            ),
            "TenantTrackingSet": _apply(
                lambda c, d, at: c.execute(q.SET_TRACKING, {"id": d["tenant_id"], "tracking": d["tracking"], "at": at})
            ),
        },
        seed=q.SEED_DEFAULT,
    )
)
