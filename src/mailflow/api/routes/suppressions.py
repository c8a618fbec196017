"""API room, campaign service: suppressed addresses - never sent to, whatever else says so
(`mailflow suppressions`, outbound/suppressions.py).

Lifting a suppression does not make a bounced, complained or unsubscribed contact mailable
again (`still_stopped` says so); POST /contacts/{email}/reactivate does both and records why.
An erased person's suppression is for good: it is listed without the address and cannot be
lifted (409).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import Path, Query
from psycopg.rows import dict_row
from pydantic import BaseModel, Field, field_validator

from mailflow.api import queries as q
from mailflow.api.auth import Ctx, require
from mailflow.api.models import Body, Text
from mailflow.api.pagination import CursorQuery, LimitQuery, Page, decode, page
from mailflow.api.problems import responses
from mailflow.api.routing import service_router
from mailflow.errors import UserError
from mailflow.outbound import suppressions

router = service_router(tags=["suppressions"])
# The operations' dependencies, by scope (module-level: made once, B008).
CONTACTS_READ = require("contacts:read")
CONTACTS_WRITE = require("contacts:write")

REASON_PATTERN = r"^[a-z0-9_.\-]{1,50}$"
ReasonQuery = Query(None, pattern=REASON_PATTERN, description="Only suppressions for this reason.")
EmailPath = Path(min_length=3, max_length=320, description="The suppressed address.")


class Suppression(BaseModel):
    email: str | None = Field(description="None when the person was erased: only the subject is left.")
    subject: str
    reason: str = Field(description="manual, bounce, complaint, unsubscribe, erased ...")
    detail: str
    created_at: datetime


class SuppressionRequest(Body):
    email: str = Field(min_length=3, max_length=320)
    reason: str = Field("manual", pattern=REASON_PATTERN, description="Why (a short word; not `erased`).")
    detail: Text = Field("", max_length=500)

    @field_validator("reason")
    @classmethod
    def _not_erased(cls, v: str) -> str:
        if v == "erased":
            raise ValueError("`erased` is what POST /contacts/{email}/erase records; pick another reason")
        return v


class Suppressed(BaseModel):
    email: str
    reason: str


class Unsuppressed(BaseModel):
    email: str
    contact_status: str | None = Field(description="The contact's status, None when no contact has the address.")
    still_stopped: bool = Field(
        description="The contact is bounced, complained or unsubscribed: nothing is sent to it until it is reactivated."
    )


def _after(cursor: str | None) -> tuple[datetime | None, str | None]:
    after = decode(cursor, 2)
    if after is None:
        return None, None
    try:
        return datetime.fromisoformat(str(after[0])), str(after[1])
    except ValueError:
        raise UserError("cursor is not one this API gave out") from None


@router.get("/suppressions", response_model=Page[Suppression], responses=responses())
def list_suppressions(
    ctx: Ctx = CONTACTS_READ,
    reason: str | None = ReasonQuery,
    limit: int = LimitQuery,
    cursor: str | None = CursorQuery,
) -> Page[Suppression]:
    """Suppressed addresses, newest first."""
    after_at, after_subject = _after(cursor)
    params: dict[str, Any] = {"reason": reason, "after_at": after_at, "after_subject": after_subject}
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.SUPPRESSIONS_PAGE, {**params, "limit": limit + 1}).fetchall()
    items, next_cursor = page(rows, limit, lambda r: [r["created_at"].isoformat(), r["subject"]])
    return Page[Suppression](items=[Suppression.model_validate(r) for r in items], next_cursor=next_cursor)


@router.post("/suppressions", status_code=201, response_model=Suppressed, responses=responses(409, 413))
def add_suppression(body: SuppressionRequest, ctx: Ctx = CONTACTS_WRITE) -> Suppressed:
    """Never send to an address again, until the suppression is removed (`mailflow suppressions
    add`). Suppressing an address again replaces its reason. An erased person's address is 409:
    it is suppressed for good already."""
    email = suppressions.add(ctx.store, body.email, body.reason, body.detail)
    return Suppressed(email=email, reason=body.reason)


@router.delete("/suppressions/{email}", response_model=Unsuppressed, responses=responses(404, 409))
def remove_suppression(
    email: str = EmailPath,
    ctx: Ctx = CONTACTS_WRITE,
) -> Unsuppressed:
    """Lift a suppression (404 if the address is not suppressed; 409 for an erased person's). A
    bounced, complained or unsubscribed contact stays so (`still_stopped`): reactivate it to mail
    it again."""
    r = suppressions.remove(ctx.store, email)
    return Unsuppressed(email=r.email, contact_status=r.contact_status, still_stopped=r.still_stopped)
