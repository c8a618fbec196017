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


class TenantLimitsSet(Event):
    """Messages per hour and per day the tenant may send (None: no limit)."""

    tenant_id: str
    hourly_limit: int | None = None
    daily_limit: int | None = None


for _model in (TenantCreated, TenantSuspended, TenantResumed, TenantLimitsSet):
    registry.register(_model)
