"""Commands room: `mailflow contacts` - contacts: import from CSV, list."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from mailflow.commands.base import (
    new_app,
    JsonOpt, emit_json, err, out, quiet_logs, runtime,
)
from mailflow.errors import UsageError

app = new_app("Contacts: import from CSV, list.")


@app.command("import")
def contacts_import(
    path: Path = typer.Argument(..., help="CSV file with a header row and an `email` column."),
    as_json: bool = JsonOpt,
) -> None:
    """Import contacts; bad rows are reported by line number and the rest is imported."""
    from mailflow.outbound.contacts import import_contacts, parse_csv

    quiet_logs()
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UsageError(f"{path} is not UTF-8 text (line {line}); save it as UTF-8 CSV and import again") from exc
    store = runtime().store
    total = max(sum(1 for _ in path.open(encoding="utf-8-sig", newline="")) - 1, 0)
    with path.open(encoding="utf-8-sig", newline="") as fh:
        if as_json:
            report = import_contacts(store, parse_csv(fh), path.name)
        else:
            with Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(), console=err) as bar:
                task = bar.add_task("import", total=total)
                report = import_contacts(store, parse_csv(fh), path.name, progress=lambda n: bar.update(task, completed=n))
    if as_json:
        emit_json(report.to_dict())
        return
    out.print(
        f"imported {report.imported} contact(s) from {path.name}: {report.created} new, {report.updated} updated, "
        f"{report.duplicates_in_file} duplicate row(s), {len(report.rejected)} rejected"
    )
    for r in report.rejected[:50]:
        out.print(f"  line {r.line}: {r.value!r}: {r.reason}", markup=False)
    if len(report.rejected) > 50:
        out.print(f"  ... and {len(report.rejected) - 50} more (use --json for all)")


@app.command("list")
def contacts_list(
    segment: Optional[str] = typer.Option(None, "--segment", help="Only contacts in this segment."),
    limit: int = typer.Option(50, "--limit", "-n", min=1),
    as_json: bool = JsonOpt,
) -> None:
    """List contacts (optionally those of a segment)."""
    from mailflow.outbound import segments

    quiet_logs()
    with runtime().connect() as conn:
        doc = segments.load(conn, segment) if segment else {}
        pv = segments.preview(conn, doc, sample=limit)
    print_contacts(pv, as_json)


def print_contacts(pv: Any, as_json: bool) -> None:
    if as_json:
        emit_json({"count": pv.count, "contacts": pv.sample})
        return
    table = Table(title=f"{pv.count} contact(s)" + (f", showing {len(pv.sample)}" if pv.count > len(pv.sample) else ""))
    for col in ("email", "status", "attributes"):
        table.add_column(col)
    for c in pv.sample:
        table.add_row(c["email"], c["status"], orjson.dumps(c["attributes"]).decode()[:80])
    out.print(table)
