"""Commands room: `mailflow dlq` - dead letters: events a consumer gave up on."""

from __future__ import annotations

import psycopg
import typer
from rich.table import Table

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    err,
    new_app,
    out,
    quiet_logs,
    runtime,
)
from mailflow.consumers.dlq import DeadLetters
from mailflow.errors import MailflowError
from mailflow.runtime.projections import get as get_projection
from mailflow.runtime.wiring import Runtime

app = new_app("Dead letters: events a consumer gave up on.")


def _dead_letters(rt: Runtime) -> tuple[DeadLetters, psycopg.Connection]:
    conn = rt.connect()
    return DeadLetters(conn, rt.store, rt.redis, rt.keys), conn


@app.command("list")
def dlq_list(
    consumer: str | None = typer.Option(None, "--consumer", help="Only this consumer."),
    include_resolved: bool = typer.Option(False, "--all", help="Include retried and dropped ones."),
    as_json: bool = JsonOpt,
) -> None:
    """Dead letters (open ones unless --all)."""
    quiet_logs()
    dl, conn = _dead_letters(runtime(operator=True))
    with conn:
        letters = dl.list(consumer, include_resolved=include_resolved)
    if as_json:
        emit_json([d.to_dict() for d in letters])
        return
    if not letters:
        out.print("no dead letters")
        return
    table = Table()
    for col in ("id", "consumer", "position", "type", "attempts", "status", "error"):
        table.add_column(col)
    for d in letters:
        where = str(d.position) if d.position is not None else f"entry {d.entry_id}"
        table.add_row(
            str(d.id), d.consumer, where, d.event_type or "(malformed)", str(d.attempts), d.status, d.error[:100]
        )
    out.print(table)


def _dlq_act(action: str, ids: list[int], every: bool, consumer: str | None, as_json: bool) -> None:
    quiet_logs()
    rt = runtime(operator=True)
    dl, conn = _dead_letters(rt)
    done, failed = [], []
    with conn:
        letters = dl.select(ids, consumer, every)
        for letter in letters:
            try:
                if action == "retry":
                    dl.retry(letter, get_projection)
                else:
                    dl.drop(letter)
                done.append(letter.id)
            except MailflowError as exc:
                failed.append({"id": letter.id, "error": str(exc)})
    if as_json:
        emit_json({action: done, "failed": failed})
    else:
        verb = "re-applied" if action == "retry" else "dropped"
        out.print(f"{verb} {len(done)} dead letter(s)" + (f": {', '.join(map(str, done))}" if done else ""))
        for f in failed:
            err.print(f"error: {f['error']}")
    if failed:
        raise typer.Exit(1)


@app.command("retry")
def dlq_retry(
    ids: list[int] | None = typer.Argument(None, help="Dead letter ids."),
    every: bool = typer.Option(False, "--all", help="Every open dead letter (of --consumer)."),
    consumer: str | None = typer.Option(None, "--consumer"),
    as_json: bool = JsonOpt,
) -> None:
    """Re-apply dead-lettered events (after the fault is fixed)."""
    _dlq_act("retry", ids or [], every, consumer, as_json)


@app.command("drop")
def dlq_drop(
    ids: list[int] | None = typer.Argument(None, help="Dead letter ids."),
    every: bool = typer.Option(False, "--all", help="Every open dead letter (of --consumer)."),
    consumer: str | None = typer.Option(None, "--consumer"),
    as_json: bool = JsonOpt,
) -> None:
    """Give up on dead letters for good (the events stay in the log)."""
    _dlq_act("drop", ids or [], every, consumer, as_json)
