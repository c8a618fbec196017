"""API room: the shapes of shared request and response bodies (the OpenAPI schemas come from them)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.responses import Response


def answer(model: BaseModel, status_code: int = 200) -> Response:
    """`model` as the JSON answer, serialized once by pydantic. FastAPI would validate a
    returned model against the route's response_model again and then encode it; the route
    still declares response_model, for the OpenAPI document."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


class Body(BaseModel):
    """A request body: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class JobSummary(BaseModel):
    id: uuid.UUID
    priority: str
    state: str
    email: str | None = Field(description="None once the recipient was erased")
    campaign_id: uuid.UUID | None
    attempts: int
    last_code: int | None
    failure_kind: str | None
    created_at: datetime
    finished_at: datetime | None


class Job(JobSummary):
    idempotency_key: str
    sender: str
    template: str
    due_at: datetime
    queue_seq: int | None
    lease_until: datetime | None
    worker: str | None
    last_reply: str | None
    queued_at: datetime | None
    started_at: datetime | None
    accepted_at: datetime | None


class HistoryEvent(BaseModel):
    """One event of a job's stream (the public envelope, docs/events.md)."""

    id: uuid.UUID
    position: int | None
    stream: str
    version: int
    type: str
    schema_: int = Field(alias="schema")
    data: dict[str, Any]
    metadata: dict[str, str | None]
    recorded_at: datetime

    model_config = ConfigDict(populate_by_name=True)


class JobWithHistory(BaseModel):
    job: Job
    history: list[HistoryEvent]


class Deleted(BaseModel):
    deleted: bool = True


# -- values mailflow can store (campaign service) ---------------------------------------------
# PostgreSQL text and jsonb take no NUL character and no lone surrogate, and the log's JSON no
# integer beyond 64 bits: such input is a 422 at the door, not a 500 at the database.


def _storable_json(value: Any) -> Any:
    from mailflow.outbound.contacts import unstorable

    why = unstorable(value)
    if why:
        raise ValueError(why)
    return value


def _storable_text(value: str) -> str:
    return _storable_json(value)


JsonObject = Annotated[dict[str, Any], AfterValidator(_storable_json)]
"""A JSON object mailflow can keep (attributes, a segment filter, template variables)."""
Text = Annotated[str, Field(pattern=r"^[^\x00]*$"), AfterValidator(_storable_text)]
"""Text mailflow can keep: no NUL character, valid Unicode."""
