"""API room: who is calling and what they may do - bearer keys, scopes, rate limits.

`Gate.authenticate()` turns the `Authorization: Bearer mf_live_...` header into a Principal
(tenants/keys.py decides whether the key is good) and charges the request to the key's and the
tenant's rate limits. `require(scope)` is the dependency every operation declares: it puts the
scope into the OpenAPI document (the auth test matrix reads it from there) and refuses a key
without it with 403.

Rate limits are GCRA (a token bucket without a refill timer) in one Redis script per request,
for the key and its tenant at once, timed by Redis's clock so that every API process agrees.
When Redis does not answer, requests are let through and the outage is logged once: the
limits protect the service, they are not what makes it correct.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import redis
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mailflow.api.idempotency import Forgetting
from mailflow.config import Settings
from mailflow.consumers import inline
from mailflow.errors import AuthenticationError, PermissionDenied, RateLimited
from mailflow.events.envelope import current_acting
from mailflow.events.keys import Keys
from mailflow.events.store import EventStore
from mailflow.infra.vault import Vault
from mailflow.log import get_logger
from mailflow.tenants import keys
from mailflow.tenants.keys import Principal

log = get_logger("mailflow.api")

TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per key and process

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer mf_live_...`")

# KEYS: key bucket, tenant bucket, use counter. ARGV: emission interval and tolerance (us) of
# each bucket, the key id. Returns 0 when allowed, else the microseconds to wait.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
for i = 1, 2 do
  local emission = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + emission
  if new_tat - now > tolerance then return math.ceil(new_tat - now - tolerance) end
  tats[i] = new_tat
end
for i = 1, 2 do
  redis.call('SET', KEYS[i], tats[i], 'PX', math.ceil((tats[i] - now) / 1000) + 1000)
end
redis.call('HINCRBY', KEYS[3], ARGV[5], 1)
return 0
"""


@dataclass
class Ctx:
    """What an operation gets: the caller, and the store acting for the caller's tenant."""

    principal: Principal
    store: EventStore
    gate: Gate

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    @contextmanager
    def reading(self) -> Iterator[psycopg.Connection]:
        """A transaction that sees only the tenant's rows, cut off after MAILFLOW_API_TIMEOUT_S."""
        with inline.reading(self.store) as conn:
            conn.execute(f"SET LOCAL statement_timeout = {int(self.gate.settings.api_timeout_s * 1000)}")
            yield conn


class Gate:
    def __init__(self, store: EventStore, r: redis.Redis, rkeys: Keys, settings: Settings, vault: Vault) -> None:
        self.store = store
        self.vault = vault
        self.redis = r
        self.rkeys = rkeys
        self.settings = settings
        self._script = r.register_script(_GCRA)
        self.forgetting = Forgetting(store, settings.api_idempotency_hours)
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()
        self._redis_down = False
        s = settings
        self._limits = [
            int(1e6 / s.api_rate_per_key),
            int(1e6 / s.api_rate_per_key * s.api_burst_per_key),
            int(1e6 / s.api_rate_per_tenant),
            int(1e6 / s.api_rate_per_tenant * s.api_burst_per_tenant),
        ]

    def key(self, name: str) -> str:
        return f"{self.rkeys.prefix}:api:{name}"

    def authenticate(self, request: Request, token: str | None) -> Principal:
        """The caller (cached for the request), or AuthenticationError / RateLimited."""
        known = getattr(request.state, "principal", None)
        if known is not None:
            return known
        if not token:
            raise AuthenticationError("send an API key: Authorization: Bearer mf_live_...")
        client = getattr(request.state, "client_ip", None)
        try:
            with self.store.pool.connection() as conn:
                principal = keys.verify(conn, token, client)
                self._touch(conn, principal.key_id)
        except AuthenticationError:
            self._count("auth_failures", keys.parse(token) or "unknown")
            log.warning("api.auth_failed", key=keys.parse(token), client=client)
            raise
        self._charge(principal)
        request.state.principal = principal
        now = current_acting()
        if now is not None:
            now.actor = principal.actor  # the actor of every event the request appends
        return principal

    def _touch(self, conn: psycopg.Connection, key_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(key_id, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
                return
            self._touched[key_id] = now
        keys.touch(conn, key_id)

    def _charge(self, p: Principal) -> None:
        try:
            wait_us = self._script(
                keys=[self.key(f"rate:key:{p.key_id}"), self.key(f"rate:tenant:{p.tenant}"), self.key("uses")],
                args=[*self._limits, p.key_id],
            )
        except redis.RedisError as exc:
            if not self._redis_down:
                log.warning(
                    "api.rate_limits_off", error=str(exc), why="Redis does not answer; requests are let through"
                )
            self._redis_down = True
            return
        if self._redis_down:
            log.info("api.rate_limits_on")
            self._redis_down = False
        if wait_us:
            raise RateLimited(
                f"too many requests for key {p.key_id} or tenant {p.tenant}; retry after the Retry-After seconds",
                retry_after=max(1, int(-(-int(wait_us) // 1_000_000))),
            )

    def _count(self, counter: str, field: str) -> None:
        try:
            self.redis.hincrby(self.key(counter), field, 1)
        except redis.RedisError:
            pass

    def usage(self) -> dict[str, Any]:
        """Requests per key and failed authentications per key id, as counted in Redis."""
        uses = self.redis.hgetall(self.key("uses"))
        failures = self.redis.hgetall(self.key("auth_failures"))
        return {"uses": _ints(uses), "auth_failures": _ints(failures)}


def _ints(raw: Any) -> dict[str, int]:
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


def gate_of(request: Request) -> Gate:
    return request.app.state.gate


def require(scope: str) -> Any:
    """The dependency of an operation that needs `scope`: 401 without a good key, 403 without the scope."""

    def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Security(bearer, scopes=[scope]),
        gate: Gate = Depends(gate_of),
    ) -> Ctx:
        principal = gate.authenticate(request, credentials.credentials if credentials else None)
        if not principal.allows(scope):
            raise PermissionDenied(f"this key lacks the scope {scope!r}")
        return Ctx(principal, gate.store.for_tenant(principal.tenant), gate)

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    return Depends(dependency)
