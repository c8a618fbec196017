"""Outbound room: contacts - CSV import with a per-row error report, showing, updating, reactivating.

Import reads a CSV with a header row and an `email` column; every other column becomes
an attribute (numbers and true/false are typed, empty cells are left out). The delimiter
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
from mailflow.mail.addresses import normalize_email
from mailflow.outbound import queries as q
from mailflow.outbound import streams
from mailflow.outbound.events import ContactReactivated, ContactsImported, ContactUpdated, ImportedContact

# A contact in one of these states is never mailed (checked again when each job starts).
STOPPED_STATUSES = ("unsubscribed", "bounced", "complained")

BATCH = 1000


class ContactImportError(UserError):
    """A CSV file mailflow cannot import (no email column, unreadable)."""


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


def parse_csv(fh: TextIO) -> Iterator[ImportedContact | Rejected]:
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
        yield ImportedContact(email=email, attributes=attrs, line=line)


def import_contacts(
    store: EventStore,
    rows: Iterable[ImportedContact | Rejected],
    source: str,
    *,
    actor: str | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int = BATCH,
) -> ImportReport:
    report = ImportReport(source=source)
    stream = streams.contact_import(uuid.uuid4())
    seen: set[str] = set()
    batch: list[ImportedContact] = []

    def flush() -> None:
        if not batch:
            return
        event = ContactsImported(source=source, contacts=list(batch)).to_new(Metadata(actor=actor))
        with inline.reading(store) as conn, conn.cursor(row_factory=dict_row) as cur:
            counted = cur.execute(q.COUNT_KNOWN_EMAILS, ([c.email for c in batch],)).fetchone()
        known = counted["known"] if counted else 0
        inline.record(store, [(stream, event)])
        report.imported += len(batch)
        report.updated += known
        report.created += len(batch) - known
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


@dataclass(frozen=True)
class Contact:
    email: str
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
        jobs = {r["state"]: r["jobs"] for r in cur.execute(q.CONTACT_JOB_STATES, (email,))}
    return Contact(**row, jobs=jobs)


def _locked_contact(w: inline.Writer, email: str) -> dict[str, Any]:
    """Lock the address (as unsubscribes and suppressions do) and its contact row."""
    w.conn.execute(q.LOCK_ADDRESS, (email,))
    with w.conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.LOCK_CONTACT, (email,)).fetchone()
    if row is None:
        raise NotFoundError(f"no contact {email} (see `mailflow contacts list`)")
    return row


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
    event = ContactUpdated(email=email, attributes=values, removed=removed)
    with inline.writing(store) as w:
        current = _locked_contact(w, email)["attributes"]
        w.record([(streams.contact(email), event.to_new(Metadata(actor=actor)))])
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
        status = _locked_contact(w, email)["status"]
        with w.conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(q.LOCK_SUPPRESSION, (email,)).fetchone()
        suppression = row["reason"] if row else None
        if status == "active" and suppression is None:
            raise ConflictError(f"{email} is already active and not suppressed; nothing to reactivate")
        event = ContactReactivated(email=email, reason=reason.strip(), previous_status=status, suppression=suppression)
        w.record([(streams.contact(email), event.to_new(Metadata(actor=actor)))])
    return Reactivation(email, status, suppression)
