"""Commands room: `mailflow campaigns` - campaigns: draft -> running -> completed (reports from outbound/views.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.table import Table

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    new_app,
    out,
    quiet_logs,
    runtime,
)
from mailflow.outbound import campaigns, views

app = new_app("Campaigns: draft -> running -> completed.")

SEGMENT_MIN = 8
REF_HELP = "Campaign name, id, or a unique prefix of its id (as `campaigns list` shows)."


@app.command("create")
def campaigns_create(
    name: str = typer.Argument(..., help="A unique name; commands take it in place of the id."),
    sender: str = typer.Option(..., "--sender", help="Sender name (see `mailflow senders list`)."),
    template: str = typer.Option(..., "--template", help="Template name (see `mailflow templates list`)."),
    segment: str = typer.Option(..., "--segment", help="Segment whose contacts receive it (snapshotted at start)."),
    stop_on_reply: bool = typer.Option(
        True, "--stop-on-reply/--no-stop-on-reply", help="A contact who replies gets nothing more from it."
    ),
    tracking: bool | None = typer.Option(
        None,
        "--track/--no-track",
        help="Track opens and clicks (default: the tenant's, `mailflow tenants tracking`). docs/tracking.md.",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Create a draft campaign."""
    quiet_logs()
    cid = campaigns.create(
        runtime().store,
        name=name,
        sender=sender,
        template=template,
        segment=segment,
        stop_on_reply=stop_on_reply,
        tracking=tracking,
    )
    emit_json({"id": cid, "name": name, "status": "draft"}) if as_json else out.print(f"campaign {name} created: {cid}")


@app.command("start")
def campaigns_start(
    ref: str = typer.Argument(..., metavar="CAMPAIGN", help=REF_HELP),
    at: datetime | None = typer.Option(None, "--at", help="Start later, at this ISO 8601 time."),
    as_json: bool = JsonOpt,
) -> None:
    """Start now (snapshot the recipients, one job each) or schedule for --at.

    A segment without anyone to send to is an error (exit 2); the campaign stays as it was."""
    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        cid = campaigns.find(conn, ref)
    if at is not None:
        when = at if at.tzinfo else at.replace(tzinfo=UTC)
        campaigns.schedule(rt.store, cid, when)
        emit_json({"id": cid, "scheduled_at": when.isoformat()}) if as_json else out.print(
            f"campaign scheduled for {when.isoformat()}"
        )
        return
    n = campaigns.start(rt.store, cid)  # EmptySegment (a UserError) ends the command with its one line
    if as_json:
        emit_json({"id": cid, "jobs_created": n})
    elif n:
        out.print(f"campaign started: {n} recipient(s)")
    else:  # start() returns 0 only for a campaign that was started before
        out.print("campaign was already started; nothing changed")


def _simple(action: str, fn) -> None:
    @app.command(action)
    def command(ref: str = typer.Argument(..., metavar="CAMPAIGN", help=REF_HELP), as_json: bool = JsonOpt) -> None:
        quiet_logs()
        rt = runtime()
        with rt.connect() as conn:
            cid = campaigns.find(conn, ref)
        ended = fn(rt.store, cid)
        if as_json:
            emit_json({"id": cid, "action": action, **({"jobs_ended": ended} if action == "cancel" else {})})
        elif action == "cancel":
            out.print(f"campaign cancel: {cid}; {ended} unsent job(s) ended as failed (cancelled)")
        else:
            out.print(f"campaign {action}: {cid}")

    command.__doc__ = f"{action.capitalize()} a campaign."


_simple("pause", campaigns.pause)
_simple("resume", campaigns.resume)
_simple("cancel", campaigns.cancel)


@app.command("resend-failed")
def campaigns_resend_failed(
    ref: str = typer.Argument(..., metavar="CAMPAIGN", help=REF_HELP), as_json: bool = JsonOpt
) -> None:
    """New jobs for recipients whose job failed for a retryable reason (not bounces or suppressions)."""
    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        cid = campaigns.find(conn, ref)
    n = campaigns.resend_failed(rt.store, cid)
    emit_json({"id": cid, "jobs_created": n}) if as_json else out.print(f"{n} recipient(s) will be sent to again")


@app.command("status")
def campaigns_status(
    ref: str = typer.Argument(..., metavar="CAMPAIGN", help=REF_HELP), as_json: bool = JsonOpt
) -> None:
    """Per-state job counts, retries and failures with reasons: who did not get it, and why."""
    quiet_logs()
    with runtime().connect() as conn:
        report = views.campaign_report(conn, ref)
    if as_json:
        emit_json(report.to_dict())
        return
    lines = [
        f"{report.name}: {report.status}, {report.total} job(s), {report.retries} retry attempt(s)",
        f"  id {report.id}",
        "  " + "  ".join(f"{k} {v}" for k, v in report.jobs.items()),
        *(f"  failed {f.count} x {f.kind}: {' '.join((f.example or '').split())}" for f in report.failures),
        "  came back: "
        + "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.came_back.items() if v or k == "delivered"),
    ]
    for line in lines:  # one line each, cut with an ellipsis at the terminal's width (80 when not a terminal)
        out.print(line, markup=False, soft_wrap=False, no_wrap=True, overflow="ellipsis")


@app.command("list")
def campaigns_list(
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="Show at most this many."), as_json: bool = JsonOpt
) -> None:
    """Campaigns, newest first. Ids are shortened to a unique prefix that every command takes."""
    quiet_logs()
    with runtime().connect() as conn:
        found = views.list_campaigns(conn, limit)
    if as_json:
        emit_json([c.to_dict() for c in found])
        return
    if not found:
        out.print("no campaigns yet (see `mailflow campaigns create --help`)", markup=False)
        return
    short = views.short_ids(str(c.id) for c in found)
    rows = [(short[str(c.id)], c.status, str(c.recipients), c.name, c.segment) for c in found]
    # At 80 columns the segment gives way first (cut with an ellipsis, down to SEGMENT_MIN), then
    # the name: names are what commands take in place of the id.
    fixed = sum(max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(("id", "status", "recipients")))
    room = out.width - fixed - 2 * 4
    longest_name = max(len(r[3]) for r in rows)
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="", padding=(0, 0, 0, 2))
    for col in ("id", "status", "recipients"):
        table.add_column(col, justify="right" if col == "recipients" else "left", no_wrap=True)
    table.add_column("name", overflow="ellipsis")
    table.add_column("segment", overflow="ellipsis", max_width=max(room - longest_name, SEGMENT_MIN))
    for r in rows:
        table.add_row(*r)
    out.print(table)
