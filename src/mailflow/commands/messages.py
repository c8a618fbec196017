"""Commands room: `mailflow messages` - mail received over SMTP."""

from __future__ import annotations

import sys

import typer

from mailflow.commands.base import JsonOpt, emit_json, new_app, out, quiet_logs, runtime
from mailflow.errors import NotFoundError

app = new_app("Received messages: list, show the raw message.")


@app.command("list")
def messages_list(
    mailbox: str | None = typer.Option(None, "--mailbox", help="Only messages to this address."),
    limit: int = typer.Option(50, "--limit", "-n", min=1),
    as_json: bool = JsonOpt,
) -> None:
    """Received messages, newest first."""
    from mailflow.inbound import queries as q

    quiet_logs()
    with runtime().connect() as conn:
        rows = conn.execute(q.LIST_MESSAGES, {"mailbox": mailbox, "limit": limit}).fetchall()
    cols = ("id", "received_at", "size", "recipients", "helo", "tls", "state")
    found = [dict(zip(cols, r)) for r in rows]
    if as_json:
        emit_json([{**r, "id": str(r["id"]), "received_at": r["received_at"].isoformat()} for r in found])
        return
    for r in found:
        to = ", ".join(r["recipients"])
        out.print(f"{str(r['id'])[:8]}  {r['received_at']:%Y-%m-%d %H:%M:%S}  {r['size']:>8,} B  {to}", markup=False)


@app.command("raw")
def messages_raw(sha256: str = typer.Argument(..., help="The message's sha256 (messages list --json).")) -> None:
    """Write the raw message, as received, to stdout."""
    from mailflow.inbound import queries as q

    quiet_logs()
    with runtime().connect() as conn:
        row = conn.execute(q.GET_RAW, (sha256,)).fetchone()
    if row is None:
        raise NotFoundError(f"no received message with sha256 {sha256}")
    sys.stdout.buffer.write(bytes(row[0]))
