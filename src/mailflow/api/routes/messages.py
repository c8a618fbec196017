"""API room, campaign service: transactional messages and jobs.

`POST /messages` is `mailflow send`: one high-priority job, created in the request's
transaction (so the 202 means it is committed) and sent within the high-priority SLA. The
Idempotency-Key header is also the job's idempotency key, so even two copies racing through
different API processes create one job.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import Header, Query, Response
from psycopg.rows import dict_row
from pydantic import EmailStr, Field

from mailflow.api import queries as q
from mailflow.api.auth import Ctx, require
from mailflow.api.models import Body, HistoryEvent, Job, JobSummary, JobWithHistory
from mailflow.api.pagination import CursorQuery, LimitQuery, Page, keyset, page
from mailflow.api.problems import responses
from mailflow.api.routing import service_router
from mailflow.outbound import sending, views
from mailflow.outbound.jobs import JobState, Priority

router = service_router(tags=["messages"])


class SendRequest(Body):
    sender: str = Field(min_length=1, max_length=200, description="A sender's name (GET /senders).")
    template: str = Field(min_length=1, max_length=200, description="A template's name (GET /templates).")
    to: EmailStr
    variables: dict[str, Any] = Field(default_factory=dict, description="The template's variables.")


class Queued(Body):
    job_id: uuid.UUID
    created: bool = Field(description="False when this idempotency key had created the job already.")
    state: str


def _history(conn: Any, ctx: Ctx, job_id: uuid.UUID) -> JobWithHistory:
    found = views.job_with_history(conn, ctx.store, str(job_id))
    return JobWithHistory(
        job=Job.model_validate(found.job.to_dict()),
        history=[HistoryEvent.model_validate(e.to_dict()) for e in found.history],
    )


@router.post("/messages", status_code=202, response_model=Queued, responses=responses(404))
def send_message(
    body: SendRequest,
    response: Response,
    ctx: Ctx = require("messages:send"),
    idempotency_key: str | None = Header(None, max_length=255, description="Retrying with it never sends twice."),
) -> Queued:
    """Send one transactional message (high priority; it overtakes campaign mail)."""
    job_id, created = sending.send_transactional(
        ctx.store,
        sender=body.sender,
        template=body.template,
        to=str(body.to),
        variables=body.variables,
        idempotency_key=f"api:{idempotency_key}" if idempotency_key else None,
    )
    if created:
        state = str(JobState.PENDING)  # as committed; the queuer takes it from there
    else:
        with ctx.reading() as conn:
            state = views.get_job(conn, job_id).state
    response.headers["Location"] = f"/api/v1/messages/{job_id}"
    return Queued(job_id=uuid.UUID(job_id), created=created, state=state)


@router.get("/messages/{job_id}", response_model=JobWithHistory, responses=responses(404))
def get_message(job_id: uuid.UUID, ctx: Ctx = require("messages:read")) -> JobWithHistory:
    """A message's job: its state now, and every event of its history."""
    with ctx.reading() as conn:
        return _history(conn, ctx, job_id)


@router.get("/jobs", response_model=Page[JobSummary], responses=responses())
def list_jobs(
    ctx: Ctx = require("campaigns:read"),
    state: Literal["pending", "queued", "active", "retry", "completed", "failed"] | None = Query(None),
    priority: Literal["high", "normal", "low"] | None = Query(None),
    campaign_id: uuid.UUID | None = Query(None),
    limit: int = LimitQuery,
    cursor: str | None = CursorQuery,
) -> Page[JobSummary]:
    """Jobs, newest first: one per recipient message."""
    after = keyset(cursor, str, str)
    params = {
        "state": state and str(JobState(state)),
        "priority": priority and str(Priority(priority)),
        "campaign": campaign_id,
        "after_at": datetime.fromisoformat(after[0]) if after else None,
        "after_id": after[1] if after else None,
        "limit": limit + 1,
    }
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.JOBS_PAGE, params).fetchall()
    items, next_cursor = page(rows, limit, lambda r: [r["created_at"].isoformat(), str(r["id"])])
    return Page[JobSummary](items=[JobSummary.model_validate(r) for r in items], next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobWithHistory, responses=responses(404))
def get_job(job_id: uuid.UUID, ctx: Ctx = require("campaigns:read")) -> JobWithHistory:
    """A job and its history (a campaign's or a transactional one)."""
    with ctx.reading() as conn:
        return _history(conn, ctx, job_id)
