"""API room, infra service: a tenant's webhook endpoints (`mailflow webhooks`): add, list, get,
disable, enable, remove, their delivery attempts, and a signed test POST.

Everything is inbound/webhooks.py's, as the CLI calls it: its address guard refuses a URL
that is, or resolves to, a loopback, private or link-local address at `add` and again before
every POST (MAILFLOW_WEBHOOKS_ALLOW_PRIVATE allows them). An endpoint's signing secret
(whsec_...) is in the response that creates it, and never again.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import Path, Request
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from mailflow.api import queries as q
from mailflow.api.auth import Ctx, require
from mailflow.api.models import Body, Deleted
from mailflow.api.pagination import CursorQuery, LimitQuery, Page, keyset, page
from mailflow.api.problems import responses
from mailflow.api.routing import service_router
from mailflow.errors import UserError
from mailflow.inbound import webhooks

router = service_router(tags=["webhooks"])

Kind = Literal["bounce", "delayed", "complaint", "auto_reply", "unsubscribe", "reply", "other"]
EndpointId = Path(
    min_length=1, max_length=64, pattern=r"^[A-Za-z0-9]+$", description="An endpoint's id (8 hex digits)."
)
MAX_INT32 = 2**31 - 1


class WebhookEndpointRequest(Body):
    url: str = Field(
        min_length=8,
        max_length=2000,
        pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://[^\x00-\x20\x7f]+$",
        description="An http:// or https:// URL without credentials or secret-looking query parameters; not a "
        "loopback, private or link-local address.",
    )
    events: list[Kind | Literal["all"]] = Field(
        min_length=1, max_length=8, description="The kinds of classified mail it takes, or `all`."
    )


class WebhookEndpoint(BaseModel):
    id: str
    url: str
    events: list[Kind]
    status: Literal["active", "disabled"]
    disabled_reason: str | None
    disabled_at: datetime | None
    fingerprint: str = Field(description="The signing secret's fingerprint (never the secret).")
    failure_streak: int
    failing_since: datetime | None
    last_success_at: datetime | None
    created_at: datetime


class NewWebhookEndpoint(WebhookEndpoint):
    secret: str = Field(description="The signing secret (whsec_...): shown this once, kept only in the vault.")


class WebhookAttempt(BaseModel):
    at: datetime
    endpoint_id: str
    delivery_id: uuid.UUID
    type: str = Field(description="The payload's type: reply.received, bounce.detected, ..., webhook.test.")
    attempt: int
    outcome: Literal["done", "retry", "final"]
    status: int | None = Field(description="The HTTP status; null: no answer.")
    error: str | None
    duration_ms: int | None


class WebhookTestAnswer(BaseModel):
    endpoint_id: str
    delivery_id: uuid.UUID
    outcome: Literal["done", "final"]
    status: int | None = Field(description="The receiver's HTTP status; null: no answer.")
    error: str
    duration_ms: int | None


def _out(e: webhooks.Endpoint) -> WebhookEndpoint:
    return WebhookEndpoint.model_validate(vars(e))


def _bad_cursor() -> UserError:
    return UserError("cursor is not one this API gave out")


def _instant(text: Any) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise _bad_cursor() from None


@router.post("/webhooks", status_code=201, response_model=NewWebhookEndpoint, responses=responses())
def add_endpoint(
    body: WebhookEndpointRequest, request: Request, ctx: Ctx = require("webhooks:write")
) -> NewWebhookEndpoint:
    """Add an endpoint - as `mailflow webhooks add`. Its signing secret (whsec_...) is in this
    response only: give it to the receiver, which verifies the webhook-signature header with it.
    A URL at (or resolving to) a loopback, private or link-local address is 422."""
    kinds = webhooks.parse_kinds(",".join(body.events))
    guard = webhooks.guard_for(ctx.gate.settings)
    found, secret = webhooks.add_endpoint(ctx.store, ctx.gate.vault, guard, body.url, kinds)
    return NewWebhookEndpoint.model_validate({**vars(found), "secret": secret})


@router.get("/webhooks", response_model=Page[WebhookEndpoint], responses=responses())
def list_endpoints(
    ctx: Ctx = require("webhooks:read"), limit: int = LimitQuery, cursor: str | None = CursorQuery
) -> Page[WebhookEndpoint]:
    """The tenant's endpoints, oldest first: URL, events, status (and why disabled), failure streak."""
    after = keyset(cursor, str, str)
    params = {"after_at": _instant(after[0]) if after else None, "after_id": after[1] if after else None}
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.WEBHOOK_ENDPOINTS_PAGE, {**params, "limit": limit + 1}).fetchall()
    items, next_cursor = page(rows, limit, lambda r: [r["created_at"].isoformat(), r["id"]])
    return Page[WebhookEndpoint](items=[WebhookEndpoint.model_validate(r) for r in items], next_cursor=next_cursor)


@router.get("/webhooks/{endpoint_id}", response_model=WebhookEndpoint, responses=responses(404))
def get_endpoint(endpoint_id: str = EndpointId, ctx: Ctx = require("webhooks:read")) -> WebhookEndpoint:
    """One endpoint (never its secret)."""
    with ctx.reading() as conn:
        return _out(webhooks.endpoint(conn, endpoint_id))


@router.post("/webhooks/{endpoint_id}/disable", response_model=WebhookEndpoint, responses=responses(404))
def disable_endpoint(endpoint_id: str = EndpointId, ctx: Ctx = require("webhooks:write")) -> WebhookEndpoint:
    """Stop delivering to the endpoint; its pending deliveries are cancelled (a no-op if disabled)."""
    return _out(webhooks.disable_endpoint(ctx.store, endpoint_id, reason=f"disabled by {ctx.principal.actor}"))


@router.post("/webhooks/{endpoint_id}/enable", response_model=WebhookEndpoint, responses=responses(404))
def enable_endpoint(endpoint_id: str = EndpointId, ctx: Ctx = require("webhooks:write")) -> WebhookEndpoint:
    """Deliver to the endpoint again: the events classified from now on (its failure streak starts over)."""
    return _out(webhooks.enable_endpoint(ctx.store, endpoint_id))


@router.delete("/webhooks/{endpoint_id}", response_model=Deleted, responses=responses(404))
def remove_endpoint(request: Request, endpoint_id: str = EndpointId, ctx: Ctx = require("webhooks:write")) -> Deleted:
    """Remove the endpoint, its deliveries and its secret."""
    webhooks.remove_endpoint(ctx.store, ctx.gate.vault, endpoint_id)
    return Deleted()


@router.get("/webhooks/{endpoint_id}/deliveries", response_model=Page[WebhookAttempt], responses=responses(404))
def list_attempts(
    endpoint_id: str = EndpointId,
    ctx: Ctx = require("webhooks:read"),
    limit: int = LimitQuery,
    cursor: str | None = CursorQuery,
) -> Page[WebhookAttempt]:
    """Every delivery attempt to the endpoint, newest first: when, the delivery (its webhook-id
    is msg_<delivery_id without dashes>), the attempt's number, the status or error."""
    after = keyset(cursor, str, str, int)
    params: dict[str, Any] = {"after_at": None, "after_delivery": None, "after_attempt": None}
    if after is not None:
        try:
            delivery = uuid.UUID(after[1])
        except ValueError:
            raise _bad_cursor() from None
        if not 0 <= after[2] <= MAX_INT32:
            raise _bad_cursor()
        params = {"after_at": _instant(after[0]), "after_delivery": delivery, "after_attempt": after[2]}
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        found = webhooks.endpoint(conn, endpoint_id)  # 404 for one that is not the tenant's
        rows = cur.execute(q.WEBHOOK_ATTEMPTS_PAGE, {**params, "endpoint": found.id, "limit": limit + 1}).fetchall()
    items, next_cursor = page(rows, limit, lambda r: [r["at"].isoformat(), str(r["delivery_id"]), r["attempt"]])
    return Page[WebhookAttempt](items=[WebhookAttempt.model_validate(r) for r in items], next_cursor=next_cursor)


@router.post("/webhooks/{endpoint_id}/test", response_model=WebhookTestAnswer, responses=responses(404))
def test_endpoint(
    request: Request, endpoint_id: str = EndpointId, ctx: Ctx = require("webhooks:write")
) -> WebhookTestAnswer:
    """POST a signed `webhook.test` to the endpoint now and say what it answered - as
    `mailflow webhooks test`. The attempt is recorded (it changes neither the endpoint's status
    nor its failure streak); the address guard checks the URL again before the POST. The
    answer waits at most MAILFLOW_INBOUND_ACTION_TIMEOUT_S, and no longer than MAILFLOW_API_TIMEOUT_S."""
    s = ctx.gate.settings
    bounded = s.model_copy(update={"inbound_action_timeout_s": min(s.inbound_action_timeout_s, s.api_timeout_s)})
    http = webhooks.http_for(bounded, max_connections=1)
    answer = webhooks.send_test(ctx.store, ctx.gate.vault, http, endpoint_id)
    return WebhookTestAnswer.model_validate(answer.to_dict())
