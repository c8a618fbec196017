"""Commands room: `mailflow campaigns` - campaigns: draft -> running -> completed."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

import typer
from rich.table import Table

from mailflow.commands.base import (
    new_app,
    JsonOpt, emit_json, iso, out, quiet_logs, runtime,
)
from mailflow.outbound import campaigns
from mailflow.outbound import queries as oq

app = new_app("Campaigns: draft -> running -> completed.")


@app.command("create")
def campaigns_create(
    name: str = typer.Argument(...),
    sender: str = typer.Option(..., "--sender"),
    template: str = typer.Option(..., "--template"),
    segment: str = typer.Option(..., "--segment"),
    as_json: bool = JsonOpt,
) -> None:
    """Create a draft campaign."""
    quiet_logs()
    cid = campaigns.create(runtime().store, name=name, sender=sender, template=template, segment=segment)
    emit_json({"id": cid, "name": name, "status": "draft"}) if as_json else out.print(f"campaign {name} created: {cid}")


@app.command("start")
def campaigns_start(
    ref: str = typer.Argument(..., help="Campaign id or name."),
    at: Optional[datetime] = typer.Option(None, "--at", help="Start later, at this ISO 8601 time."),
    as_json: bool = JsonOpt,
) -> None:
    """Start now (snapshot the recipients, one job each) or schedule for --at."""
    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        cid = campaigns.find(conn, ref)
    if at is not None:
        when = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
        campaigns.schedule(rt.store, cid, when)
        emit_json({"id": cid, "scheduled_at": when.isoformat()}) if as_json else out.print(f"campaign scheduled for {when.isoformat()}")
        return
    n = campaigns.start(rt.store, cid)
    if as_json:
        emit_json({"id": cid, "jobs_created": n})
    else:
        out.print(f"campaign started: {n} recipient(s)" if n else "campaign was already started; nothing changed")


def _simple(action: str, fn) -> None:
    @app.command(action)
    def command(ref: str = typer.Argument(..., help="Campaign id or name."), as_json: bool = JsonOpt) -> None:
        quiet_logs()
        rt = runtime()
        with rt.connect() as conn:
            cid = campaigns.find(conn, ref)
        fn(rt.store, cid)
        emit_json({"id": cid, "action": action}) if as_json else out.print(f"campaign {action}: {cid}")

    command.__doc__ = f"{action.capitalize()} a campaign."


_simple("pause", campaigns.pause)
_simple("resume", campaigns.resume)
_simple("cancel", campaigns.cancel)


@app.command("resend-failed")
def campaigns_resend_failed(ref: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """New jobs for recipients whose job failed for a retryable reason (not bounces or suppressions)."""
    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        cid = campaigns.find(conn, ref)
    n = campaigns.resend_failed(rt.store, cid)
    emit_json({"id": cid, "jobs_created": n}) if as_json else out.print(f"{n} recipient(s) will be sent to again")


@app.command("status")
def campaigns_status(ref: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Per-state job counts, retries and failures with reasons: who did not get it, and why."""
    quiet_logs()
    with runtime().connect() as conn:
        st = campaigns.status(conn, campaigns.find(conn, ref))
    if as_json:
        emit_json(st)
        return
    out.print(f"{st['name']} ({st['id']}): {st['status']}, {st['total']} job(s), {st['retries']} retry attempt(s)")
    out.print("  " + "  ".join(f"{k} {v}" for k, v in st["jobs"].items()))
    for f in st["failures"]:
        out.print(f"  failed {f['count']} x {f['kind']}: {f['example']}", markup=False)


@app.command("list")
def campaigns_list(limit: int = typer.Option(50, "--limit"), as_json: bool = JsonOpt) -> None:
    """Campaigns, newest first."""
    quiet_logs()
    with runtime().connect() as conn:
        rows = [
            dict(zip(("id", "name", "status", "recipients", "sender", "template", "segment", "created_at", "started_at", "finished_at"),
                     (str(r[0]), *[iso(x) for x in r[1:]])))
            for r in conn.execute(oq.LIST_CAMPAIGNS, (limit,)).fetchall()
        ]
    if as_json:
        emit_json(rows)
        return
    table = Table()
    for col in ("name", "status", "recipients", "segment", "id"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["status"], str(r["recipients"]), r["segment"], r["id"])
    out.print(table)
