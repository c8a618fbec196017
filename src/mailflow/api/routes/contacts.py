"""API room, campaign service: contacts - list, create, show, update, reactivate, delete, erase,
and the streamed bulk import (CSV or JSON lines) with its per-line report.

Every operation calls what `mailflow contacts` calls (outbound/contacts.py). A contact is named
by its address in the path; another tenant's contact is not found.

The import reads the body as a stream and spools it to a temporary file (in memory up to
SPOOL_MEMORY bytes, on disk beyond), checking its size and that it is UTF-8 as it arrives; only
then does the importer read it back, line by line, in batches of its own. So a body that is too
large (413) or not UTF-8 (422) imports nothing at all - a half-imported file with an error
answer would leave the client guessing (DESIGN invariant 8) - and a 100 MB file never sits in
memory whole.
"""

from __future__ import annotations

import codecs
import io
import tempfile
from datetime import datetime
from typing import IO, Any, Literal

from fastapi import Path, Query, Request
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from mailflow.api import queries as q
from mailflow.api.auth import Ctx, require
from mailflow.api.models import Body, JsonObject, Text
from mailflow.api.pagination import CursorQuery, LimitQuery, Page, decode, page
from mailflow.api.problems import responses
from mailflow.api.routing import service_router
from mailflow.errors import ConflictError, UserError
from mailflow.infra import personal
from mailflow.outbound import contacts, segments

router = service_router(tags=["contacts"])
# The operations' dependencies, by scope (module-level: made once, B008).
CONTACTS_READ = require("contacts:read")
CONTACTS_WRITE = require("contacts:write")

Status = Literal["active", "unsubscribed", "bounced", "complained"]
EmailPath = Path(min_length=3, max_length=320, description="The contact's address (any letter case).")
StatusQuery = Query(None, description="Only contacts with this status.")
SourceQuery = Query("api", pattern=r"^[A-Za-z0-9_.\-]{1,100}$", description="A name for the import, in its events.")
SegmentName = Query(None, pattern=r"^[A-Za-z0-9_.\-]{1,100}$", description="Only contacts in this saved segment.")

SPOOL_MEMORY = 1 << 20  # an import body up to this size is spooled in memory, beyond it on disk
MAX_REJECTED_SHOWN = 1000  # rejected lines listed in an import's report (all are counted)
IMPORT_MEDIA = {"text/csv": "csv", "application/x-ndjson": "ndjson", "application/jsonl": "ndjson"}


class ContactSummary(BaseModel):
    email: str
    status: Status
    attributes: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class Suppression(BaseModel):
    reason: str
    detail: str | None
    since: datetime | None


class Contact(BaseModel):
    email: str
    subject: str = Field(description="The keyed hash that names the person in events (docs/events.md).")
    status: Status
    attributes: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    suppression: Suppression | None = Field(description="Set when the address is suppressed (never mailed).")
    jobs: dict[str, int] = Field(description="Jobs to this address, by state.")


class ContactRequest(Body):
    email: str = Field(min_length=3, max_length=320)
    attributes: JsonObject = Field(default_factory=dict, max_length=200, description="Any JSON values, by name.")


class ContactPatch(Body):
    attributes: JsonObject = Field(
        min_length=1, max_length=200, description="Attributes to set (merged over the contact's); null removes one."
    )


class ReactivateRequest(Body):
    reason: Text = Field(min_length=1, max_length=500, description="Why it may be mailed again (kept in the log).")


class Reactivated(BaseModel):
    email: str
    status: Literal["active"] = "active"
    previous_status: Status
    suppression_lifted: str | None = Field(description="The reason of the suppression that was lifted, if any.")


class ContactDeleted(BaseModel):
    email: str
    deleted: bool = True
    jobs_ended: int = Field(description="Campaign jobs not yet sent, ended as failed.")


class Erasure(BaseModel):
    email: str
    contact: bool = Field(description="A contact was removed.")
    jobs: int = Field(description="Jobs that named the person: kept, without the address.")
    cancelled: int = Field(description="Of them, jobs not yet sent, ended as failed.")
    already: bool = Field(description="The address had been erased before; nothing more was done.")


class RejectedLine(BaseModel):
    line: int = Field(description="The line number in the body (1 is the first; the CSV header is line 1).")
    value: str = Field(description="The address (or the start of the line) as given.")
    reason: str


class ImportReport(BaseModel):
    source: str
    rows: int = Field(description="Data rows read.")
    imported: int = Field(description="Contacts created or updated.")
    created: int
    updated: int
    duplicates_in_file: int = Field(description="Rows repeating an address seen earlier in the body (skipped).")
    rejected_count: int
    rejected: list[RejectedLine] = Field(description=f"The rejected rows (the first {MAX_REJECTED_SHOWN}).")


def _check_attribute_names(attributes: dict[str, Any]) -> None:
    for key in attributes:
        if not key.strip() or len(key) > 200 or key == "email":
            raise UserError(f"{key[:50]!r} cannot be an attribute name (1 to 200 characters, not `email`)")


def _contact(ctx: Ctx, email: str) -> Contact:
    with ctx.reading() as conn:
        return Contact.model_validate(contacts.show(conn, email).to_dict())


@router.get("/contacts", response_model=Page[ContactSummary], responses=responses(404))
def list_contacts(
    ctx: Ctx = CONTACTS_READ,
    status: Status | None = StatusQuery,
    segment: str | None = SegmentName,
    limit: int = LimitQuery,
    cursor: str | None = CursorQuery,
) -> Page[ContactSummary]:
    """Contacts in the order they were first imported or created, optionally those with a status
    or in a saved segment (404 if there is no such segment)."""
    after = decode(cursor, 1)
    if after is not None and (not isinstance(after[0], int) or isinstance(after[0], bool)):
        raise UserError("cursor is not one this API gave out")
    after_id = after[0] if after else None
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        compiled = segments.compile_filter(segments.load(conn, segment) if segment else {})
        query = sql.SQL(q.CONTACTS_PAGE).format(where=compiled.where)
        rows = cur.execute(query, [status, status, after_id, after_id, *compiled.params, limit + 1]).fetchall()
    items, next_cursor = page(rows, limit, lambda r: [r["id"]])
    return Page[ContactSummary](items=[ContactSummary.model_validate(r) for r in items], next_cursor=next_cursor)


@router.post("/contacts", status_code=201, response_model=Contact, responses=responses(409, 413))
def create_contact(body: ContactRequest, ctx: Ctx = CONTACTS_WRITE) -> Contact:
    """Create one contact (as an import of one row would). An address that is a contact already
    is 409 (change it with PATCH); an erased person's address is 409 too: it is never stored again."""
    _check_attribute_names(body.attributes)
    email = contacts.address(body.email)
    attributes = {k: v for k, v in body.attributes.items() if v is not None}
    with ctx.reading() as conn:
        if conn.execute(q.CONTACT_EXISTS, {"email": email}).fetchone() is not None:
            raise ConflictError(f"{email} is a contact already; change it with PATCH /contacts/{email}")
    report = contacts.import_contacts(
        ctx.store, [contacts.ContactRow(email, attributes)], "api", actor=ctx.principal.actor
    )
    if report.rejected:
        raise personal.Erased()
    return _contact(ctx, email)


@router.post(
    "/contacts/import",
    response_model=ImportReport,
    responses=responses(413, 415),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "CSV with a header row and an `email` column, or JSON lines (one object per line).",
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
)
async def import_contacts(
    request: Request,
    ctx: Ctx = CONTACTS_WRITE,
    source: str = SourceQuery,
) -> ImportReport:
    """Import contacts in bulk, as `mailflow contacts import` does, and report per line.

    The body is `text/csv` (a header row with an `email` column; every other column is an
    attribute; comma, semicolon, tab or pipe separated) or `application/x-ndjson` (JSON lines:
    an object per line with an `email` string, every other key an attribute). Known addresses
    get their attributes merged; bad rows are reported with their line number and the rest is
    imported. The body may be up to MAILFLOW_API_MAX_IMPORT_BYTES (413 beyond, and then nothing
    is imported); it must be UTF-8 (422 otherwise, nothing imported)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    kind = IMPORT_MEDIA.get(media)
    if kind is None:
        raise UnsupportedMedia(f"send the contacts as text/csv or application/x-ndjson, not {media[:100] or 'nothing'}")
    spool = await _spool(request)
    try:
        report = await run_in_threadpool(_import, ctx, kind, spool, source)
    finally:
        spool.close()
    shown = [
        RejectedLine(line=r.line, value=r.value[:200], reason=r.reason) for r in report.rejected[:MAX_REJECTED_SHOWN]
    ]
    return ImportReport(
        source=report.source,
        rows=report.rows,
        imported=report.imported,
        created=report.created,
        updated=report.updated,
        duplicates_in_file=report.duplicates_in_file,
        rejected_count=len(report.rejected),
        rejected=shown,
    )


class UnsupportedMedia(UserError):
    """A request body of a media type the operation does not take."""

    http_status = 415


async def _spool(request: Request) -> IO[bytes]:
    """The body, streamed into a temporary file; UserError (nothing kept) if it is not UTF-8
    text or holds a NUL character. The size limit is the middleware's (413)."""
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, mode="w+b")  # noqa: SIM115
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    try:
        async for chunk in request.stream():
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = line + chunk[: exc.start].count(b"\n")
                raise UserError(f"the body is not UTF-8 text (line {at}); send it as UTF-8") from None
            if "\x00" in text:
                at = line + chunk[: chunk.index(b"\x00")].count(b"\n")
                raise UserError(f"the body holds a NUL character (line {at}); it is not a text file")
            line += chunk.count(b"\n")
            spool.write(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"the body is not UTF-8 text (it ends inside a character, line {line})") from None
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def _import(ctx: Ctx, kind: str, spool: IO[bytes], source: str) -> contacts.ImportReport:
    text = io.TextIOWrapper(spool, encoding="utf-8-sig", newline="" if kind == "csv" else None)
    try:
        rows = contacts.parse_csv(text) if kind == "csv" else contacts.parse_ndjson(text)
        return contacts.import_contacts(ctx.store, rows, source, actor=ctx.principal.actor)
    finally:
        text.detach()


@router.get("/contacts/{email}", response_model=Contact, responses=responses(404))
def get_contact(email: str = EmailPath, ctx: Ctx = CONTACTS_READ) -> Contact:
    """One contact: status, attributes, suppression and its jobs by state."""
    return _contact(ctx, email)


@router.patch("/contacts/{email}", response_model=Contact, responses=responses(404, 413))
def update_contact(body: ContactPatch, email: str = EmailPath, ctx: Ctx = CONTACTS_WRITE) -> Contact:
    """Set or remove attributes of a contact (`mailflow contacts update`): given ones are merged
    over the contact's, a null removes one. The status is not set here: a stopped contact is
    mailed again only by POST /contacts/{email}/reactivate, which records why."""
    _check_attribute_names(body.attributes)
    contacts.update(ctx.store, email, body.attributes, actor=ctx.principal.actor)
    return _contact(ctx, email)


@router.post("/contacts/{email}/reactivate", response_model=Reactivated, responses=responses(404, 409, 413))
def reactivate_contact(body: ReactivateRequest, email: str = EmailPath, ctx: Ctx = CONTACTS_WRITE) -> Reactivated:
    """Mail a bounced, complained, unsubscribed or suppressed contact again: status active and the
    suppression lifted, recording who (the key) and why. An active, unsuppressed contact is 409."""
    r = contacts.reactivate(ctx.store, email, reason=body.reason, actor=ctx.principal.actor)
    return Reactivated(email=r.email, previous_status=r.previous_status, suppression_lifted=r.suppression_lifted)


@router.delete("/contacts/{email}", response_model=ContactDeleted, responses=responses(404))
def delete_contact(email: str = EmailPath, ctx: Ctx = CONTACTS_WRITE) -> ContactDeleted:
    """Delete a contact: take it off the list. It no longer appears in listings, segments or
    campaigns started later, and its campaign jobs not yet sent end as failed (a job already
    queued may still go). This is not erasure: the event log keeps what it held, sent jobs keep
    the address, a suppression stays, transactional mail may still be sent to the address, and a
    later import brings the contact back as a new one. To forget the person, use
    POST /contacts/{email}/erase."""
    d = contacts.delete(ctx.store, email, actor=ctx.principal.actor)
    return ContactDeleted(email=d.email, jobs_ended=d.cancelled)


@router.post("/contacts/{email}/erase", response_model=Erasure, responses=responses())
def erase_contact(email: str = EmailPath, ctx: Ctx = CONTACTS_WRITE) -> Erasure:
    """Erase a person (the right to be forgotten; `mailflow contacts erase`): their contact, the
    address in their jobs and every value about them in the log, for good - it cannot be undone.
    Counts stay, and the address stays suppressed: it is never imported, stored or mailed again.
    Erasing an address mailflow never held, or one erased before (`already`), is not an error."""
    return Erasure.model_validate(contacts.erase(ctx.store, email, actor=ctx.principal.actor).to_dict())
