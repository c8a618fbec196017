"""API room: `Idempotency-Key` - a POST repeated with the same key returns the first response
instead of acting again; the same key with a different body is 422.

The first request claims the key (a row with no response yet) in a transaction of its own
before it acts, so two copies sent at once cannot both act: the second gets 409 while the
first runs. A response below 500 is kept for MAILFLOW_API_IDEMPOTENCY_HOURS; a 5xx, or an
error, frees the key so the client can retry. A claim whose process died is taken over once
it is older than twice the request timeout. Kept answers are encrypted with the master
keyring (they can hold a secret that is shown once).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from fastapi.routing import APIRoute
from psycopg.rows import dict_row
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, get_route_path
from starlette.types import Scope

from mailflow.api import queries as q
from mailflow.api.problems import problem
from mailflow.consumers import inline
from mailflow.events.store import EventStore
from mailflow.infra.vault import Keyring
from mailflow.log import get_logger

log = get_logger("mailflow.api")

HEADER = "idempotency-key"
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_KEPT_HEADERS = ("location", "content-type")


@dataclass(frozen=True)
class Claim:
    outcome: str  # new | replay | mismatch | running
    status: int | None = None
    body: bytes | None = None
    headers: dict[str, str] | None = None


def body_hash(method: str, path: str, body: bytes) -> bytes:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).digest()


def claim(
    store: EventStore, keyring: Keyring, key: str, method: str, path: str, digest: bytes, stale_s: float
) -> Claim:
    with inline.reading(store) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            q.CLAIM_IDEMPOTENCY_KEY,
            {"tenant": store.tenant, "key": key, "method": method, "path": path, "hash": digest, "stale": stale_s},
        ).fetchone()
        if row is not None and row["claimed"]:
            return Claim("new")
        row = cur.execute(q.GET_IDEMPOTENCY_KEY, {"key": key}).fetchone()
    if row is None:  # freed between the two statements
        return Claim("running")
    if bytes(row["body_hash"]) != digest:
        return Claim("mismatch")
    if row["status"] is None:
        return Claim("running")
    return Claim("replay", row["status"], keyring.decrypt(bytes(row["response"])), row["headers"] or {})


def keep(store: EventStore, keyring: Keyring, key: str, response: Response) -> None:
    """Keep the answer, encrypted with the master keyring: an answer can hold a secret shown
    once (a new API key, a webhook's signing secret), which must not lie in a table in clear."""
    headers = {k: v for k, v in response.headers.items() if k in _KEPT_HEADERS}
    with inline.reading(store) as conn:
        conn.execute(
            q.KEEP_IDEMPOTENT_RESPONSE,
            {
                "key": key,
                "status": response.status_code,
                "body": keyring.encrypt(bytes(response.body)),
                "headers": orjson.dumps(headers).decode(),
            },
        )


def free(store: EventStore, key: str) -> None:
    with inline.reading(store) as conn:
        conn.execute(q.FREE_IDEMPOTENCY_KEY, {"key": key})


def forget_expired(conn: psycopg.Connection, hours: int) -> int:
    """Delete keys older than `hours` (every tenant's: an operator's connection)."""
    return conn.execute(q.FORGET_IDEMPOTENCY_KEYS, {"hours": hours}).rowcount


class Forgetting:
    """Expired keys are deleted by the API processes themselves, at most once per `every_s`
    per process, on the way of a request that uses a key (no timer thread to supervise)."""

    def __init__(self, store: EventStore, hours: int, every_s: float = 3600.0) -> None:
        self.store, self.hours, self.every_s = store, hours, every_s
        self._next = 0.0
        self._lock = threading.Lock()

    def due(self) -> bool:
        """Whether maybe() would do anything (asked on the event loop, to spare a threadpool hop)."""
        return time.monotonic() >= self._next

    def maybe(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                return
            self._next = now + self.every_s
        with self.store.pool.connection() as conn:
            forget_expired(conn, self.hours)


class IdempotentRoute(APIRoute):
    """A route whose POSTs honour Idempotency-Key (every POST route of the API uses it).

    It also refuses a request whose path does not start with the literal part of its own
    (`/campaigns/` of `/campaigns/{campaign_id}`) before trying its regex: the router tries
    the routes in order until one matches, and of the seventy-odd routes most fail on their
    first characters. This holds for routes added to the application as they are
    (routing.add_routes), which is how the API adds them: no included router's prefix applies."""

    def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)
        self.literal_prefix = path.split("{", 1)[0]

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and not get_route_path(scope).startswith(self.literal_prefix):
            return Match.NONE, {}
        return super().matches(scope)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            key = request.headers.get(HEADER)
            if request.method != "POST" or key is None:
                return await handler(request)
            if not _KEY.match(key):
                return problem(
                    request, 422, "Idempotency-Key must be 1 to 255 printable ASCII characters", type_="invalid-request"
                )
            gate = request.app.state.gate
            auth = request.headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            principal = await gate.authenticate(request, token)
            store = gate.store.for_tenant(principal.tenant)
            digest = body_hash(request.method, request.url.path, await request.body())
            stale = 2 * gate.settings.api_timeout_s
            if gate.forgetting.due():
                await run_in_threadpool(gate.forgetting.maybe)
            keyring = gate.vault.keyring
            found = await run_in_threadpool(claim, store, keyring, key, request.method, request.url.path, digest, stale)
            if found.outcome == "mismatch":
                return problem(
                    request,
                    422,
                    "this Idempotency-Key was used with a different request body",
                    type_="idempotency-mismatch",
                )
            if found.outcome == "running":
                return problem(
                    request,
                    409,
                    "a request with this Idempotency-Key is still running; retry shortly",
                    type_="idempotency-running",
                    headers={"Retry-After": "1"},
                )
            if found.outcome == "replay":
                headers = {**(found.headers or {}), "Idempotent-Replayed": "true"}
                media = headers.pop("content-type", None)
                return Response(found.body, status_code=found.status or 200, headers=headers, media_type=media)
            try:
                response = await handler(request)
            except BaseException as exc:
                try:
                    await run_in_threadpool(free, store, key)
                except psycopg.Error as also:  # PostgreSQL away: the claim goes stale instead
                    log.warning("api.idempotency_claim_kept", error=str(also), stale_after_s=stale)
                    raise exc from None
                raise
            if response.status_code >= 500:
                await run_in_threadpool(free, store, key)
            else:
                await run_in_threadpool(keep, store, keyring, key, response)
            return response

        return route
