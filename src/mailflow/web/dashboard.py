"""Web room: the dashboard - `GET /dashboard` (the page), `GET /dashboard/data` (its numbers as
JSON) and the WebSocket `/dashboard/live` that moves them without a reload.

Every one of them needs a browser session (web/sessions.py) and shows only the session's
tenant: numbers are read on a connection scoped to that tenant (row-level security), and the
live feed forwards only that tenant's messages of the `<prefix>:metrics` channel.

The live feed: after the socket opens, the browser sends `{"type": "subscribe", "by", "range"}`
and gets a snapshot (runtime/dashboard.snapshot) - also after every reconnect, which is the
catch-up: a delta lost on pub/sub or while the socket was down is never a wrong number for
long. Then `delta` messages as events commit (the facts consumer publishes them, batched per
tenant), `queues` every QUEUES_EVERY_S, a fresh snapshot every SNAPSHOT_EVERY_S, and `ping` so that proxies keep the socket. The session
is looked up again every SESSION_CHECK_S: a logout or a revoked user closes the socket with
code 4401, and the page stops reconnecting. A socket opened from another site's page (its
Origin is not this site) is refused with 4403: cookies ride along on cross-site WebSockets.

One Redis subscription per process feeds every socket of it (MetricsHub); a socket whose
browser reads too slowly loses deltas (its queue is bounded) and is sent a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aredis
from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from mailflow.consumers import inline
from mailflow.events.keys import Keys
from mailflow.events.store import EventStore
from mailflow.infra.services import async_redis_client
from mailflow.log import get_logger
from mailflow.runtime import dashboard
from mailflow.web.sessions import SessionUser, current_user

HERE = Path(__file__).parent
STATIC = HERE / "static"
QUEUES_EVERY_S = 5.0
SNAPSHOT_EVERY_S = 30.0  # a fresh snapshot: the charts' and breakdowns' new buckets, any drift corrected
PING_EVERY_S = 25.0
SESSION_CHECK_S = 30.0
QUEUE_DEPTH = 256  # deltas waiting for one slow browser before it is resynchronised
SIGNED_OUT = 4401
CROSS_SITE = 4403
READ_TIMEOUT_MS = 10_000
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
log = get_logger("mailflow.web")

_jinja = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)


def _choice(value: str | None, allowed: tuple[str, ...], default: str) -> str:
    return value if value in allowed else default


def script_json(data: Any) -> Markup:
    """JSON to place inside <script type="application/json">: no `<` can end the element."""
    return Markup(orjson.dumps(data).decode().replace("<", "\\u003c"))


class MetricsHub:
    """One pub/sub subscription per process, fanned out to the sockets of each tenant."""

    def __init__(self, redis_url: str, keys: Keys) -> None:
        self.redis_url = redis_url
        self.channel = keys.metrics
        self._sockets: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._task: asyncio.Task[None] | None = None

    def join(self, tenant: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_DEPTH)
        self._sockets.setdefault(tenant, set()).add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen())
        return queue

    def leave(self, tenant: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        found = self._sockets.get(tenant)
        if found is not None:
            found.discard(queue)
            if not found:
                del self._sockets[tenant]

    def deliver(self, raw: bytes) -> None:
        try:
            message = orjson.loads(raw)
            tenant = message["tenant"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        for queue in self._sockets.get(tenant, ()):
            if queue.full():  # a browser that does not keep up: it gets a snapshot instead
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        queue.get_nowait()
                queue.put_nowait({"type": "resync"})
            else:
                queue.put_nowait(message)

    async def _listen(self) -> None:
        delay = 0.5
        while self._sockets:
            client: aredis.Redis | None = None
            try:
                client = async_redis_client(self.redis_url)
                async with client.pubsub() as ps:
                    await ps.subscribe(self.channel)
                    delay = 0.5
                    for queue in (q for qs in self._sockets.values() for q in qs):
                        queue.put_nowait({"type": "resync"})  # what was said while not listening is lost
                    while self._sockets:
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None and msg.get("type") == "message":
                            self.deliver(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: the browsers keep their numbers, resync later
                log.warning("web.metrics_subscription_lost", error=str(exc)[:200])
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.aclose()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class DashboardPages:
    def __init__(self, store: EventStore, hub: MetricsHub, site_hosts: list[str] | None = None) -> None:
        self.store = store
        self.hub = hub
        self.site_hosts = [h.lower() for h in site_hosts or []]

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/dashboard", self.page, methods=["GET"]),
            Route("/dashboard/data", self.data, methods=["GET"]),
            WebSocketRoute("/dashboard/live", self.live),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ]

    # -- numbers (in a thread, on the tenant's connection)

    def _snapshot(self, tenant: str, by: str, range_: str) -> dict[str, Any]:
        # One snapshot of the database for all its reads: the breakdowns agree with the counters.
        with inline.reading(self.store.for_tenant(tenant), timeout_ms=READ_TIMEOUT_MS, one_snapshot=True) as conn:
            return dashboard.snapshot(conn, tenant, by=by, range_=range_)  # type: ignore[arg-type]

    def _queues(self, tenant: str) -> list[dict[str, Any]]:
        with inline.reading(self.store.for_tenant(tenant), timeout_ms=READ_TIMEOUT_MS) as conn:
            return dashboard.queues(conn)

    @staticmethod
    def _view(params: Any) -> tuple[str, str]:
        by = _choice(params.get("by"), ("hour", "day"), "hour")
        range_ = _choice(params.get("range"), tuple(dashboard.RANGES), "24h")
        return by, range_

    # -- handlers

    async def page(self, request: Request) -> Response:
        user = await current_user(request)
        if user is None:
            return RedirectResponse("/login?next=/dashboard", status_code=303)
        by, range_ = self._view(request.query_params)
        snap = await run_in_threadpool(self._snapshot, user.tenant, by, range_)
        html = _jinja.get_template("dashboard.html").render(
            tenant=user.tenant, user=user.email, csrf=user.csrf_token, static="/static", snapshot_json=script_json(snap)
        )
        return HTMLResponse(html, headers=_page_headers())

    async def data(self, request: Request) -> Response:
        user = await current_user(request)
        if user is None:
            return JSONResponse({"error": "signed out"}, status_code=401, headers={"Cache-Control": "no-store"})
        by, range_ = self._view(request.query_params)
        snap = await run_in_threadpool(self._snapshot, user.tenant, by, range_)
        return Response(orjson.dumps(snap), media_type="application/json", headers={"Cache-Control": "no-store"})

    def _same_site(self, ws: WebSocket) -> bool:
        origin = ws.headers.get("origin")
        if origin is None:
            return True  # not a browser: the session cookie is what it must show
        host = (urlsplit(origin).netloc or "").lower()
        return host != "" and host in {ws.headers.get("host", "").lower(), *self.site_hosts}

    async def live(self, ws: WebSocket) -> None:
        if not self._same_site(ws):
            await ws.close(code=CROSS_SITE)
            return
        user = await current_user(ws)
        await ws.accept()
        if user is None:
            await ws.close(code=SIGNED_OUT, reason="signed out")
            return
        queue = self.hub.join(user.tenant)
        try:
            await self._serve(ws, user, queue)
        except WebSocketDisconnect:
            pass
        finally:
            self.hub.leave(user.tenant, queue)

    async def _serve(self, ws: WebSocket, user: SessionUser, queue: asyncio.Queue[dict[str, Any]]) -> None:
        view = {"by": "hour", "range": "24h"}
        loop = asyncio.get_running_loop()
        next_queues = next_ping = next_check = next_snapshot = loop.time()
        next_snapshot += SNAPSHOT_EVERY_S
        next_queues += QUEUES_EVERY_S
        next_ping += PING_EVERY_S
        next_check += SESSION_CHECK_S
        async for item in _merged(ws, queue):
            now = loop.time()
            if item is None:
                pass  # a tick
            elif item.get("type") in ("subscribe", "resync"):
                if item["type"] == "subscribe":
                    view["by"], view["range"] = self._view(item)
                next_snapshot = now + SNAPSHOT_EVERY_S
                await self._send(ws, await run_in_threadpool(self._snapshot, user.tenant, view["by"], view["range"]))
            elif "counters" in item and "tenant" in item:
                await self._send(ws, {"type": "delta", "at_ms": item.get("at_ms"), "counters": item["counters"]})
            if now >= next_snapshot:
                next_snapshot = now + SNAPSHOT_EVERY_S
                await self._send(ws, await run_in_threadpool(self._snapshot, user.tenant, view["by"], view["range"]))
            if now >= next_queues:
                next_queues = now + QUEUES_EVERY_S
                await self._send(ws, {"type": "queues", "queues": await run_in_threadpool(self._queues, user.tenant)})
            if now >= next_ping:
                next_ping = now + PING_EVERY_S
                await self._send(ws, {"type": "ping"})
            if now >= next_check:
                next_check = now + SESSION_CHECK_S
                still = await current_user(ws)
                if still is None or still.session_id != user.session_id:
                    await ws.close(code=SIGNED_OUT, reason="signed out")
                    return

    @staticmethod
    async def _send(ws: WebSocket, message: dict[str, Any]) -> None:
        await ws.send_text(orjson.dumps(message).decode())


async def _merged(ws: WebSocket, queue: asyncio.Queue[dict[str, Any]]) -> AsyncIterator[dict[str, Any] | None]:
    """What the browser says (its subscribe messages), what the hub forwards, and a tick every
    second (None), as one stream; ends when the browser goes."""
    incoming: asyncio.Task[Any] = asyncio.ensure_future(ws.receive_text())
    forwarded: asyncio.Task[Any] = asyncio.ensure_future(queue.get())
    try:
        while True:
            done, _ = await asyncio.wait({incoming, forwarded}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                yield None
                continue
            if incoming in done:
                text = incoming.result()  # raises WebSocketDisconnect when the browser is gone
                incoming = asyncio.ensure_future(ws.receive_text())
                try:
                    said = orjson.loads(text)
                except orjson.JSONDecodeError:
                    said = None
                if isinstance(said, dict) and said.get("type") == "subscribe":
                    yield said
            if forwarded in done:
                yield forwarded.result()
                forwarded = asyncio.ensure_future(queue.get())
    finally:
        for task in (incoming, forwarded):
            task.cancel()


def _page_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }
