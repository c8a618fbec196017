"""Web room: the Starlette app (built from a Runtime, no global state) and the uvicorn server behind `mailflow web`.

Routes: `GET|POST <path>/{token}` (the unsubscribe pages; <path> is the path of
MAILFLOW_UNSUBSCRIBE_BASE_URL, "/unsubscribe" when it is unset), the login and account pages,
the dashboard (`/dashboard`, `/dashboard/data`, the WebSocket `/dashboard/live`, `/static/`),
the open pixel and click redirects (`/t/o/{token}`, `/t/c/{token}`, under the path of
MAILFLOW_TRACKING_BASE_URL: web/tracking.py),
the HTTP API under /api/v1 and `GET /healthz`.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal
from urllib.parse import urlsplit

import psycopg
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from mailflow.api.app import PREFIX, create_api
from mailflow.api.middleware import TrustedProxies
from mailflow.api.problems import problem
from mailflow.errors import ConfigurationError
from mailflow.events.store import EventStore
from mailflow.infra.health import Health
from mailflow.infra.lifecycle import stop_on_signals
from mailflow.infra.net import listen
from mailflow.log import get_logger
from mailflow.runtime.wiring import Runtime
from mailflow.web.dashboard import DashboardPages, MetricsHub
from mailflow.web.preferences import PreferencesPages
from mailflow.web.sessions import STATE_KEY, SessionPages
from mailflow.web.tracking import TrackingPages, tracking_path
from mailflow.web.unsubscribe import UnsubscribePages

DEFAULT_UNSUBSCRIBE_PATH = "/unsubscribe"
HEALTH_DB_TIMEOUT_S = 5.0
GRACEFUL_SHUTDOWN_S = 10  # in-flight requests get this long after SIGTERM (the unit allows 30 s)

log = get_logger("mailflow.web")


def unsubscribe_path(base_url: str | None) -> str:
    """The path the unsubscribe pages are served under: that of the links mailflow puts in messages."""
    if not base_url:
        return DEFAULT_UNSUBSCRIBE_PATH
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(
            f"bad setting MAILFLOW_UNSUBSCRIBE_BASE_URL: {base_url!r} is not an absolute URL; "
            "use one like https://mail.example.org/unsubscribe"
        )
    return parts.path.rstrip("/")


def preferences_path(unsubscribe_base_url: str | None, preferences_base_url: str | None) -> str:
    """The path of the preferences pages: that of the links in messages (default /preferences)."""
    if preferences_base_url:
        parts = urlsplit(preferences_base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(
                f"bad setting MAILFLOW_PREFERENCES_BASE_URL: {preferences_base_url!r} is not an absolute URL; "
                "use one like https://mail.example.org/preferences"
            )
        return parts.path.rstrip("/") or "/preferences"
    return "/preferences"


def _database_ok(store: EventStore) -> str | None:
    """None if PostgreSQL answers through the pool, else why not (one line)."""
    try:
        with store.pool.connection(timeout=HEALTH_DB_TIMEOUT_S) as conn:
            conn.execute("SELECT 1").fetchone()
    except psycopg.Error as exc:  # also psycopg_pool's PoolTimeout
        return " ".join(str(exc).split())[:300] or type(exc).__name__
    return None


def create_app(rt: Runtime, *, secret: bytes | list[bytes] | None = None, health: Health | None = None) -> Starlette:
    """The app. It opens the runtime's pool now, so a database that is unreachable or not
    migrated stops `mailflow web` at start with one line, not at the first click."""
    settings = rt.settings
    path = unsubscribe_path(settings.unsubscribe_base_url)
    if secret is None:
        secret = rt.keyring.verifying_keys  # links signed before a key rotation still work
    store = rt.store
    pages = UnsubscribePages(store, secret)
    prefs = PreferencesPages(store, secret)
    prefs_path = preferences_path(settings.unsubscribe_base_url, settings.preferences_base_url)
    keys = secret if isinstance(secret, list) else [secret]
    tracked = TrackingPages(
        store, keys, TrustedProxies(settings.api_trusted_proxies), path=tracking_path(settings.tracking_base)
    )

    async def healthz(request: Request) -> JSONResponse:
        problem = await run_in_threadpool(_database_ok, store)
        if health is not None:
            health.beat()
            if problem is None:
                health.ok("postgres")
            else:
                health.lost("postgres", problem)
        if problem is not None:
            return JSONResponse({"ok": False, "database": "unavailable", "error": problem}, status_code=503)
        return JSONResponse({"ok": True, "database": "ok", "unsubscribe_path": path or "/"})

    async def not_found(request: Request, exc: Exception) -> Response:
        # A path under the API that no route of it takes (one with a newline is not even
        # routed into it) is a problem+json 404 like every other API error.
        if request.url.path.startswith(PREFIX + "/"):
            return problem(request, 404, "no such API path")
        return PlainTextResponse("Not Found", status_code=404)

    api = create_api(rt)
    gate = api.state.gate

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gate.start()  # the key cache hears key changes from now on
        try:
            yield
        finally:
            await hub.aclose()
            await gate.aclose()

    sessions = SessionPages(store, rt.keyring, settings)
    hub = MetricsHub(rt.services.redis_url, rt.keys)
    board = DashboardPages(store, hub, sessions.hosts)
    app = Starlette(
        lifespan=lifespan,
        exception_handlers={404: not_found},
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Mount(PREFIX, app=api),
            Route(f"{path}/{{token}}", pages.confirm, methods=["GET"]),
            Route(f"{path}/{{token}}", pages.unsubscribe, methods=["POST"]),
            Route(f"{prefs_path}/{{token}}", prefs.get, methods=["GET"]),
            Route(f"{prefs_path}/{{token}}", prefs.post, methods=["POST"]),
            *tracked.routes(),
            *sessions.routes(),
            *board.routes(),
        ],
    )
    app.state.gate = gate
    setattr(app.state, STATE_KEY, sessions)  # web.sessions.current_user() finds the pages here
    return app


def server_config(app: ASGIApp, *, lifespan: Literal["on", "off"] = "on") -> uvicorn.Config:
    """How mailflow runs uvicorn: `mailflow web`, the tests' servers and the benchmark's baseline.

    uvloop and httptools are used (uvicorn picks them when installed; mailflow depends on
    both): the event loop and the HTTP parser are most of what a small request costs."""
    return uvicorn.Config(
        app,
        lifespan=lifespan,
        loop="auto",
        http="auto",
        log_config=None,  # mailflow logs through structlog
        access_log=False,  # request paths carry tokens, which name an address
        server_header=False,
        # Forwarding headers are believed only from MAILFLOW_API_TRUSTED_PROXIES (api/middleware.py);
        # uvicorn's own handling would believe any X-Forwarded-For from 127.0.0.1.
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def serve(
    rt: Runtime,
    host: str,
    port: int,
    *,
    health: Health | None = None,
    shared: bool = False,
    stop: threading.Event | None = None,
) -> None:
    """Serve the app until SIGTERM or SIGINT (or `stop` is set: the supervisor of `mailflow web
    --processes N` is gone), then finish the requests in flight and return. `shared`: several
    processes listen on the port (SO_REUSEPORT)."""
    app = create_app(rt, health=health)
    sock = listen(host, port, shared=shared)
    # uvicorn handles SIGTERM/SIGINT itself, shuts down gracefully, then raises the signal
    # again under the handler it found. Ours only sets a flag, so the process exits 0.
    stop_on_signals()
    server = uvicorn.Server(server_config(app))
    if stop is not None:

        def watch() -> None:
            stop.wait()
            server.should_exit = True  # as on SIGTERM: finish the requests in flight

        threading.Thread(target=watch, name="mailflow-web-stop", daemon=True).start()
    bound_host, bound_port = sock.getsockname()[:2]
    log.info(
        "web.start",
        host=bound_host,
        port=bound_port,
        unsubscribe=f"{unsubscribe_path(rt.settings.unsubscribe_base_url)}/{{token}}",
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    log.info("web.stop")
