"""Outbound room: contacts - CSV and JSON-lines import with a per-row error report, showing,
updating, reactivating, deleting and erasing.

Import reads a CSV with a header row and an `email` column; every other column becomes
an attribute (numbers and true/false are typed, empty cells are left out). JSON lines
(`parse_ndjson`) are one object per line, an `email` and attributes beside it. The delimiter
(comma, semicolon, tab or pipe) is sniffed from the start of the file, as spreadsheets
in many locales save semicolons. Bad rows are reported with their line number and the
rest is imported, in batches, each batch one ContactsImported event committed together
with the contacts table.

A bounce, complaint or unsubscribe stops a contact (its status) and usually suppresses
the address too. Lifting the suppression alone does not restart mail to a stopped
contact; `reactivate()` does both, in one transaction, and records who and why.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from email_validator import EmailNotValidError
from psycopg.rows import dict_row

from mailflow.consumers import inline
from mailflow.errors import ConflictError, NotFoundError, UsageError, UserError
from mailflow.events.envelope import Metadata
from mailflow.events.store import EventStore
from mailflow.infra import personal
from mailflow.infra.services import scalar
from mailflow.mail.addresses import normalize_email
from mailflow.outbound import queries as q
from mailflow.outbound import streams
from mailflow.outbound.events import (
    ContactDeleted,
    ContactErased,
    ContactReactivated,
    ContactsImported,
    ContactUpdated,
    ImportedContact,
    JobFailed,
)

# A contact in one of these states is never mailed (checked again when each job starts).
STOPPED_STATUSES = ("unsubscribed", "bounced", "complained")

BATCH = 1000


class ContactImportError(UserError):
    """A CSV file mailflow cannot import (no email column, unreadable)."""


@dataclass(frozen=True)
class ContactRow:
    """A contact as read from a file, before it is sealed into an event."""

    email: str
    attributes: dict[str, Any] = field(default_factory=dict)
    line: int | None = None


@dataclass(frozen=True)
class Rejected:
    line: int
    value: str
    reason: str


@dataclass
class ImportReport:
    source: str
    rows: int = 0
    imported: int = 0
    created: int = 0
    updated: int = 0
    duplicates_in_file: int = 0
    rejected: list[Rejected] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "imported": self.imported,
            "created": self.created,
            "updated": self.updated,
            "duplicates_in_file": self.duplicates_in_file,
            "rejected": [r.__dict__ for r in self.rejected],
        }


def address(raw: str) -> str:
    """An address a user typed, in canonical form, or a UsageError saying why it is not one."""
    try:
        return normalize_email(raw)
    except EmailNotValidError as exc:
        raise UsageError(f"{raw!r} is not a valid email address: {exc}") from exc


_INT = re.compile(r"^-?(0|[1-9]\d{0,14})$")
_FLOAT = re.compile(r"^-?(0|[1-9]\d{0,14})\.\d{1,15}$")


def typed(value: str) -> Any:
    """Plain integers, decimals and true/false become JSON numbers and booleans.

    Anything else stays text - including leading zeros (postcodes, "0123"), signs and
    long digit strings (phone numbers, ids), which would lose information as numbers.
    """
    v = value.strip()
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if _INT.match(v):
        return int(v)
    if _FLOAT.match(v):
        return float(v)
    return v


DELIMITERS = ",;\t|"
SNIFF_CHARS = 1024


def sniff_delimiter(sample: str) -> str:
    """The delimiter of a CSV file from its first lines: comma, semicolon, tab or pipe.

    csv.Sniffer picks the character that occurs equally often on every line; a file it
    cannot decide (one column, a single line) is comma-separated. A delimiter that is not
    in the header line is a guess from the values, so comma is kept then too."""
    try:
        delimiter = csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return ","
    header = sample.splitlines()[0] if sample else ""
    return delimiter if delimiter in header else ","


def parse_csv(fh: TextIO) -> Iterator[ContactRow | Rejected]:
    """Yield a contact or a rejection per data row, with its line number in the file."""
    sample = fh.read(SNIFF_CHARS)
    if sample and not sample.endswith(("\n", "\r")):
        sample += fh.readline()  # whole lines only, for the sniffer and the reader alike
    lines = itertools.chain(io.StringIO(sample, newline=""), fh)
    reader = csv.DictReader(lines, delimiter=sniff_delimiter(sample))
    if reader.fieldnames is None:
        raise ContactImportError("the CSV file is empty (it needs a header row with an `email` column)")
    fields = [f.strip().lower() if f else "" for f in reader.fieldnames]
    if "email" not in fields:
        raise ContactImportError(f"the CSV header has no `email` column (found: {', '.join(fields)})")
    reader.fieldnames = fields
    for row in reader:
        line = reader.line_num
        if None in row:
            yield Rejected(line, "", "more cells than header columns")
            continue
        raw = (row.get("email") or "").strip()
        try:
            email = normalize_email(raw)
        except EmailNotValidError as exc:
            yield Rejected(line, raw, str(exc))
            continue
        attrs = {k: typed(v) for k, v in row.items() if k and k != "email" and v is not None and v.strip() != ""}
        yield ContactRow(email=email, attributes=attrs, line=line)


MAX_JSON_DEPTH = 32
_INT64 = 2**63


def unstorable(value: Any, depth: int = 0) -> str | None:
    """Why a JSON value cannot be kept as an attribute (PostgreSQL jsonb and the sealed log
    take no NUL character, no lone surrogate, no integer beyond 64 bits, no infinity, and
    nothing nested deeper than MAX_JSON_DEPTH), or None when it can."""
    if depth > MAX_JSON_DEPTH:
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, str):
        if "\x00" in value:
            return "a text contains a NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "a text is not valid Unicode (a lone surrogate)"
        return None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if -_INT64 <= value < _INT64 else "an integer is beyond 64 bits"
    if isinstance(value, float):
        return None if value == value and abs(value) != float("inf") else "a number is not finite"
    if isinstance(value, list):
        return next((why for v in value if (why := unstorable(v, depth + 1))), None)
    if isinstance(value, dict):
        for k, v in value.items():
            why = unstorable(k, depth + 1) or unstorable(v, depth + 1)
            if why:
                return why
        return None
    return f"a {type(value).__name__} is not a JSON value"


MAX_LINE_CHARS = 65_536  # a JSON line longer than this is rejected, not held in memory whole


def parse_ndjson(fh: TextIO) -> Iterator[ContactRow | Rejected]:
    """Yield a contact or a rejection per non-blank line of JSON lines: each an object with an
    `email` string; every other key is an attribute (a JSON value; null is left out, as an
    empty CSV cell is). Line numbers count every line, blank ones included."""
    line = 0
    while True:
        raw = fh.readline(MAX_LINE_CHARS + 1)
        if not raw:
            return
        line += 1
        if len(raw) > MAX_LINE_CHARS and not raw.endswith("\n"):
            while raw and not raw.endswith("\n"):  # skip the rest of the long line
                raw = fh.readline(MAX_LINE_CHARS + 1)
            yield Rejected(line, "", f"the line is longer than {MAX_LINE_CHARS} characters")
            continue
        text = raw.strip()
        if not text:
            continue
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            yield Rejected(line, text[:200], f"not JSON: {exc}")
            continue
        why = unstorable(doc)
        if why:
            yield Rejected(line, text[:200], why)
            continue
        if not isinstance(doc, dict):
            yield Rejected(line, text[:200], "expected a JSON object with an `email`")
            continue
        email_value = doc.get("email")
        if not isinstance(email_value, str):
            yield Rejected(line, text[:200], "no `email` string")
            continue
        bad_key = next((k for k in doc if k != "email" and not k.strip()), None)
        if bad_key is not None:
            yield Rejected(line, email_value[:200], "an attribute name is empty")
            continue
        try:
            email = normalize_email(email_value.strip())
        except EmailNotValidError as exc:
            yield Rejected(line, email_value[:200], str(exc))
            continue
        attrs = {k: v for k, v in doc.items() if k != "email" and v is not None}
        yield ContactRow(email=email, attributes=attrs, line=line)


def import_contacts(
    store: EventStore,
    rows: Iterable[ContactRow | Rejected],
    source: str,
    *,
    actor: str | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int = BATCH,
) -> ImportReport:
    report = ImportReport(source=source)
    stream = streams.contact_import(uuid.uuid4())
    seen: set[str] = set()
    batch: list[ContactRow] = []
    tenant = _tenant(store)

    def flush() -> None:
        if not batch:
            return
        with inline.writing(store) as w:
            subjects = [store.subject(w.conn, c.email) for c in batch]
            gone = personal.erased(w.conn, tenant, subjects)
            kept = [(s, c) for s, c in zip(subjects, batch) if s not in gone]
            report.rejected.extend(
                Rejected(c.line or 0, c.email, ERASED_ROW) for s, c in zip(subjects, batch) if s in gone
            )
            if kept:
                known = scalar(w.conn, q.COUNT_KNOWN_SUBJECTS, ([s for s, _ in kept],))
                sealed = personal.seal_many(
                    w.conn, tenant, [(s, {"email": c.email, "attributes": c.attributes}) for s, c in kept]
                )
                imported = [ImportedContact(subject=s, sealed=x, line=c.line) for (s, c), x in zip(kept, sealed)]
                event = ContactsImported(source=source, contacts=imported).to_new(Metadata(actor=actor))
                w.record([(stream, event)])
                report.imported += len(kept)
                report.updated += known
                report.created += len(kept) - known
        batch.clear()

    for item in rows:
        report.rows += 1
        if isinstance(item, Rejected):
            report.rejected.append(item)
        elif item.email in seen:
            report.duplicates_in_file += 1
        else:
            seen.add(item.email)
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        if progress is not None:
            progress(report.rows)
    flush()
    return report


def import_csv_text(store: EventStore, text: str, source: str = "inline") -> ImportReport:
    return import_contacts(store, parse_csv(io.StringIO(text)), source)


# -- one contact ------------------------------------------------------------------------------


ERASED_ROW = "erased on request: mailflow does not store this address again"


def _tenant(store: EventStore) -> str:
    if store.tenant is None:
        raise UsageError("contacts belong to a tenant: act for one (--tenant)")
    return store.tenant


@dataclass(frozen=True)
class Contact:
    email: str
    subject: str
    status: str
    attributes: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    suppression_reason: str | None
    suppression_detail: str | None
    suppressed_at: datetime | None
    jobs: dict[str, int]  # jobs to this address by state

    def to_dict(self) -> dict[str, Any]:
        suppression = None
        if self.suppression_reason is not None:
            suppression = {
                "reason": self.suppression_reason,
                "detail": self.suppression_detail,
                "since": self.suppressed_at.isoformat() if self.suppressed_at else None,
            }
        return {
            "email": self.email,
            "subject": self.subject,
            "status": self.status,
            "attributes": self.attributes,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "suppression": suppression,
            "jobs": self.jobs,
        }


def show(conn, raw_email: str) -> Contact:
    email = address(raw_email)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.GET_CONTACT, (email,)).fetchone()
        if row is None:
            raise NotFoundError(f"no contact {email} (see `mailflow contacts list`)")
        jobs = {r["state"]: r["jobs"] for r in cur.execute(q.CONTACT_JOB_STATES, (row["subject"],))}
    return Contact(**row, jobs=jobs)


def _locked_contact(w: inline.Writer, email: str) -> tuple[str, dict[str, Any]]:
    """Lock the address (as unsubscribes and suppressions do) and its contact row; returns
    the subject and the row."""
    subject = w.store.subject(w.conn, email)
    w.conn.execute(q.LOCK_ADDRESS, (subject,))
    with w.conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.LOCK_CONTACT, (subject,)).fetchone()
    if row is None:
        raise NotFoundError(f"no contact {email} (see `mailflow contacts list`)")
    return subject, row


def update(
    store: EventStore, raw_email: str, attributes: dict[str, Any], *, actor: str | None = None
) -> dict[str, Any]:
    """Set attributes of a known contact (ContactUpdated); a None value removes that attribute.

    Returns the contact's attributes afterwards."""
    email = address(raw_email)
    if not attributes:
        raise UsageError("nothing to update: give --attr key=value or --attrs JSON")
    for key in attributes:
        if not key or key == "email":
            raise UsageError(f"{key!r} cannot be an attribute name")
    removed = sorted(k for k, v in attributes.items() if v is None)
    values = {k: v for k, v in attributes.items() if v is not None}
    with inline.writing(store) as w:
        subject, row = _locked_contact(w, email)
        current = row["attributes"]
        (sealed,) = personal.seal_many(w.conn, _tenant(store), [(subject, {"attributes": values, "removed": removed})])
        event = ContactUpdated(subject=subject, sealed=sealed)
        w.record([(streams.contact(subject), event.to_new(Metadata(actor=actor)))])
    return {k: v for k, v in {**current, **values}.items() if k not in removed}


@dataclass(frozen=True)
class Reactivation:
    email: str
    previous_status: str
    suppression_lifted: str | None  # the reason of the suppression that was lifted


def reactivate(store: EventStore, raw_email: str, *, reason: str, actor: str | None) -> Reactivation:
    """Let a bounced, complained, unsubscribed or suppressed contact be mailed again.

    Status active and the suppression lifted, in one ContactReactivated event whose metadata
    names the actor; `reason` is required, because someone undid what a bounce or the
    person asked for. A contact that is active and not suppressed is a ConflictError."""
    email = address(raw_email)
    if not reason.strip():
        raise UsageError("say why the contact may be mailed again (--reason)")
    with inline.writing(store) as w:
        subject, contact = _locked_contact(w, email)
        status = contact["status"]
        with w.conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(q.LOCK_SUPPRESSION, (subject,)).fetchone()
        suppression = row["reason"] if row else None
        if status == "active" and suppression is None:
            raise ConflictError(f"{email} is already active and not suppressed; nothing to reactivate")
        event = ContactReactivated(
            subject=subject, reason=reason.strip(), previous_status=status, suppression=suppression
        )
        w.record([(streams.contact(subject), event.to_new(Metadata(actor=actor)))])
    return Reactivation(email, status, suppression)


# -- deletion ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deletion:
    email: str
    cancelled: int  # campaign jobs not yet sent, ended as failed

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


DELETED_REPLY = "not sent: the contact was deleted"


def delete(store: EventStore, raw_email: str, *, actor: str | None = None) -> Deletion:
    """Take a contact off the list (ContactDeleted): its row goes, so listings, segments and
    campaigns started later no longer see it, and its campaign jobs not yet sent (pending or
    waiting to retry) end as failed (kind `suppressed`, never resent). A job already queued
    may still go, as with a cancelled campaign's.

    Not an erasure: the log keeps what it held, jobs keep their addresses, a suppression stays
    as it was, transactional mail may still be sent to the address, and importing it again
    brings the contact back as a new one. To forget the person, erase()."""
    email = address(raw_email)
    md = Metadata(actor=actor)
    with inline.writing(store) as w:
        subject, _ = _locked_contact(w, email)
        with w.conn.cursor(row_factory=dict_row) as cur:
            unsent = cur.execute(q.UNSENT_CAMPAIGN_JOBS_OF, (subject,)).fetchall()
        ended = [
            (
                streams.job(j["id"]),
                JobFailed(job_id=str(j["id"]), attempt=j["attempts"], reply=DELETED_REPLY, kind="suppressed").to_new(
                    md
                ),
            )
            for j in unsent
        ]
        deleted = ContactDeleted(subject=subject, jobs_ended=len(unsent)).to_new(md)
        w.record([*ended, (streams.contact(subject), deleted)])
    return Deletion(email, len(unsent))


# -- erasure ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Erasure:
    email: str
    contact: bool  # a contact row was removed
    jobs: int  # jobs that named the person: kept, without the address
    cancelled: int  # of them, jobs not yet sent, ended as failed (suppressed)
    already: bool  # erased before: nothing more to do

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def erase(store: EventStore, raw_email: str, *, actor: str | None = None) -> Erasure:
    """Forget a person: their contact, the address and variables of their jobs, and every value
    sealed for them in the log (their subject key is deleted). Jobs keep their states, so
    campaign counts do not change, and the subject stays suppressed for good: a later import,
    send or suppression of the address is refused. Jobs not yet sent end as failed.

    Erasing twice is not an error (`already`). An address mailflow never held is erased all
    the same, so that it is never mailed."""
    email = address(raw_email)
    tenant = _tenant(store)
    with inline.writing(store) as w:
        subject = store.subject(w.conn, email)
        w.conn.execute(q.LOCK_ADDRESS, (subject,))
        if personal.erased(w.conn, tenant, [subject]):
            return Erasure(email, contact=False, jobs=0, cancelled=0, already=True)
        with w.conn.cursor(row_factory=dict_row) as cur:
            target = cur.execute(q.ERASE_TARGET, {"subject": subject}).fetchone()
        assert target is not None
        cancelled = _erase_subjects(w, tenant, [subject], Metadata(actor=actor))
    return Erasure(email, contact=bool(target["contacts"]), jobs=target["jobs"], cancelled=cancelled, already=False)


def _erase_subjects(w: inline.Writer, tenant: str, subjects: list[str], md: Metadata) -> int:
    """End the subjects' unsent jobs, record ContactErased for each and shred their keys;
    returns how many jobs were ended."""
    with w.conn.cursor(row_factory=dict_row) as cur:
        unsent = cur.execute(q.UNSENT_JOBS_OF, (subjects,)).fetchall()
        jobs = {r["subject"]: r["jobs"] for r in cur.execute(q.JOBS_PER_SUBJECT, (subjects,))}
    ended = [
        (
            streams.job(j["id"]),
            JobFailed(job_id=str(j["id"]), attempt=j["attempts"], reply=ERASED_REPLY, kind="suppressed").to_new(md),
        )
        for j in unsent
    ]
    erased = [(streams.contact(s), ContactErased(subject=s, jobs=jobs.get(s, 0)).to_new(md)) for s in subjects]
    w.record([*ended, *erased])
    personal.shred(w.conn, tenant, subjects)
    return len(unsent)


def erase_everyone(
    store: EventStore, *, actor: str | None = None, progress: Callable[[int, int], None] | None = None, batch: int = 500
) -> int:
    """Erase every person the store's tenant holds (erasing a tenant), a batch per
    transaction; returns how many. Run again after an interruption, it goes on."""
    tenant = _tenant(store)
    md = Metadata(actor=actor)
    with inline.reading(store) as conn:
        total = scalar(conn, q.COUNT_SUBJECTS_HELD)
    done = 0
    while True:
        with inline.writing(store) as w:
            subjects = [s for (s,) in w.conn.execute(q.SUBJECTS_HELD, (batch,)).fetchall()]
            if not subjects:
                return done
            _erase_subjects(w, tenant, subjects, md)
        done += len(subjects)
        if progress is not None:
            progress(done, max(total, done))


ERASED_REPLY = "not sent: the recipient was erased on request"
