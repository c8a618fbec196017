"""Commands room: `mailflow send` - send one transactional message."""

from __future__ import annotations

import typer

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
from mailflow.outbound import sending, views
from mailflow.outbound.jobs import JobState

app = new_app()


@app.command("send")
def send(
    sender: str = typer.Option(..., "--sender", help="Sender name (see `mailflow senders list`)."),
    template: str = typer.Option(..., "--template", help="Template name (see `mailflow templates list`)."),
    to: str = typer.Option(..., "--to", help="Recipient address."),
    variables: str = typer.Option("{}", "--vars", help="Template variables as a JSON object."),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="Retrying with the same key never sends twice."
    ),
    wait: float = typer.Option(
        0.0,
        "--wait",
        min=0,
        help="Wait up to this many seconds for the outcome; exit 1 unless the message was accepted by then.",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Send one transactional message (high priority; overtakes campaign mail).

    Exit 0 once it is queued; with --wait, exit 0 only when the receiving server accepted it
    (exit 1 when it failed, or is still on its way when the wait ends)."""
    quiet_logs()
    rt = runtime()
    job_id, created = sending.send_transactional(
        rt.store,
        sender=sender,
        template=template,
        to=to,
        variables=parse_json_object(variables, "--vars"),
        idempotency_key=idempotency_key,
    )
    with rt.connect() as conn:
        job = views.wait_for_outcome(conn, job_id, wait)
    if as_json:
        emit_json({"job_id": job_id, "created": created, "state": job.state, "reply": job.last_reply})
    else:
        verb = "queued" if created else "already sent with this idempotency key:"
        out.print(f"{verb} job {job_id} ({job.state}{', ' + job.last_reply if job.last_reply else ''})", markup=False)
    if job.state == JobState.FAILED:
        raise typer.Exit(1)
    if wait > 0 and job.state != JobState.COMPLETED:
        err.print(f"job {job_id} has not been accepted yet: still {job.state} after {wait:g} s", markup=False)
        raise typer.Exit(1)
