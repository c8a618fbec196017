"""API room, campaign service: segments, templates and campaigns - what `mailflow segments`,
`mailflow templates` and `mailflow campaigns` do, over HTTP.

Segments are saved filters over contacts (docs/segments.md), read and written with the contacts
scopes; templates and campaigns need the campaigns scopes. Each operation calls the function
the CLI calls (outbound/segments.py, templates.py, campaigns.py, views.py), so the rules - a
segment or template a campaign still uses cannot be deleted, a cancelled campaign cannot start -
are the domain's, answered as problems (409 for a state that refuses, 422 for bad input).
Campaigns are named by id in paths (another tenant's id is not found); starting and resending
answer 202: the jobs are committed, sending goes on in the workers.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from psycopg.rows import dict_row
from pydantic import AwareDatetime, BaseModel, Field, StrictBool, StrictInt
from starlette.responses import Response

from mailflow.api import queries as q
from mailflow.api.auth import Ctx, require
from mailflow.api.models import Body, Deleted, JsonObject, Text, answer
from mailflow.api.pagination import CursorQuery, LimitQuery, Page, decode, encode, page
from mailflow.api.problems import responses
from mailflow.api.routing import service_router
from mailflow.errors import ConflictError, NotFoundError, UserError
from mailflow.outbound import campaigns, contacts, segments, templates, views
from mailflow.outbound.consent import LINK_VARIABLES

router = service_router()
# The operations' dependencies, by scope (module-level: made once, B008).
CONTACTS_READ = require("contacts:read")
CONTACTS_WRITE = require("contacts:write")
CAMPAIGNS_READ = require("campaigns:read")
CAMPAIGNS_WRITE = require("campaigns:write")

NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,100}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="Letters, digits, '.', '_' and '-' (1 to 100).")]
SegmentPath = Path(pattern=NAME_PATTERN, description="The segment's name.")
TemplatePath = Path(pattern=NAME_PATTERN, description="The template's name.")
CampaignPath = Path(description="The campaign's id.")
JobState = Literal["pending", "queued", "active", "retry", "completed", "failed"]
CampaignStatus = Literal["draft", "scheduled", "running", "paused", "completed", "cancelled"]
ContactStatus = Literal["active", "unsubscribed", "bounced", "complained"]
CampaignStatusQuery = Query(None, description="Only campaigns with this status.")
JobStateQuery = Query(None, description="Only jobs in this state (failed: who did not get it).")
SampleQuery = Query(10, ge=0, le=1000, description="How many matching contacts to show.")


def _after_uuid(value: Any) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise UserError("cursor is not one this API gave out") from None


def _after_time(value: Any) -> datetime:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise UserError("cursor is not one this API gave out") from None


# -- segments ------------------------------------------------------------------------------------


class SegmentRequest(Body):
    name: Name
    filter: JsonObject = Field(
        description='A filter over contacts, e.g. {"attributes.country": {"$in": ["NL", "BE"]}} (docs/segments.md).'
    )


class Segment(BaseModel):
    name: str
    filter: dict[str, Any]
    count: int = Field(description="Contacts it matches now.")
    created_at: datetime
    updated_at: datetime


class PreviewRequest(Body):
    filter: JsonObject
    sample: StrictInt = Field(10, ge=0, le=1000, description="How many matching contacts to show.")


class PreviewContact(BaseModel):
    email: str
    status: ContactStatus
    attributes: dict[str, Any]
    created_at: datetime


class Preview(BaseModel):
    count: int = Field(description="Contacts the filter matches.")
    sample: list[PreviewContact]


def _segments(ctx: Ctx, *, name: str | None, after: str | None, limit: int) -> tuple[list[Segment], bool]:
    """Up to `limit` segments, each with its count now, and whether more follow."""
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.SEGMENTS_PAGE, {"name": name, "after": after, "limit": limit + 1}).fetchall()
        found = [Segment(**r, count=segments.preview(conn, r["filter"], sample=0).count) for r in rows[:limit]]
    return found, len(rows) > limit


def _segment(ctx: Ctx, name: str) -> Segment:
    found, _ = _segments(ctx, name=name, after=None, limit=1)
    if not found:
        raise NotFoundError(f"no segment named {name!r}")
    return found[0]


def _preview(ctx: Ctx, doc: dict[str, Any] | None, name: str | None, sample: int) -> Preview:
    with ctx.reading() as conn:
        pv = segments.preview(conn, segments.load(conn, name) if name else doc or {}, sample=sample)
    return Preview(count=pv.count, sample=[PreviewContact.model_validate(c) for c in pv.sample])


@router.get("/segments", tags=["segments"], response_model=Page[Segment], responses=responses())
def list_segments(ctx: Ctx = CONTACTS_READ, limit: int = LimitQuery, cursor: str | None = CursorQuery) -> Page[Segment]:
    """Saved segments by name, with their filters and how many contacts each matches now."""
    after = decode(cursor, 1)
    items, more = _segments(ctx, name=None, after=str(after[0]) if after else None, limit=limit)
    return Page[Segment](items=items, next_cursor=encode([items[-1].name]) if more else None)


@router.post("/segments", tags=["segments"], status_code=201, response_model=Segment, responses=responses(409, 413))
def create_segment(body: SegmentRequest, ctx: Ctx = CONTACTS_WRITE) -> Segment:
    """Save a segment (`mailflow segments create`). The filter is checked (422 saying where it is
    wrong) and tried before it is saved. A name in use is 409: delete that segment first."""
    with ctx.reading() as conn, conn.cursor() as cur:
        if cur.execute(q.SEGMENTS_PAGE, {"name": body.name, "after": None, "limit": 1}).fetchone() is not None:
            raise ConflictError(f"a segment named {body.name!r} exists already")
    segments.define(ctx.store, body.name, body.filter)
    return _segment(ctx, body.name)


@router.post("/segments/preview", tags=["segments"], response_model=Preview, responses=responses(413))
def preview_filter(body: PreviewRequest, ctx: Ctx = CONTACTS_READ) -> Preview:
    """How many contacts a filter matches, and a sample of them, without saving it."""
    return _preview(ctx, body.filter, None, body.sample)


@router.get("/segments/{name}", tags=["segments"], response_model=Segment, responses=responses(404))
def get_segment(name: str = SegmentPath, ctx: Ctx = CONTACTS_READ) -> Segment:
    """A saved segment: its filter and how many contacts it matches now."""
    return _segment(ctx, name)


@router.get("/segments/{name}/preview", tags=["segments"], response_model=Preview, responses=responses(404))
def preview_segment(
    name: str = SegmentPath,
    ctx: Ctx = CONTACTS_READ,
    sample: int = SampleQuery,
) -> Preview:
    """How many contacts a saved segment matches now, and a sample of them."""
    return _preview(ctx, None, name, sample)


@router.delete("/segments/{name}", tags=["segments"], response_model=Deleted, responses=responses(404, 409))
def delete_segment(name: str = SegmentPath, ctx: Ctx = CONTACTS_WRITE) -> Deleted:
    """Delete a segment; 409 while a draft, scheduled, running or paused campaign uses it."""
    segments.delete(ctx.store, name)
    return Deleted()


# -- templates -----------------------------------------------------------------------------------


class TemplateRequest(Body):
    name: Name
    subject: Text = Field(min_length=1, max_length=998, description="Jinja2, e.g. 'Hello {{ name }}'.")
    html: Text = Field("", max_length=500_000, description="The HTML body (Jinja2, autoescaped).")
    text: Text = Field("", max_length=500_000, description="The plain-text body (Jinja2).")


class TemplatePatch(Body):
    subject: Text | None = Field(None, min_length=1, max_length=998)
    html: Text | None = Field(None, max_length=500_000)
    text: Text | None = Field(None, max_length=500_000)


class TemplateSummary(BaseModel):
    name: str
    subject: str
    created_at: datetime
    updated_at: datetime


class Template(TemplateSummary):
    html: str
    text: str


class RenderRequest(Body):
    variables: JsonObject = Field(default_factory=dict, description="The template's variables.")
    contact: str | None = Field(
        None, min_length=3, max_length=320, description="Use this contact's attributes (and email) too."
    )


class Rendered(BaseModel):
    subject: str
    html: str
    text: str


def _templates(ctx: Ctx, *, name: str | None, after: str | None, limit: int) -> list[dict[str, Any]]:
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(q.TEMPLATES_PAGE, {"name": name, "after": after, "limit": limit}).fetchall()


def _template(ctx: Ctx, name: str) -> Template:
    found = _templates(ctx, name=name, after=None, limit=1)
    if not found:
        raise NotFoundError(f"no template named {name!r}")
    return Template.model_validate(found[0])


@router.get("/templates", tags=["templates"], response_model=Page[TemplateSummary], responses=responses())
def list_templates(
    ctx: Ctx = CAMPAIGNS_READ, limit: int = LimitQuery, cursor: str | None = CursorQuery
) -> Page[TemplateSummary]:
    """Saved templates by name (GET /templates/{name} has the bodies)."""
    after = decode(cursor, 1)
    rows = _templates(ctx, name=None, after=str(after[0]) if after else None, limit=limit + 1)
    items, next_cursor = page(rows, limit, lambda r: [r["name"]])
    return Page[TemplateSummary](items=[TemplateSummary.model_validate(r) for r in items], next_cursor=next_cursor)


@router.post("/templates", tags=["templates"], status_code=201, response_model=Template, responses=responses(409, 413))
def create_template(body: TemplateRequest, ctx: Ctx = CAMPAIGNS_WRITE) -> Template:
    """Save a template (`mailflow templates create`): every part must compile (422 naming the part
    and line), and it needs an HTML or a text body. A name in use is 409: change it with PATCH."""
    if _templates(ctx, name=body.name, after=None, limit=1):
        raise ConflictError(f"a template named {body.name!r} exists already; change it with PATCH")
    templates.save(ctx.store, templates.Template(body.name, body.subject, body.html, body.text))
    return _template(ctx, body.name)


@router.get("/templates/{name}", tags=["templates"], response_model=Template, responses=responses(404))
def get_template(name: str = TemplatePath, ctx: Ctx = CAMPAIGNS_READ) -> Template:
    """A template: subject, HTML and text."""
    return _template(ctx, name)


@router.patch("/templates/{name}", tags=["templates"], response_model=Template, responses=responses(404, 413))
def update_template(body: TemplatePatch, name: str = TemplatePath, ctx: Ctx = CAMPAIGNS_WRITE) -> Template:
    """Change a template's subject, HTML or text (the parts given); the result is checked as a new
    template is. Jobs not yet sent render the new version."""
    with ctx.reading() as conn:
        current = templates.load(conn, name)
    templates.save(
        ctx.store,
        templates.Template(
            name,
            body.subject if body.subject is not None else current.subject,
            body.html if body.html is not None else current.html,
            body.text if body.text is not None else current.text,
        ),
    )
    return _template(ctx, name)


@router.delete("/templates/{name}", tags=["templates"], response_model=Deleted, responses=responses(404, 409))
def delete_template(name: str = TemplatePath, ctx: Ctx = CAMPAIGNS_WRITE) -> Deleted:
    """Delete a template; 409 while an unfinished campaign or an unsent job uses it."""
    templates.delete(ctx.store, name)
    return Deleted()


@router.post("/templates/{name}/render", tags=["templates"], response_model=Rendered, responses=responses(404, 413))
def render_template(body: RenderRequest, name: str = TemplatePath, ctx: Ctx = CAMPAIGNS_READ) -> Rendered:
    """Render a template with variables (and a contact's attributes, when `contact` is given) to
    preview it, as `mailflow templates render` does: the links each message gets
    (unsubscribe, preferences) are placeholders. A missing variable is 422 naming it."""
    values = dict(body.variables)
    with ctx.reading() as conn:
        tpl = templates.load(conn, name)
        if body.contact:
            c = contacts.show(conn, body.contact)
            values = {**c.attributes, "email": c.email, **values}
    r = templates.render(tpl, {**{v: f"<{v}>" for v in LINK_VARIABLES}, **values})
    return Rendered(subject=r.subject, html=r.html, text=r.text)


# -- campaigns -----------------------------------------------------------------------------------


class CampaignRequest(Body):
    name: Text = Field(min_length=1, max_length=200, description="Unique among the tenant's campaigns.")
    sender: Name = Field(description="A sender's name (GET /senders).")
    template: Name = Field(description="A template's name (GET /templates).")
    segment: Name = Field(description="The segment whose contacts receive it, snapshotted at start.")
    stop_on_reply: StrictBool = Field(True, description="A contact who replies gets nothing more from it.")
    tracking: StrictBool | None = Field(
        None, description="Track opens and clicks; null or absent: the tenant's default (docs/tracking.md)."
    )


class Campaign(BaseModel):
    id: uuid.UUID
    name: str
    status: CampaignStatus
    recipients: int = Field(description="Recipients snapshotted at start.")
    sender: str
    template: str
    segment: str
    stop_on_reply: bool
    tracking: bool | None = Field(description="Open and click tracking; null: the tenant's default.")
    scheduled_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ScheduleRequest(Body):
    at: AwareDatetime = Field(description="When to start it (ISO 8601 with a time zone).")


class Started(BaseModel):
    id: uuid.UUID
    status: CampaignStatus
    jobs_created: int = Field(description="Jobs created now (0: it had been started before).")


class Cancelled(BaseModel):
    id: uuid.UUID
    status: CampaignStatus
    jobs_ended: int = Field(description="Jobs not yet started, ended as failed (cancelled).")


class Resent(BaseModel):
    id: uuid.UUID
    status: CampaignStatus
    jobs_created: int = Field(description="New jobs, one per recipient whose job failed for a reason worth retrying.")


class FailureGroup(BaseModel):
    kind: str
    count: int
    example: str | None = Field(description="One of the replies.")


class CampaignReport(BaseModel):
    id: uuid.UUID
    name: str
    sender: str
    template: str
    segment: str
    status: CampaignStatus
    jobs: dict[str, int] = Field(description="Jobs by state.")
    total: int
    retries: int = Field(description="Attempts beyond the first.")
    failures: list[FailureGroup] = Field(description="Failed jobs by kind: who did not get it, and why.")
    came_back: dict[str, int] = Field(
        description="People per kind of what came back: delivered, bounced_hard, bounced_soft, delayed, "
        "complained, replied, auto_replied, unsubscribed."
    )


class Feedback(BaseModel):
    kind: str = Field(description="bounce | delayed | complaint | auto_reply | reply | unsubscribe")
    reason: str
    status: str = Field(description="The enhanced status code, if it gave one.")
    hard: bool
    at: datetime


class Recipient(BaseModel):
    job_id: uuid.UUID
    email: str | None = Field(description="None once the recipient was erased.")
    state: JobState
    attempts: int
    last_code: int | None = Field(description="The last SMTP reply code.")
    last_reply: str | None = Field(description="The last SMTP reply, or why it was not sent.")
    failure_kind: str | None = Field(description="Why it failed, as a kind (bad_mailbox, suppressed, cancelled ...).")
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    accepted_at: datetime | None
    finished_at: datetime | None
    feedback: Feedback | None = Field(description="The last thing that came back for it, if anything did.")


def _campaigns(ctx: Ctx, **params: Any) -> list[dict[str, Any]]:
    base = {"status": None, "after_at": None, "after_id": None, "limit": 1}
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(q.CAMPAIGNS_PAGE, {**base, **params}).fetchall()


def _campaign(ctx: Ctx, campaign_id: uuid.UUID) -> Campaign:
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        return _found(cur.execute(q.CAMPAIGN_ROW, {"id": campaign_id}).fetchone(), campaign_id)


def _found(row: dict[str, Any] | None, campaign_id: uuid.UUID) -> Campaign:
    if row is None:
        raise NotFoundError(f"no campaign {campaign_id}")
    return Campaign.model_validate(row)


@router.get("/campaigns", tags=["campaigns"], response_model=Page[Campaign], responses=responses())
def list_campaigns(
    ctx: Ctx = CAMPAIGNS_READ,
    status: CampaignStatus | None = CampaignStatusQuery,
    limit: int = LimitQuery,
    cursor: str | None = CursorQuery,
) -> Page[Campaign]:
    """Campaigns, newest first."""
    after = decode(cursor, 2)
    rows = _campaigns(
        ctx,
        status=status,
        after_at=_after_time(after[0]) if after else None,
        after_id=_after_uuid(after[1]) if after else None,
        limit=limit + 1,
    )
    items, next_cursor = page(rows, limit, lambda r: [r["created_at"].isoformat(), str(r["id"])])
    return Page[Campaign](items=[Campaign.model_validate(r) for r in items], next_cursor=next_cursor)


@router.post(
    "/campaigns", tags=["campaigns"], status_code=201, response_model=Campaign, responses=responses(404, 409, 413)
)
def create_campaign(body: CampaignRequest, ctx: Ctx = CAMPAIGNS_WRITE) -> Campaign:
    """Create a draft campaign (`mailflow campaigns create`). Its sender, template and segment must
    exist (404 naming the one that does not); a name in use is 409."""
    cid = campaigns.create(
        ctx.store,
        name=body.name,
        sender=body.sender,
        template=body.template,
        segment=body.segment,
        stop_on_reply=body.stop_on_reply,
        tracking=body.tracking,
    )
    return _campaign(ctx, uuid.UUID(cid))


@router.get("/campaigns/{campaign_id}", tags=["campaigns"], response_model=Campaign, responses=responses(404))
async def get_campaign(campaign_id: uuid.UUID = CampaignPath, ctx: Ctx = CAMPAIGNS_READ) -> Response:
    """A campaign: what it sends, to whom, and where it is in its life."""
    return answer(_found(await ctx.read_one(q.CAMPAIGN_ROW, id=campaign_id), campaign_id))


@router.post(
    "/campaigns/{campaign_id}/schedule", tags=["campaigns"], response_model=Campaign, responses=responses(404, 409, 413)
)
def schedule_campaign(
    body: ScheduleRequest, campaign_id: uuid.UUID = CampaignPath, ctx: Ctx = CAMPAIGNS_WRITE
) -> Campaign:
    """Start a draft (or already scheduled) campaign later, at `at` (`mailflow campaigns start --at`).
    Any other status is 409."""
    campaigns.schedule(ctx.store, str(campaign_id), body.at)
    return _campaign(ctx, campaign_id)


@router.post(
    "/campaigns/{campaign_id}/start",
    tags=["campaigns"],
    status_code=202,
    response_model=Started,
    responses=responses(404, 409),
)
def start_campaign(campaign_id: uuid.UUID = CampaignPath, ctx: Ctx = CAMPAIGNS_WRITE) -> Started:
    """Start now: snapshot the segment's active, unsuppressed contacts and create one job each, in
    one transaction (the 202 means they are committed; the workers send them). Starting again
    creates nothing (`jobs_created` 0). A segment with no one to send to is 422 and changes
    nothing; a cancelled campaign is 409."""
    n = campaigns.start(ctx.store, str(campaign_id))
    return Started(id=campaign_id, status=_campaign(ctx, campaign_id).status, jobs_created=n)


@router.post(
    "/campaigns/{campaign_id}/pause", tags=["campaigns"], response_model=Campaign, responses=responses(404, 409)
)
def pause_campaign(campaign_id: uuid.UUID = CampaignPath, ctx: Ctx = CAMPAIGNS_WRITE) -> Campaign:
    """Stop queuing a running campaign's jobs until it is resumed; any other status is 409."""
    campaigns.pause(ctx.store, str(campaign_id))
    return _campaign(ctx, campaign_id)


@router.post(
    "/campaigns/{campaign_id}/resume", tags=["campaigns"], response_model=Campaign, responses=responses(404, 409)
)
def resume_campaign(campaign_id: uuid.UUID = CampaignPath, ctx: Ctx = CAMPAIGNS_WRITE) -> Campaign:
    """Go on sending a paused campaign; any other status is 409."""
    campaigns.resume(ctx.store, str(campaign_id))
    return _campaign(ctx, campaign_id)


@router.post(
    "/campaigns/{campaign_id}/cancel", tags=["campaigns"], response_model=Cancelled, responses=responses(404, 409)
)
def cancel_campaign(campaign_id: uuid.UUID = CampaignPath, ctx: Ctx = CAMPAIGNS_WRITE) -> Cancelled:
    """Cancel a campaign: its jobs not yet started end as failed (kind `cancelled`); jobs already
    queued or being sent finish as they would. A completed or cancelled campaign is 409."""
    ended = campaigns.cancel(ctx.store, str(campaign_id))
    return Cancelled(id=campaign_id, status="cancelled", jobs_ended=ended)


@router.post(
    "/campaigns/{campaign_id}/resend-failed",
    tags=["campaigns"],
    status_code=202,
    response_model=Resent,
    responses=responses(404, 409),
)
def resend_failed(campaign_id: uuid.UUID = CampaignPath, ctx: Ctx = CAMPAIGNS_WRITE) -> Resent:
    """New jobs for recipients whose job failed for a reason worth retrying (not a bad mailbox or
    a suppression, and only if nothing of theirs is still on its way or delivered). A campaign
    not started is 409."""
    n = campaigns.resend_failed(ctx.store, str(campaign_id))
    return Resent(id=campaign_id, status=_campaign(ctx, campaign_id).status, jobs_created=n)


@router.get(
    "/campaigns/{campaign_id}/status", tags=["campaigns"], response_model=CampaignReport, responses=responses(404)
)
def campaign_status(campaign_id: uuid.UUID = CampaignPath, ctx: Ctx = CAMPAIGNS_READ) -> CampaignReport:
    """What `mailflow campaigns status` shows: jobs by state, retries, failures grouped by kind with
    an example reply, and what came back (deliveries, bounces, complaints, replies, unsubscribes)."""
    with ctx.reading() as conn:
        report = views.campaign_report(conn, str(campaign_id))
    return CampaignReport.model_validate(report.to_dict())


@router.get(
    "/campaigns/{campaign_id}/recipients",
    tags=["campaigns"],
    response_model=Page[Recipient],
    responses=responses(404),
)
def campaign_recipients(
    campaign_id: uuid.UUID = CampaignPath,
    ctx: Ctx = CAMPAIGNS_READ,
    state: JobState | None = JobStateQuery,
    limit: int = LimitQuery,
    cursor: str | None = CursorQuery,
) -> Page[Recipient]:
    """Per recipient, each job of the campaign: its state, and what happened and why - the last
    SMTP code and reply, the failure kind, and the last bounce, complaint or reply that came back."""
    after = decode(cursor, 1)
    _campaign(ctx, campaign_id)
    params = {"campaign": campaign_id, "state": state, "after": _after_uuid(after[0]) if after else None}
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.CAMPAIGN_RECIPIENTS_PAGE, {**params, "limit": limit + 1}).fetchall()
    items, next_cursor = page(rows, limit, lambda r: [str(r["id"])])
    return Page[Recipient](items=[_recipient(r) for r in items], next_cursor=next_cursor)


def _recipient(r: dict[str, Any]) -> Recipient:
    feedback = None
    if r["feedback_kind"] is not None:
        feedback = Feedback(
            kind=r["feedback_kind"],
            reason=r["feedback_reason"],
            status=r["feedback_status"],
            hard=r["feedback_hard"],
            at=r["feedback_at"],
        )
    fields = {k: v for k, v in r.items() if not k.startswith("feedback_") and k != "id"}
    return Recipient(job_id=r["id"], **fields, feedback=feedback)
