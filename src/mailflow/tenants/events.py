"""Tenants room: the events that record a tenant's life. Each is on the tenant's own stream
(`<id>/tenant`) and belongs to that tenant."""

from __future__ import annotations

from mailflow.events.registry import Event, registry


class TenantCreated(Event):
    tenant_id: str
    name: str


class TenantSuspended(Event):
    """Writes of the tenant are refused and its mail is not queued until it is resumed."""

    tenant_id: str
    reason: str = ""


class TenantResumed(Event):
    tenant_id: str


class TenantErased(Event):
    """Everyone the tenant held was erased (one ContactErased each), and its secrets deleted.
    An erased tenant stays, so that its history adds up, and can never be resumed."""

    tenant_id: str
    people: int = 0


class TenantLimitsSet(Event):
    """Messages per hour and per day the tenant may send (None: no limit)."""

    tenant_id: str
    hourly_limit: int | None = None
    daily_limit: int | None = None


for _model in (TenantCreated, TenantSuspended, TenantResumed, TenantLimitsSet, TenantErased):
    registry.register(_model)
