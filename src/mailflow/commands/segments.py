"""Commands room: `mailflow segments` - segments: saved filters over contacts (create, preview, list, delete)."""

from __future__ import annotations

import orjson
import typer
from rich.table import Table

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    new_app,
    out,
    parse_json_object,
    quiet_logs,
    runtime,
)
from mailflow.commands.contacts import print_contacts
from mailflow.errors import UsageError

app = new_app("Segments: saved filters over contacts.")


@app.command("create")
def segments_create(
    name: str = typer.Argument(...),
    filter_json: str = typer.Option(
        ..., "--filter", help='Filter, e.g. \'{"attributes.country": "NL"}\' (docs/segments.md).'
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Save a segment (redefining a name replaces its filter)."""
    from mailflow.outbound import segments

    quiet_logs()
    doc = parse_json_object(filter_json, "--filter")
    rt = runtime()
    segments.define(rt.store, name, doc)
    with rt.connect() as conn:
        count = segments.preview(conn, doc, sample=0).count
    if as_json:
        emit_json({"name": name, "filter": doc, "count": count})
    else:
        out.print(f"segment {name} saved: {count} contact(s) match now")


@app.command("preview")
def segments_preview(
    name: str | None = typer.Argument(None, help="A saved segment (or use --filter)."),
    filter_json: str | None = typer.Option(None, "--filter"),
    sample: int = typer.Option(10, "--sample", min=0, max=1000),
    as_json: bool = JsonOpt,
) -> None:
    """How many contacts match, and a sample of them."""
    from mailflow.outbound import segments

    quiet_logs()
    if (name is None) == (filter_json is None):
        raise UsageError("give a segment name or --filter (one of them)")
    with runtime().connect() as conn:
        doc = segments.load(conn, name) if name else parse_json_object(filter_json or "", "--filter")
        pv = segments.preview(conn, doc, sample=sample)
    print_contacts(pv, as_json)


@app.command("list")
def segments_list(as_json: bool = JsonOpt) -> None:
    """Saved segments with their filters and current sizes."""
    from mailflow.outbound import views

    quiet_logs()
    with runtime().connect() as conn:
        rows = views.list_segments(conn)
    if as_json:
        emit_json([r.to_dict() for r in rows])
        return
    table = Table()
    for col in ("name", "contacts", "filter"):
        table.add_column(col, justify="right" if col == "contacts" else "left")
    for r in rows:
        table.add_row(r.name, str(r.count), orjson.dumps(r.filter).decode())
    out.print(table)


@app.command("delete")
def segments_delete(name: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Delete a segment; refused while a draft, scheduled, running or paused campaign uses it."""
    from mailflow.outbound import segments

    quiet_logs()
    segments.delete(runtime().store, name)
    emit_json({"deleted": name}) if as_json else out.print(f"segment {name} deleted", markup=False)
