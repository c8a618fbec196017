"""Commands room: `mailflow jobs` - jobs: one per recipient message (formats outbound/views.py)."""

from __future__ import annotations

from datetime import UTC
from typing import Any

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
from mailflow.events.envelope import Envelope
from mailflow.outbound import campaigns, views
from mailflow.outbound.jobs import JobState, Priority

ERASED = "(erased)"  # a job whose recipient was erased keeps its state, not the address

app = new_app("Jobs: one per recipient message.")


@app.command("list")
def jobs_list(
    state: JobState | None = typer.Option(None, "--state", help="Only jobs in this state."),
    priority: Priority | None = typer.Option(None, "--priority", help="Only jobs of this priority."),
    campaign: str | None = typer.Option(None, "--campaign", help="Only this campaign's jobs (name, id or id prefix)."),
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="Show at most this many."),
    as_json: bool = JsonOpt,
) -> None:
    """Jobs, newest first. Ids are shortened to a unique prefix that `jobs show` takes."""
    quiet_logs()
    with runtime().connect() as conn:
        cid = campaigns.find(conn, campaign) if campaign else None
        jobs = views.list_jobs(conn, state=state, priority=priority, campaign_id=cid, limit=limit)
    if as_json:
        emit_json([j.to_dict() for j in jobs])
        return
    short = views.short_ids(str(j.id) for j in jobs)
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="", padding=(0, 0, 0, 2))
    for col in ("id", "state", "priority", "tries", "last reply"):
        table.add_column(col, justify="right" if col == "tries" else "left", no_wrap=True)
    table.add_column("email", overflow="ellipsis")  # the one column that gives way at 80 columns
    for j in jobs:
        last = " ".join(str(x) for x in (j.last_code, j.failure_kind) if x)
        table.add_row(short[str(j.id)], j.state, j.priority, str(j.attempts), last or "-", j.email or ERASED)
    out.print(table)


def history_line(e: Envelope) -> str:
    """One event of a job's history: time, type, the data that matters (printed cut to the width)."""
    d = e.data
    parts: list[Any] = []
    if "attempt" in d:
        parts.append(f"attempt {d['attempt']}")
    if e.type == "JobCreated":
        parts.append(f"{d.get('priority')}, {d.get('template')} from {d.get('sender')}")
    if e.type == "JobQueued":
        parts.append(f"queue seq {d.get('queue_seq')}")
    if e.type == "JobStarted":
        parts.append(f"by {d.get('worker')}")
    if d.get("kind") or d.get("reason"):
        parts.append(str(d.get("kind") or d.get("reason")))
    if d.get("reply"):
        code = d.get("code")
        reply = " ".join(str(d["reply"]).split())
        parts.append(reply if code is None or reply.startswith(str(code)) else f"{code} {reply}")
    elif d.get("code") is not None:
        parts.append(str(d["code"]))
    ts = e.recorded_at.astimezone(UTC).strftime("%m-%d %H:%M:%S")
    return f"  {ts}  {e.type:<17} {', '.join(parts)}".rstrip()


@app.command("show")
def jobs_show(
    job_id: str = typer.Argument(..., metavar="JOB", help="Job id, or a unique prefix of it (as `jobs list` shows)."),
    as_json: bool = JsonOpt,
) -> None:
    """A job's current state and its history from its events (the full data with --json)."""
    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        found = views.job_with_history(conn, rt.store, job_id)
    if as_json:
        emit_json(found.to_dict())
        return
    j = found.job
    lines = [f"job {j.id}", f"  {j.state} ({j.priority}), attempts {j.attempts}, to {j.email or ERASED}"]
    if j.campaign_id:
        lines.append(f"  campaign {j.campaign_id}")
    if j.last_reply:
        lines.append(f"  last reply: {' '.join(j.last_reply.split())}")
    lines.append("history (UTC):")
    lines.extend(history_line(e) for e in found.history)
    for line in lines:  # one line each, cut with an ellipsis at the terminal's width (80 when not a terminal)
        out.print(line, markup=False, soft_wrap=False, no_wrap=True, overflow="ellipsis")
