"""Tenants room: the events that record a tenant's life. Each is on the tenant's own stream
(`<id>/tenant`) and belongs to that tenant."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

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


class TenantTrackingSet(Event):
    """Whether the tenant's campaigns track opens and clicks by default (a campaign may say
    otherwise; transactional mail never is): docs/tracking.md."""

    tenant_id: str
    tracking: bool


for _model in (TenantCreated, TenantSuspended, TenantResumed, TenantLimitsSet, TenantErased, TenantTrackingSet):
    registry.register(_model)


class ApiKeyCreated(Event):
    """A key for the HTTP API (tenants/keys.py). Its hash is kept apart, never in the log."""

    key_id: str
    name: str
    scopes: list[str]
    networks: list[str] = Field(default_factory=list)
    expires_at: datetime | None = None
    created_by: str | None = None


class ApiKeyRevoked(Event):
    """The key is refused from now on."""

    key_id: str
    reason: str = ""


registry.register(ApiKeyCreated)
registry.register(ApiKeyRevoked)


# -- users of the browser pages and their sessions (tenants/users.py) -------------------------
# A user is named by subject (the keyed hash of the address, infra/personal.py); the address
# is sealed under the subject's key. No event carries a password or its hash.


class UserAdded(Event):
    """A user of the tenant's browser pages, with a role (owner, admin, member, viewer)."""

    user_id: str
    subject: str
    sealed: str  # {"email": ...} sealed for the subject
    role: str


class UserRoleChanged(Event):
    user_id: str
    role: str
    previous_role: str


class UserPasswordChanged(Event):
    """The user's password was set anew (its hash is kept apart, in user_passwords); every
    session the user had was revoked with it (one SessionRevoked each)."""

    user_id: str


class UserRemoved(Event):
    """The user can no longer log in; their sessions were revoked with it."""

    user_id: str


class UserLoggedIn(Event):
    user_id: str
    subject: str
    session_id: str | None = None  # the browser session opened (None: a check without one)


class UserLoginFailed(Event):
    """A login that did not succeed: a wrong password, or an address that is no user's
    (user_id None). Counted per address, for the throttle, and per user."""

    subject: str
    user_id: str | None = None


class SessionRevoked(Event):
    """A browser session ended before its time: logout, password change or the user's removal."""

    session_id: str
    user_id: str
    reason: str


_USER_EVENTS: tuple[type[Event], ...] = (
    UserAdded,
    UserRoleChanged,
    UserPasswordChanged,
    UserRemoved,
    UserLoggedIn,
    UserLoginFailed,
    SessionRevoked,
)
for _user_event in _USER_EVENTS:
    registry.register(_user_event)
