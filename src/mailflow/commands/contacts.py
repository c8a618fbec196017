"""Commands room: `mailflow contacts` - contacts: import from CSV, list, show, update, reactivate, erase."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    err,
    new_app,
    out,
    parse_json_object,
    quiet_logs,
    runtime,
)
from mailflow.errors import UsageError

app = new_app("Contacts: import from CSV, list, show, update, reactivate, erase.")


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
                report = import_contacts(
                    store, parse_csv(fh), path.name, progress=lambda n: bar.update(task, completed=n)
                )
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
    segment: str | None = typer.Option(None, "--segment", help="Only contacts in this segment."),
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


@app.command("show")
def contacts_show(email: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """One contact: status, attributes, suppression and its jobs by state."""
    from mailflow.outbound import contacts

    quiet_logs()
    with runtime().connect() as conn:
        c = contacts.show(conn, email)
    if as_json:
        emit_json(c.to_dict())
        return
    sup = "no"
    if c.suppression_reason is not None:
        sup = f"yes ({c.suppression_reason}{': ' + c.suppression_detail if c.suppression_detail else ''})"
    jobs = ", ".join(f"{n} {state}" for state, n in c.jobs.items()) or "none"
    out.print(
        f"{c.email}\n  subject:    {c.subject}\n  status:     {c.status}\n  suppressed: {sup}\n"
        f"  attributes: {orjson.dumps(c.attributes).decode()}\n  jobs:       {jobs}\n"
        f"  created {c.created_at.isoformat()}, updated {c.updated_at.isoformat()}",
        markup=False,
    )


def parse_attrs(pairs: list[str], attrs_json: str | None) -> dict[str, Any]:
    """--attr key=value (typed as a CSV cell is; an empty value removes the key) and --attrs JSON."""
    from mailflow.outbound.contacts import typed

    values: dict[str, Any] = parse_json_object(attrs_json, "--attrs") if attrs_json else {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--attr {pair!r}: write it as k=v (an empty v removes the attribute)")
        values[key.strip()] = typed(value) if value.strip() else None
    return values


def acting_user() -> str:
    """Who is at the keyboard, for the events' metadata: MAILFLOW_ACTOR, else user@host:pid."""
    from mailflow.events.envelope import default_actor

    return os.environ.get("MAILFLOW_ACTOR", "").strip() or default_actor()


@app.command("update")
def contacts_update(
    email: str = typer.Argument(...),
    attr: list[str] = typer.Option([], "--attr", help="key=value (repeatable); an empty value removes the key."),
    attrs: str | None = typer.Option(
        None, "--attrs", help='A JSON object, e.g. \'{"plan": "pro"}\'; null removes a key.'
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Set or remove attributes of a contact."""
    from mailflow.outbound import contacts

    quiet_logs()
    values = parse_attrs(attr, attrs)
    result = contacts.update(runtime().store, email, values, actor=acting_user())
    if as_json:
        emit_json({"email": contacts.address(email), "attributes": result})
    else:
        out.print(f"{contacts.address(email)}: {orjson.dumps(result).decode()}", markup=False)


@app.command("reactivate")
def contacts_reactivate(
    email: str = typer.Argument(...),
    reason: str = typer.Option(..., "--reason", help="Why it may be mailed again (kept in the event log)."),
    as_json: bool = JsonOpt,
) -> None:
    """Mail a bounced, complained, unsubscribed or suppressed contact again: status active and
    the suppression lifted, recording who (MAILFLOW_ACTOR or the OS user) and why."""
    from mailflow.outbound import contacts

    quiet_logs()
    actor = acting_user()
    r = contacts.reactivate(runtime().store, email, reason=reason, actor=actor)
    if as_json:
        emit_json(
            {
                "email": r.email,
                "status": "active",
                "previous_status": r.previous_status,
                "suppression_lifted": r.suppression_lifted,
                "actor": actor,
            }
        )
        return
    lifted = f", suppression ({r.suppression_lifted}) lifted" if r.suppression_lifted else ""
    out.print(f"{r.email} is active again (was {r.previous_status}{lifted})", markup=False)


def confirm_or_yes(question: str, yes: bool) -> None:
    """An irreversible step: asked on a terminal, else it needs --yes."""
    import sys

    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question} cannot be undone: add --yes to go ahead")
    if not typer.confirm(f"{question}? This cannot be undone.", default=False, err=True):
        raise UsageError("nothing was erased")


@app.command("erase")
def contacts_erase(
    email: str = typer.Argument(...),
    yes: bool = typer.Option(False, "--yes", help="Do not ask (required when not on a terminal)."),
    as_json: bool = JsonOpt,
) -> None:
    """Erase a person (the right to be forgotten): their contact, the address in their jobs and
    every value about them in the log. Counts stay; the address stays suppressed for good."""
    from mailflow.outbound import contacts

    quiet_logs()
    address = contacts.address(email)
    confirm_or_yes(f"erase {address}", yes)
    r = contacts.erase(runtime().store, address, actor=acting_user())
    if as_json:
        emit_json(r.to_dict())
        return
    if r.already:
        out.print(f"{r.email} was erased before; nothing more to do", markup=False)
        return
    held = "a contact and " if r.contact else ""
    ended = f" ({r.cancelled} not yet sent, ended)" if r.cancelled else ""
    out.print(
        f"erased {r.email}: {held}{r.jobs} job(s){ended}; the address will never be mailed again",
        markup=False,
    )
