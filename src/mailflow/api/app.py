"""API room: the FastAPI application served under /api/v1 by `mailflow web`.

Built from a Runtime (no global state): the gate (auth + rate limits) on the operator's store,
the middleware every request goes through, problem+json for every error, the routers of the
services, the OpenAPI 3.1 document at /api/v1/openapi.json and interactive docs at
/api/v1/docs (Swagger UI served from the package, no CDN). The documents and the docs page
are public; every operation needs a key (the auth matrix test walks the document to prove it).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.routing import APIRoute
from starlette.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from mailflow.api import problems
from mailflow.api.auth import Gate, scope_of
from mailflow.api.middleware import RequestContext, TrustedProxies
from mailflow.api.routes import (
    campaigns,
    contacts,
    domains,
    inbound,
    keys,
    messages,
    senders,
    suppressions,
    webhooks,
)
from mailflow.api.routing import add_routes, operation_id
from mailflow.config import Settings
from mailflow.events.catalog import render
from mailflow.runtime.catalog import asyncapi_document
from mailflow.runtime.wiring import Runtime

PREFIX = "/api/v1"
ROUTERS = (
    messages.router,
    keys.router,
    domains.router,
    senders.router,
    inbound.router,
    webhooks.router,
    contacts.router,
    campaigns.router,
    suppressions.router,
)

DESCRIPTION = """\
mailflow's HTTP API. Authenticate with an API key (`mailflow keys create`):
`Authorization: Bearer mf_live_...`. Each operation names the scope it needs.

Errors are `application/problem+json` (RFC 9457). Listings are cursor-paginated
(`limit`, `cursor` -> `next_cursor`). A POST with an `Idempotency-Key` header is done once:
a repeat returns the first response (`Idempotent-Replayed: true`), a repeat with another body
is 422. `X-Request-Id` (generated when absent) is echoed, and is the `correlation_id` of every
event the request appends. Rate limits answer 429 with `Retry-After`.
"""


def create_api(rt: Runtime) -> FastAPI:
    """The API of a runtime: its gate authenticates on the runtime's (operator's) store."""
    api = application(rt.settings)
    api.state.gate = Gate(rt.store, rt.redis, rt.keys, rt.settings, rt.vault, redis_url=rt.services.redis_url)
    return api


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document, built without any server."""
    return application(Settings()).openapi()


def openapi_bytes() -> bytes:
    """The document as docs/openapi.json holds it (scripts/write-contracts writes it)."""
    return orjson.dumps(openapi_document(), option=orjson.OPT_INDENT_2) + b"\n"


def _name_scopes_in_the_document(api: FastAPI) -> None:
    """Each operation's security requirement names the scope its require() checks (auth.scope_of)."""
    build = api.openapi  # builds the document once, then returns the one it keeps

    def openapi() -> dict[str, Any]:
        fresh = api.openapi_schema is None
        document = build()
        if fresh:
            for route in api.routes:
                if isinstance(route, APIRoute) and route.include_in_schema and (scope := scope_of(route.dependant)):
                    for method in route.methods or ():
                        operation = document["paths"][route.path_format][method.lower()]
                        operation["security"] = [{name: [scope] for name in req} for req in operation["security"]]
        return document

    api.openapi = openapi  # type: ignore[method-assign]


def application(settings: Settings) -> FastAPI:
    """Routes, error handlers and middleware; no connection to anything (create_api adds the gate)."""
    api = FastAPI(
        title="mailflow",
        version="1",
        summary="An event-sourced, self-hosted email pipeline",
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=operation_id,
        # mailflow exports no OpenTelemetry; off, FastAPI skips asking the global providers
        # (environment lookups) on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    problems.install(api)
    add_routes(api, ROUTERS)
    _name_scopes_in_the_document(api)

    static = files("mailflow.api").joinpath("static")
    api.mount("/static", StaticFiles(directory=str(static)), name="static")

    @api.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=f"{PREFIX}/openapi.json",
            title="mailflow API",
            swagger_js_url=f"{PREFIX}/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{PREFIX}/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="data:,",
        )

    @api.get("/asyncapi.json", include_in_schema=False)
    def asyncapi() -> Response:
        """The AsyncAPI 3 document of the Redis streams, pub/sub channels and webhooks (docs/asyncapi.json)."""
        return Response(render(asyncapi_document(settings.redis_prefix)), media_type="application/json")

    if settings.api_cors_origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api_cors_origins,
            allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After", "Idempotent-Replayed", "Location"],
        )
    api.add_middleware(
        RequestContext,
        proxies=TrustedProxies(settings.api_trusted_proxies),
        max_body=settings.api_max_body_bytes,
        large_bodies={"/contacts/import": settings.api_max_import_bytes},
        docs_paths=("/docs",),
    )
    return api
