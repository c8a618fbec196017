"""Tenants room: API keys - what an application may do over the HTTP API, and whether a key is good.

A key reads `mf_live_<id>_<secret>`: the prefix makes a leaked key recognisable (secret
scanners, grep), the id finds its row, the secret is 40 random base62 characters. Only
SHA-256 of the whole key is stored (a key is random, so a slow hash would add nothing but
time), in `api_key_hashes`, beside the ApiKeyCreated event and never in it; the key itself
is shown once, when it is created.

`verify()` costs the same for a key that does not exist as for one whose secret is wrong:
one lookup and one constant-time comparison either way, so response times do not tell an
attacker which ids exist. Revocation is read on every request: it takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailflow.consumers import inline
from mailflow.errors import AuthenticationError, NotFoundError, UsageError
from mailflow.events.envelope import Envelope
from mailflow.events.store import EventStore
from mailflow.tenants import queries as q
from mailflow.tenants.events import ApiKeyCreated, ApiKeyRevoked

PREFIX = "mf_live_"
ID_LENGTH = 12
SECRET_LENGTH = 40
_ID_ALPHABET = string.ascii_lowercase + "234567"
_SECRET_ALPHABET = string.ascii_letters + string.digits
_KEY = re.compile(rf"^{PREFIX}([a-z2-7]{{{ID_LENGTH}}})_([A-Za-z0-9]{{{SECRET_LENGTH}}})$")
_DUMMY_HASH = hashlib.sha256(b"mailflow: no such key").digest()

# scope -> what it allows. `admin` allows everything; a `:write` scope does not imply `:read`.
SCOPES: dict[str, str] = {
    "contacts:read": "read contacts, segments and suppressions",
    "contacts:write": "create, change, import, erase contacts; segments; suppressions",
    "campaigns:read": "read templates, campaigns, their reports and jobs",
    "campaigns:write": "create templates and campaigns; schedule, start, pause, resume, cancel",
    "messages:send": "send transactional messages",
    "messages:read": "read transactional messages, jobs and received mail",
    "infra:read": "read sending domains, senders, inbound domains, mailboxes and routes",
    "infra:write": "add and change sending domains, senders, inbound domains, mailboxes and routes",
    "webhooks:read": "read webhook endpoints and their deliveries",
    "webhooks:write": "add, change and remove webhook endpoints",
    "admin": "everything above, and the tenant's API keys",
}

STREAM = "api-key-{}"


@dataclass
class ApiKey:
    id: str
    name: str
    scopes: list[str]
    networks: list[str]
    expires_at: datetime | None
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= datetime.now(UTC):
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("expires_at", "created_at", "revoked_at", "last_used_at"):
            d[k] = d[k].isoformat() if d[k] else None
        d["state"] = self.state
        return d


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant's key and what it may do."""

    tenant: str
    key_id: str
    scopes: frozenset[str] = field(default_factory=frozenset)

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    @property
    def actor(self) -> str:
        return f"api-key:{self.key_id}"


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes, sorted and without repeats, or UsageError naming an unknown one."""
    wanted = sorted({s.strip() for s in scopes if s.strip()})
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown:
        raise UsageError(f"unknown scope {unknown[0]!r}; known: {', '.join(SCOPES)}")
    if not wanted:
        raise UsageError(f"a key needs at least one scope; known: {', '.join(SCOPES)}")
    return wanted


def check_networks(networks: Iterable[str]) -> list[str]:
    out = []
    for raw in networks:
        try:
            out.append(str(ipaddress.ip_network(raw.strip(), strict=False)))
        except ValueError:
            raise UsageError(f"{raw!r} is not a network (use 203.0.113.0/24, 2001:db8::/32 or one address)") from None
    return out


def new_key() -> tuple[str, str]:
    """(id, the whole key)."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    return key_id, f"{PREFIX}{key_id}_{secret}"


def parse(token: str) -> str | None:
    """The key id of something shaped like a key, else None."""
    m = _KEY.match(token)
    return m.group(1) if m else None


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create(
    store: EventStore,
    name: str,
    scopes: Iterable[str],
    *,
    expires_at: datetime | None = None,
    networks: Iterable[str] = (),
    created_by: str | None = None,
) -> tuple[ApiKey, str]:
    """A new key of the store's tenant: (what it is, the key itself - shown once, kept nowhere)."""
    if store.tenant is None:
        raise UsageError("an API key belongs to a tenant: act for one (--tenant)")
    name = name.strip()
    if not name or len(name) > 100:
        raise UsageError("a key's name must be 1 to 100 characters")
    wanted = check_scopes(scopes)
    nets = check_networks(networks)
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise UsageError("a key's expiry must be in the future")
    key_id, token = new_key()
    event = ApiKeyCreated(
        key_id=key_id, name=name, scopes=wanted, networks=nets, expires_at=expires_at, created_by=created_by
    )
    with inline.writing(store) as w:
        w.conn.execute(q.INSERT_KEY_HASH, {"tenant": store.tenant, "id": key_id, "hash": digest(token)})
        w.record([(STREAM.format(key_id), event.to_new())])
    with inline.reading(store) as conn:
        return show(conn, key_id), token


def revoke(store: EventStore, key_id: str, reason: str = "") -> bool:
    """Revoke at once; False if it already was. Another tenant's key is not found."""
    with inline.writing(store) as w:
        row = w.conn.execute(q.LOCK_KEY, (key_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no API key {key_id!r} (see `mailflow keys list`)")
        if row[0] is not None:
            return False
        w.record([(STREAM.format(key_id), ApiKeyRevoked(key_id=key_id, reason=reason).to_new())])
    return True


def listing(conn: psycopg.Connection) -> list[ApiKey]:
    with conn.cursor(row_factory=dict_row) as cur:
        return [_key(r) for r in cur.execute(q.LIST_KEYS, {"id": None}).fetchall()]


def show(conn: psycopg.Connection, key_id: str) -> ApiKey:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.LIST_KEYS, {"id": key_id}).fetchone()
    if row is None:
        raise NotFoundError(f"no API key {key_id!r} (see `mailflow keys list`)")
    return _key(row)


def _key(row: dict[str, Any]) -> ApiKey:
    return ApiKey(**{**row, "networks": [str(n) for n in row["networks"]]})


def judge(row: dict[str, Any] | None, token: str, client: str | None, now: datetime) -> Principal:
    """Whether `token` is a good key, given its row (None: no such id). The comparison runs
    whether or not the row exists, so both refusals take as long."""
    expected = row["hash"] if row is not None else _DUMMY_HASH
    matches = hmac.compare_digest(digest(token), bytes(expected))
    if row is None or not matches:
        raise AuthenticationError("the API key is not valid")
    if row["revoked_at"] is not None:
        raise AuthenticationError("the API key was revoked")
    if row["expires_at"] is not None and row["expires_at"] <= now:
        raise AuthenticationError("the API key has expired")
    if row["networks"]:
        addr = ipaddress.ip_address(client) if client else None
        if addr is None or not any(addr in ipaddress.ip_network(str(n)) for n in row["networks"]):
            raise AuthenticationError("the API key may not be used from this address")
    return Principal(row["tenant"], row["id"], frozenset(row["scopes"]))


def row_for(conn: psycopg.Connection, token: str) -> dict[str, Any] | None:
    """What judge() needs of the key `token` names (None: no such id). `conn` is an
    operator's: the key says which tenant it belongs to."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(q.KEY_FOR_AUTH, (parse(token) or "",)).fetchone()


def verify(conn: psycopg.Connection, token: str, client: str | None = None) -> Principal:
    """The principal of a key, or AuthenticationError."""
    return judge(row_for(conn, token), token, client, datetime.now(UTC))


def touch(conn: psycopg.Connection, key_id: str) -> None:
    """Note that the key was used now (the API calls it at most once a minute per key)."""
    conn.execute(q.TOUCH_KEY, (key_id,))


# -- the inline projection ------------------------------------------------------------------


def _apply(fn: Callable[[psycopg.Connection, Envelope], object]):
    def apply(conn: psycopg.Connection, events: list[Envelope]) -> None:
        for env in events:
            fn(conn, env)

    return apply


def _created(conn: psycopg.Connection, env: Envelope) -> None:
    d = env.data
    conn.execute(
        q.INSERT_KEY,
        {
            "tenant": env.metadata.tenant,
            "id": d["key_id"],
            "name": d["name"],
            "scopes": d["scopes"],
            "networks": d.get("networks") or [],
            "expires_at": d.get("expires_at"),
            "created_by": d.get("created_by") or env.metadata.actor,
            "at": env.recorded_at,
        },
    )


PROJECTION = inline.register(
    inline.InlineProjection(
        "api_keys",
        "API keys: name, scopes, networks, expiry, revocation (inline; the hashes are kept apart)",
        ("api_keys",),
        {
            "ApiKeyCreated": _apply(_created),
            "ApiKeyRevoked": _apply(lambda c, env: c.execute(q.REVOKE_KEY, (env.recorded_at, env.data["key_id"]))),
        },
    )
)
