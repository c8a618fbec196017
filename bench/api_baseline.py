"""The baseline server of bench/api.py: mailflow web's stack answering a constant JSON body.

The same layers as `mailflow web` in front of an operation - uvicorn with the same settings,
the outer Starlette router with /api/v1 mounted, FastAPI, mailflow's RequestContext
middleware (request id, security headers, body limit, correlation id) - and an operation
that does nothing but return the bytes of --body-file (bench/api.py passes the body of a
real `GET /api/v1/campaigns/{id}`, so that both answer as many bytes):

    GET /api/v1/constant        an `async def` operation (no thread hop)
    GET /api/v1/constant-sync   a `def` operation, run in the threadpool as mailflow's are

Run one process per core with --shared-port (SO_REUSEPORT), as `mailflow web --processes N`:

    python bench/api_baseline.py --port 8099 --body-file body.json --shared-port
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from mailflow.api.app import PREFIX
from mailflow.api.middleware import RequestContext, TrustedProxies
from mailflow.config import load_settings
from mailflow.infra.lifecycle import stop_on_signals
from mailflow.infra.net import listen
from mailflow.web.app import server_config


def create_app(body: bytes) -> Starlette:
    settings = load_settings()
    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @api.get("/constant")
    async def constant() -> Response:
        return Response(body, media_type="application/json")

    @api.get("/constant-sync")
    def constant_sync() -> Response:
        return Response(body, media_type="application/json")

    api.add_middleware(
        RequestContext,
        proxies=TrustedProxies(settings.api_trusted_proxies),
        max_body=settings.api_max_body_bytes,
        large_bodies={"/contacts/import": settings.api_max_import_bytes},
        docs_paths=("/docs",),
    )

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"]), Mount(PREFIX, app=api)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--body-file", type=Path, required=True, help="the JSON body every answer carries")
    ap.add_argument("--shared-port", action="store_true", help="SO_REUSEPORT: several processes on one port")
    args = ap.parse_args(argv)
    app = create_app(args.body_file.read_bytes())
    sock = listen(args.host, args.port, shared=args.shared_port)
    stop_on_signals()  # as mailflow web: uvicorn re-raises SIGTERM under this handler, exit 0
    try:
        uvicorn.Server(server_config(app, lifespan="off")).run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
