"""Outbound room: contacts - CSV import with a per-row error report, listing, status.

Import reads a CSV with a header row and an `email` column; every other column becomes
an attribute (numbers and true/false are typed, empty cells are left out). Bad rows are
reported with their line number and the rest is imported, in batches, each batch one
ContactsImported event committed together with the contacts table.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from email_validator import EmailNotValidError, validate_email

from mailflow.errors import UserError
from mailflow.events.envelope import Metadata
from mailflow.events.store import EventStore
from mailflow.consumers import inline
from mailflow.outbound import queries as q
from mailflow.outbound.events import ContactsImported, ImportedContact

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


def normalize_email(raw: str) -> str:
    """A deliverable-looking address in canonical form, or EmailNotValidError."""
    result = validate_email(raw.strip(), check_deliverability=False)
    return result.normalized.lower()


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


def parse_csv(fh: TextIO) -> Iterator[ImportedContact | Rejected]:
    """Yield a contact or a rejection per data row, with its line number in the file."""
    reader = csv.DictReader(fh)
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
    stream = f"contact-import-{uuid.uuid4()}"
    seen: set[str] = set()
    batch: list[ImportedContact] = []

    def flush() -> None:
        if not batch:
            return
        event = ContactsImported(source=source, contacts=list(batch)).to_new(Metadata(actor=actor))
        with store.pool.connection() as conn:
            known = conn.execute(q.COUNT_KNOWN_EMAILS, ([c.email for c in batch],)).fetchone()[0]
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
