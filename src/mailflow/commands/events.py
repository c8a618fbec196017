"""Commands room: `mailflow events` - append, read and follow events; the catalogue of event types
and the AsyncAPI document."""

from __future__ import annotations

import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import typer
from rich import box
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
    settings,
)
from mailflow.consumers.runtime import checkpoints
from mailflow.errors import MailflowError, UsageError
from mailflow.events.envelope import Envelope, Metadata, NewEvent, uuid7
from mailflow.infra.lifecycle import stop_on_signals
from mailflow.projectors import event_counts

app = new_app("Append, read and follow events.")


@app.command("append")
def events_append(
    stream: str = typer.Argument(..., help="Stream name, e.g. campaign-42."),
    event_type: str = typer.Argument(..., metavar="TYPE", help="Event type, e.g. CampaignCreated."),
    data: str = typer.Option(..., "--data", help="Event data as a JSON object."),
    expected_version: int | None = typer.Option(
        None, "--expected-version", help="Fail unless the stream is at this version (0 = new stream)."
    ),
    schema: int = typer.Option(1, "--schema", min=1, help="Schema version of the data."),
    event_id: str | None = typer.Option(None, "--id", help="Event id (UUID); retries with the same id are no-ops."),
    correlation_id: str | None = typer.Option(
        None, "--correlation-id", help="Conversation the event belongs to (default: its own id)."
    ),
    causation_id: str | None = typer.Option(None, "--causation-id", help="Id of the event that caused this one."),
    actor: str | None = typer.Option(None, "--actor", help="Who is acting (default: user@host:pid)."),
    as_json: bool = JsonOpt,
) -> None:
    """Append one event (an operator's tool, like a console producer) to the tenant's stream."""
    quiet_logs()
    payload = parse_json_object(data, "--data")
    try:
        eid = uuid.UUID(event_id) if event_id else uuid7()
    except ValueError as exc:
        raise UsageError(f"--id {event_id!r} is not a UUID") from exc
    md = Metadata(correlation_id=correlation_id, causation_id=causation_id, actor=actor)
    store = runtime().store
    [env] = store.append(stream, [NewEvent(event_type, payload, schema=schema, id=eid, metadata=md)], expected_version)
    # Give it a position now when we can (the relay does it too); appended is committed already.
    if env.position is None:
        store.sequence(wait=False)
        env = store.get_by_id(env.id)
    if as_json:
        emit_json(env.to_dict())
    else:
        where = (
            f"position {env.position}"
            if env.position
            else "position pending (the sequencer assigns it once older transactions finish)"
        )
        out.print(f"appended {env.type} to {env.stream} at version {env.version}, {where}, id {env.id}")


def _fmt_event_line(env: Envelope) -> str:
    data = orjson.dumps(env.data).decode()
    if len(data) > 120:
        data = data[:117] + "..."
    ts = env.recorded_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{env.position:>8}  {ts}  {env.stream}@{env.version}  {env.type}  {data}"


@app.command("tail")
def events_tail(
    from_position: int | None = typer.Option(
        None, "--from", min=1, help="Start at this position (default: the last --limit events)."
    ),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events until interrupted."),
    types: list[str] | None = typer.Option(None, "--type", help="Only this type (repeatable)."),
    stream: str | None = typer.Option(None, "--stream", help="Only this stream."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many to show without --from."),
    all_tenants: bool = typer.Option(
        False, "--all-tenants", help="Every tenant's events (operator); --stream is then a full name."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Print the tenant's events in position order; with --follow, wait for more (Ctrl-C or
    SIGTERM stops)."""
    quiet_logs()
    rt = runtime(operator=all_tenants)
    store = rt.store
    store.sequence(wait=False)
    stop = stop_on_signals() if follow else threading.Event()

    def show(batch: list[Envelope]) -> None:
        for env in batch:
            if as_json:
                emit_json(env.to_dict())
            else:
                out.print(_fmt_event_line(env), markup=False)

    listen = rt.connect() if follow else None
    if listen is not None:
        listen.execute(f"LISTEN {store.channel}")
    try:
        if from_position is not None:
            after = from_position - 1
        else:  # the last --limit events that match, then (with --follow) whatever comes after them
            head = store.head()
            last = store.read_last(limit, types=types, stream=stream)
            show(last)
            after = max(head, last[-1].position or 0) if last else head
        while True:
            batch = store.read_all(after, 1000, types=types, stream=stream)
            if batch:
                show(batch)
                after = batch[-1].position or after
                continue
            if types or stream:
                # Filtered reads may skip over the head; remember how far we looked.
                after = max(after, store.head())
            if not follow or stop.is_set():
                return
            for _ in listen.notifies(timeout=0.5, stop_after=1):  # type: ignore[union-attr]
                pass
            if stop.is_set():
                return
            store.sequence(wait=False)
    finally:
        if listen is not None:
            listen.close()


@app.command("show")
def events_show(
    position: int = typer.Argument(..., min=1, help="Global position of the event."), as_json: bool = JsonOpt
) -> None:
    """Show the full envelope of the event at POSITION."""
    quiet_logs()
    env = runtime().store.get(position)
    if as_json:
        emit_json(env.to_dict())
    else:
        out.print_json(orjson.dumps(env.to_dict()).decode())


@app.command("stream")
def events_stream(
    stream: str = typer.Argument(..., help="Stream name, e.g. job-<id> (the tenant's: <tenant>/job-<id>)."),
    as_json: bool = JsonOpt,
) -> None:
    """Show every event of STREAM in version order (contact-EMAIL and suppression-EMAIL name
    the person's stream, which is named by subject)."""
    quiet_logs()
    rt = runtime()
    envs = rt.store.read_stream(_by_subject(rt, stream))
    if not envs:
        raise MailflowError(f"stream {stream!r} has no events")
    if as_json:
        emit_json([e.to_dict() for e in envs])
        return
    for env in envs:
        pos = env.position if env.position is not None else "-"
        ts = env.recorded_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        out.print(f"v{env.version:<5} pos {pos!s:<8} {ts}  {env.type}  {orjson.dumps(env.data).decode()}", markup=False)


def _by_subject(rt, stream: str) -> str:
    """contact-<address> -> contact-<subject>: people's streams never carry the address."""
    head, _, name = stream.rpartition("/")
    kind, _, rest = name.partition("-")
    if kind not in ("contact", "suppression") or "@" not in rest or rt.store.tenant is None:
        return stream
    with rt.connect() as conn:
        subject = rt.store.subject(conn, rest)
    return f"{head}/{kind}-{subject}" if head else f"{kind}-{subject}"


@app.command("stats")
def events_stats(
    hourly: bool = typer.Option(False, "--hourly", help="Per-hour counts for the last 24 hours."),
    as_json: bool = JsonOpt,
) -> None:
    """Events per type (from the event_counts projection; see `projections list` for its lag)."""
    quiet_logs()
    rt = runtime()
    rt.store.sequence(wait=False)
    head = rt.store.head()
    with rt.connect() as conn:
        checkpoint = checkpoints(conn).get("event_counts", (0, None))[0]
        if hourly:
            since = datetime.now(UTC) - timedelta(hours=24)
            rows = event_counts.hourly(conn, since)
        else:
            rows = event_counts.stats(conn)
    lag = head - checkpoint
    if as_json:
        emit_json({"head": head, "checkpoint": checkpoint, "lag": lag, "rows": rows})
        return
    table = Table(title=f"event_counts (checkpoint {checkpoint} of {head})")
    if hourly:
        for col in ("hour (UTC)", "type", "count"):
            table.add_column(col, justify="right" if col == "count" else "left")
        for r in rows:
            table.add_row(str(r["hour"]), str(r["type"]), str(r["count"]))
    else:
        for col in ("type", "total", "last 24h", "latest hour"):
            table.add_column(col, justify="right" if col in ("total", "last 24h") else "left")
        for r in rows:
            table.add_row(str(r["type"]), str(r["total"]), str(r["last_24h"]), str(r["last_hour"]))
    out.print(table)
    if lag > 0:
        err.print(f"note: event_counts is {lag} event(s) behind; is `mailflow consume event_counts` running?")


@app.command("types")
def events_types(as_json: bool = JsonOpt) -> None:
    """Every event type mailflow registers: its current schema version, the pub/sub channel it
    is announced on and what it records; --json adds the JSON Schema of each type's data."""
    from mailflow.runtime.catalog import catalogue

    quiet_logs()
    types = catalogue()
    if as_json:
        emit_json([t.to_dict() for t in types])
        return
    table = Table(
        title=f"{len(types)} event types",
        caption="channel: also published on the pub/sub channel <prefix>:<channel>",
        width=80,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
    )
    table.add_column("type", no_wrap=True)
    table.add_column("schema", justify="right", no_wrap=True)
    table.add_column("channel", no_wrap=True)
    table.add_column("description", overflow="fold")
    for t in types:
        table.add_row(t.type, str(t.schema_version), t.channel or "", t.description)
    out.print(table)


@app.command("asyncapi")
def events_asyncapi(
    out_file: Path | None = typer.Option(None, "--out", help="Write the document to this file instead of stdout."),
    prefix: str | None = typer.Option(
        None, "--prefix", help="The Redis key prefix its addresses use (default: MAILFLOW_REDIS_PREFIX)."
    ),
) -> None:
    """The AsyncAPI 3 document of the events stream, each event type's message, the job streams,
    the dead letters, the pub/sub channels and the webhooks (docs/asyncapi.json)."""
    from mailflow.events.catalog import render
    from mailflow.runtime.catalog import asyncapi_document

    quiet_logs()
    body = render(asyncapi_document(prefix or settings().redis_prefix))
    if out_file is None:
        sys.stdout.write(body.decode())
        sys.stdout.flush()
        return
    try:
        out_file.write_bytes(body)
    except OSError as exc:
        raise UsageError(f"--out {str(out_file)!r}: {exc.strerror or exc}") from exc
    err.print(f"wrote {out_file} ({len(body)} bytes)", markup=False)
