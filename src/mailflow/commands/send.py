"""Commands room: `mailflow send` - send one transactional message."""

from __future__ import annotations

import time
from typing import Optional

import typer

from mailflow.commands.base import (
    new_app,
    JsonOpt, emit_json, out, parse_json_object, quiet_logs, runtime,
)
from mailflow.outbound import sending
from mailflow.outbound import queries as oq

app = new_app()


@app.command("send")
def send(
    sender: str = typer.Option(..., "--sender"),
    template: str = typer.Option(..., "--template"),
    to: str = typer.Option(..., "--to"),
    variables: str = typer.Option("{}", "--vars", help="Template variables as a JSON object."),
    idempotency_key: Optional[str] = typer.Option(None, "--idempotency-key", help="Retrying with the same key never sends twice."),
    wait: float = typer.Option(0.0, "--wait", help="Wait up to this many seconds for the outcome."),
    as_json: bool = JsonOpt,
) -> None:
    """Send one transactional message (high priority; overtakes campaign mail)."""
    quiet_logs()
    rt = runtime()
    job_id, created = sending.send_transactional(
        rt.store, sender=sender, template=template, to=to,
        variables=parse_json_object(variables, "--vars"), idempotency_key=idempotency_key,
    )
    state = "pending"
    deadline = time.monotonic() + wait
    with rt.connect() as conn:
        while True:
            row = conn.execute(oq.GET_JOB, (job_id,)).fetchone()
            state = row[3]
            if state in ("completed", "failed") or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    result = {"job_id": job_id, "created": created, "state": state, "reply": row[14]}
    if as_json:
        emit_json(result)
    else:
        verb = "queued" if created else "already sent with this idempotency key:"
        out.print(f"{verb} job {job_id} ({state}{', ' + row[14] if row[14] else ''})", markup=False)
    if state == "failed":
        raise typer.Exit(1)
