"""API room: errors as RFC 9457 problem details (`application/problem+json`).

Every error a client can see is one of these: mailflow's error hierarchy (errors.py, each
kind with its HTTP status), request validation (422 with the fields at fault), unknown paths
and methods, rate limits (429 with Retry-After), and anything unexpected (500, with the
request id to quote, never a traceback).
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
import psycopg
import redis
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from mailflow.errors import MailflowError, RateLimited
from mailflow.infra.services import POSTGRES_OUTAGE, is_postgres_outage, is_redis_outage
from mailflow.log import get_logger

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://mailflow.dev/problems/"

log = get_logger("mailflow.api")


class Problem(BaseModel):
    """RFC 9457 problem details. `errors` lists the fields at fault (422); `request_id` is
    the X-Request-Id of the request, to quote when asking for help."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    request_id: str | None = None
    errors: list[dict[str, Any]] | None = None


def _slug(exc: BaseException) -> str:
    name = type(exc).__name__
    return "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-").removesuffix("-error")


def problem(
    request: Request | None,
    status: int,
    detail: str | None = None,
    *,
    type_: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    body: dict[str, Any] = {
        "type": TYPE_BASE + type_ if type_ else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if request is not None:
        body["instance"] = request.url.path
        rid = getattr(request.state, "request_id", None)
        if rid:
            body["request_id"] = rid
    body.update({k: v for k, v in extra.items() if v is not None})
    return Response(orjson.dumps(body), status_code=status, media_type=MEDIA_TYPE, headers=headers)


async def _mailflow_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MailflowError)
    status = exc.http_status
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="mailflow"'
    if status >= 500:
        log.warning("api.error", status=status, error=str(exc), kind=type(exc).__name__)
        # A setting the operator must fix is not the client's business.
        detail = str(exc) if status == 503 else "the server could not handle the request"
        return problem(request, status, detail, type_=_slug(exc), headers=headers)
    return problem(request, status, str(exc), type_=_slug(exc), headers=headers)


def _field(loc: Any) -> str:
    return ".".join(str(p) for p in loc if p not in ("body",)) or "body"


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(e.get("loc", ())), "in": str((e.get("loc") or ["body"])[0]), "message": e.get("msg", "")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": "body", "message": "invalid"}
    return problem(request, 422, f"{first['field']}: {first['message']}", type_="invalid-request", errors=errors)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return problem(request, exc.status_code, exc.detail if isinstance(exc.detail, str) else None, headers=exc.headers)


RETRY_AFTER_OUTAGE_S = 1


async def _outage(request: Request, exc: Exception) -> Response:
    """PostgreSQL or Redis went away under a request: 503 with Retry-After, never a 500.

    The request's unit of work was one transaction, rolled back with the connection, so
    nothing of it stays; the pool is cleared of the connections that broke together with
    this one, and the client's retry gets a working one (or, during an outage, another 503)."""
    retry = {"Retry-After": str(RETRY_AFTER_OUTAGE_S)}
    if isinstance(exc, psycopg.errors.QueryCanceled):  # MAILFLOW_API_TIMEOUT_S
        log.warning("api.timeout", path=request.url.path, error=str(exc))
        return problem(request, 503, "the request took too long and was cancelled", type_="timeout", headers=retry)
    service = "PostgreSQL" if is_postgres_outage(exc) else "Redis"
    log.warning("api.unavailable", service=service, path=request.url.path, error=str(exc), kind=type(exc).__name__)
    gate = getattr(request.app.state, "gate", None)
    if gate is not None and service == "PostgreSQL":
        await gate.recover()
    detail = f"{service} is not answering; nothing was done, retry after the Retry-After seconds"
    return problem(request, 503, detail, type_="service-unavailable", headers=retry)


async def _unexpected(request: Request, exc: Exception) -> Response:
    """Anything else: 500 with the request id, the traceback only in the log. Also the
    handler of the outage exceptions, which Starlette finds by class (and of any raised
    outside the routes, in a middleware, which reach it as Exception)."""
    if is_postgres_outage(exc) or is_redis_outage(exc):
        return await _outage(request, exc)
    log.error("api.unexpected", path=request.url.path, error=str(exc), exc_info=exc)
    return problem(request, 500, "the server could not handle the request; quote the request_id when reporting it")


def install(app: FastAPI) -> None:
    app.add_exception_handler(MailflowError, _mailflow_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for outage in (*POSTGRES_OUTAGE, redis.ConnectionError, redis.TimeoutError):
        app.add_exception_handler(outage, _unexpected)
    app.add_exception_handler(Exception, _unexpected)


# The problems every authenticated operation may answer with, for the OpenAPI document.
def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        s: {"model": Problem, "description": HTTPStatus(s).phrase, "content": {MEDIA_TYPE: {}}}
        for s in sorted({400, 401, 403, 413, 422, 429, *statuses})
    }
