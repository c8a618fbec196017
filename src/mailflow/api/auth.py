"""API room: who is calling and what they may do - bearer keys, scopes, rate limits.

`Gate.authenticate()` turns the `Authorization: Bearer mf_live_...` header into a Principal
(tenants/keys.py decides whether the key is good, from a row the key cache keeps for a few
seconds - api/keycache.py says why that leaves revocation immediate) and charges the request
to the key's and the tenant's rate limits. It runs on the event loop, as the dependencies do:
FastAPI would send a plain `def` dependency through its threadpool, a hop per request. `require(scope)` is the dependency every operation declares: it puts the
scope into the OpenAPI document (the auth test matrix reads it from there) and refuses a key
without it with 403.

Rate limits are GCRA (a token bucket without a refill timer) in one Redis script per request,
for the key and its tenant at once, timed by Redis's clock so that every API process agrees.
When Redis does not answer, requests are let through and the outage is logged once: the
limits protect the service, they are not what makes it correct.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import redis
import redis.asyncio as aredis
from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool
from redis.commands.core import AsyncScript
from starlette.concurrency import run_in_threadpool

from mailflow.api.idempotency import Forgetting
from mailflow.api.keycache import KeyCache
from mailflow.config import Settings
from mailflow.consumers import inline
from mailflow.errors import AuthenticationError, PermissionDenied, RateLimited
from mailflow.events.envelope import current_acting
from mailflow.events.keys import Keys
from mailflow.events.store import EventStore
from mailflow.infra.services import async_redis_client, open_async_pool, pool_conninfo, recover_pool
from mailflow.infra.tenancy import Scope
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
        with inline.reading(self.store, timeout_ms=self.gate.timeout_ms) as conn:
            yield conn

    async def read_one(self, query: str, **params: Any) -> dict[str, Any] | None:
        """One row of one query, read on the event loop in one round trip (inline.read_one):
        for the hottest reads, with no threadpool hop."""
        return await inline.read_one(self.gate.apool(), self.tenant, query, params, timeout_ms=self.gate.timeout_ms)


class Gate:
    def __init__(
        self,
        store: EventStore,
        r: redis.Redis,
        rkeys: Keys,
        settings: Settings,
        vault: Vault,
        *,
        redis_url: str | None = None,
    ) -> None:
        self.store = store
        self.vault = vault
        self.redis = r
        self.redis_url = redis_url
        self.rkeys = rkeys
        self.settings = settings
        self.forgetting = Forgetting(store, settings.api_idempotency_hours)
        self.cache = KeyCache(pool_conninfo(store.pool), ttl_s=settings.api_key_cache_s)
        self.lookups = 0
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()
        self._redis_down = False
        self._aredis: tuple[asyncio.AbstractEventLoop, aredis.Redis, AsyncScript] | None = None
        self._apool: AsyncConnectionPool | None = None
        self.timeout_ms = int(settings.api_timeout_s * 1000)
        s = settings
        self._limits = [
            int(1e6 / s.api_rate_per_key),
            int(1e6 / s.api_rate_per_key * s.api_burst_per_key),
            int(1e6 / s.api_rate_per_tenant),
            int(1e6 / s.api_rate_per_tenant * s.api_burst_per_tenant),
        ]

    def key(self, name: str) -> str:
        return f"{self.rkeys.prefix}:api:{name}"

    async def start(self) -> None:
        """On the serving loop: start hearing key changes (the key cache works only while it
        does), and open the loop's pool of PostgreSQL connections."""
        self.cache.start()
        self._apool = await open_async_pool(
            pool_conninfo(self.store.pool), scope=Scope.operator(), max_size=self.store.pool.max_size
        )

    def apool(self) -> AsyncConnectionPool:
        if self._apool is None:
            raise RuntimeError("the gate was not started on this event loop (Gate.start)")
        return self._apool

    async def recover(self) -> None:
        """After a request met PostgreSQL gone: drop the dead connections of both pools at once
        (they broke together), so that the next requests do not meet them one by one."""
        await run_in_threadpool(recover_pool, self.store.pool)
        if self._apool is not None:
            await self._apool.check()

    async def aclose(self) -> None:
        self.cache.close()
        if self._apool is not None:
            await self._apool.close()
            self._apool = None
        if self._aredis is not None:
            await self._aredis[1].aclose()
            self._aredis = None

    async def authenticate(self, request: Request, token: str | None) -> Principal:
        """The caller (cached for the request), or AuthenticationError / RateLimited.

        On the event loop: a key verified lately is judged from the key cache and charged to
        its rate limits with one Redis round trip; only a key not in the cache costs a
        PostgreSQL lookup, in the threadpool."""
        known = getattr(request.state, "principal", None)
        if known is not None:
            return known
        if not token:
            raise AuthenticationError("send an API key: Authorization: Bearer mf_live_...")
        client = getattr(request.state, "client_ip", None)
        digest = keys.digest(token)
        row = self.cache.get(digest)
        version = None
        if row is None:
            version = self.cache.version()
            row = await run_in_threadpool(self._row, token)
        try:
            principal = keys.judge(row, token, client, datetime.now(UTC))
        except AuthenticationError:
            key_id = keys.parse(token)
            await self._acount("auth_failures", key_id or "unknown")
            log.warning("api.auth_failed", key=key_id, client=client)
            raise
        if version is not None and row is not None:
            self.cache.put(digest, row, version)
        if self._touch_due(principal.key_id):
            await run_in_threadpool(self._touch, principal.key_id)
        await self._charge(principal)
        request.state.principal = principal
        now = current_acting()
        if now is not None:
            now.actor = principal.actor  # the actor of every event the request appends
        return principal

    def _row(self, token: str) -> dict[str, Any] | None:
        self.lookups += 1  # keys read from PostgreSQL by this process (the cache's misses)
        with self.store.pool.connection() as conn:
            return keys.row_for(conn, token)

    def _touch_due(self, key_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(key_id, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
                return False
            self._touched[key_id] = now
            return True

    def _touch(self, key_id: str) -> None:
        with self.store.pool.connection() as conn:
            keys.touch(conn, key_id)

    def _async_redis(self) -> tuple[aredis.Redis, AsyncScript]:
        """This event loop's client (a client belongs to the loop it first ran on)."""
        loop = asyncio.get_running_loop()
        if self._aredis is None or self._aredis[0] is not loop:
            if self.redis_url is None:
                raise redis.ConnectionError("the gate was built without a Redis address")
            client = async_redis_client(self.redis_url)
            self._aredis = (loop, client, client.register_script(_GCRA))
        return self._aredis[1], self._aredis[2]

    async def _charge(self, p: Principal) -> None:
        try:
            _, script = self._async_redis()
            wait_us = await script(
                keys=[self.key(f"rate:key:{p.key_id}"), self.key(f"rate:tenant:{p.tenant}"), self.key("uses")],
                args=[*self._limits, p.key_id],
            )
        except (redis.RedisError, OSError) as exc:
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

    async def _acount(self, counter: str, field: str) -> None:
        try:
            client, _ = self._async_redis()
            await client.hincrby(self.key(counter), field, 1)
        except (redis.RedisError, OSError):
            pass

    def usage(self) -> dict[str, Any]:
        """Requests per key and failed authentications per key id, as counted in Redis."""
        uses = self.redis.hgetall(self.key("uses"))
        failures = self.redis.hgetall(self.key("auth_failures"))
        return {"uses": _ints(uses), "auth_failures": _ints(failures)}


def _ints(raw: Any) -> dict[str, int]:
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


def require(scope: str) -> Any:
    """The dependency of an operation that needs `scope`: 401 without a good key, 403 without the scope."""

    async def dependency(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Ctx:
        gate: Gate = request.app.state.gate
        principal = await gate.authenticate(request, credentials.credentials if credentials else None)
        if not principal.allows(scope):
            raise PermissionDenied(f"this key lacks the scope {scope!r}")
        return Ctx(principal, gate.store.for_tenant(principal.tenant), gate)

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    dependency.mailflow_scope = scope  # type: ignore[attr-defined]  # for the OpenAPI document: scope_of()
    return Depends(dependency)


def scope_of(dependant: Dependant) -> str | None:
    """The scope a route's require() asks for (its OpenAPI security requirement names it).

    Declared with Depends(bearer), not Security(bearer, scopes=[...]): FastAPI would then
    derive the scopes of every dependency again on every request (its dependency cache keys
    carry them), for nothing, since require() checks the scope itself. The document still
    names the scope: app.application() puts it there from here."""
    for sub in dependant.dependencies:
        found = getattr(sub.call, "mailflow_scope", None) or scope_of(sub)
        if found:
            return found
    return None
