"""Commands room: `mailflow jobs` - jobs: one per recipient message."""

from __future__ import annotations

from typing import Optional

import orjson
import typer

from mailflow.commands.base import (
    new_app,
    JsonOpt, emit_json, iso, out, quiet_logs, runtime,
)
from mailflow.errors import UsageError
from mailflow.outbound import campaigns, sending
from mailflow.outbound import queries as oq

app = new_app("Jobs: one per recipient message.")


@app.command("list")
def jobs_list(
    state: Optional[str] = typer.Option(None, "--state"),
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Campaign id or name."),
    limit: int = typer.Option(50, "--limit", "-n", min=1),
    as_json: bool = JsonOpt,
) -> None:
    """Jobs, newest first."""
    quiet_logs()
    with runtime().connect() as conn:
        cid = campaigns.find(conn, campaign) if campaign else None
        rows = conn.execute(oq.LIST_JOBS, {"state": state, "campaign": cid, "limit": limit}).fetchall()
    keys = ("id", "priority", "state", "email", "campaign_id", "attempts", "last_code", "failure_kind", "created_at", "finished_at")
    items = [dict(zip(keys, (str(r[0]), r[1], r[2], r[3], str(r[4]) if r[4] else None, *[iso(x) for x in r[5:]]))) for r in rows]
    if as_json:
        emit_json(items)
        return
    for j in items:
        out.print(f"{j['id']}  {j['priority']:<6} {j['state']:<9} {j['email']:<36} attempts {j['attempts']}  {j['last_code'] or ''} {j['failure_kind'] or ''}", markup=False)


@app.command("show")
def jobs_show(job_id: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """A job's current state and its full history from its events."""
    quiet_logs()
    rt = runtime()
    jid = sending.job_uuid(job_id)
    with rt.connect() as conn:
        row = conn.execute(oq.GET_JOB, (jid,)).fetchone()
    if row is None:
        raise UsageError(f"no job {job_id}")
    keys = ("id", "idempotency_key", "priority", "state", "email", "sender", "template", "campaign_id", "attempts",
            "due_at", "queue_seq", "lease_until", "worker", "last_code", "last_reply", "failure_kind", "created_at",
            "queued_at", "started_at", "accepted_at", "finished_at")
    job = {k: (str(v) if k in ("id", "campaign_id") and v else iso(v)) for k, v in zip(keys, row)}
    history = [e.to_dict() for e in rt.store.read_stream(f"job-{jid}")]
    if as_json:
        emit_json({"job": job, "history": history})
        return
    out.print(f"job {job['id']}: {job['state']} ({job['priority']}), to {job['email']}, attempts {job['attempts']}", markup=False)
    for e in history:
        d = {k: v for k, v in e["data"].items() if k not in ("job_id", "variables")}
        out.print(f"  {e['recorded_at']}  {e['type']:<18} {orjson.dumps(d).decode()[:140]}", markup=False)
