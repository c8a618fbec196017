"""The `mailflow` command: parses, calls a service, prints. Human output, or --json.

User errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import orjson
import psycopg
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mailflow import log

from mailflow.infra import embedded
from mailflow.runtime.wiring import Runtime
from mailflow.infra.health import Health, read_statuses, status_dir
from mailflow.config import Settings, debug_enabled, load_settings, mask_url
from mailflow.consumers.dlq import DeadLetters
from mailflow.consumers.runtime import ConsumerRunner, checkpoints
from mailflow.errors import MailflowError, UsageError
from mailflow.events.envelope import Envelope, Metadata, NewEvent, uuid7
from mailflow.events.relay import Relay
from mailflow.infra.lifecycle import stop_on_signals
from mailflow.infra.migrate import migrate as apply_migrations
from mailflow.projectors import available as available_projections
from mailflow.projectors import event_counts
from mailflow.projectors import get as get_projection

app = typer.Typer(
    help="mailflow: an event-sourced email pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def group(name: str, help: str) -> typer.Typer:
    """A command group, `mailflow <name> ...`; called alone it shows its help."""
    sub = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub


events_app = group("events", "Append, read and follow events.")
projections_app = group("projections", "Inspect and rebuild projections.")
dlq_app = group("dlq", "Dead letters: events a consumer gave up on.")
services_app = group("services", "The embedded PostgreSQL and Redis.")
contacts_app = group("contacts", "Contacts: import from CSV, list.")
segments_app = group("segments", "Segments: saved filters over contacts.")
templates_app = group("templates", "Templates: subject, HTML and text in sandboxed Jinja2.")
suppressions_app = group("suppressions", "Suppressed addresses: never sent to.")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")


class _State:
    settings: Settings | None = None
    runtime: Runtime | None = None


_state = _State()


def settings() -> Settings:
    if _state.settings is None:
        _state.settings = load_settings()
    return _state.settings


def runtime(pool_size: int = 4) -> Runtime:
    if _state.runtime is None:
        _state.runtime = Runtime(settings(), pool_size=pool_size)
    return _state.runtime


def emit_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
    sys.stdout.flush()


def _quiet_logs() -> None:
    s = settings()
    log.configure(level="warning" if s.log_level == "info" else s.log_level, fmt=s.log_format)


def _stop_with_parent(stop: threading.Event) -> None:
    """A child of `mailflow up` stops (as on SIGTERM) when its supervisor is gone, even after kill -9."""
    parent = os.environ.get("MAILFLOW_PARENT_PID", "")
    if not parent.isdigit():
        return

    def watch() -> None:
        while not stop.wait(1.0):
            if os.getppid() != int(parent):
                stop.set()
                return

    threading.Thread(target=watch, name="mailflow-parent-watch", daemon=True).start()


def run_process(
    role: str, name: str | None, body: Callable[[Runtime, threading.Event, Health], None], *, pool_size: int = 4
) -> None:
    """The frame of every long-running command: log lines on stdout, SIGTERM/SIGINT ask `body`
    to stop, servers that are not up yet are waited for (health.py reports the outage), and
    the process's status is published under MAILFLOW_HOME/run (and to systemd)."""
    s = settings()
    log.configure(s.log_level, s.log_format, stream=sys.stdout)
    stop = stop_on_signals()
    health = Health(role, name or f"{socket.gethostname()}-{os.getpid()}", log.get_logger(f"mailflow.{role}"),
                    status_dir=status_dir(s.home))
    rt = runtime(pool_size=pool_size)
    _stop_with_parent(stop)
    code = 70
    try:
        if rt.wait_until_ready(stop, health):
            health.start()
            body(rt, stop, health)
        code = 0
    except MailflowError as exc:
        code = exc.exit_code
        raise
    except typer.Exit as exc:
        code = exc.exit_code
        raise
    finally:
        health.close(code)


# -- top level ----------------------------------------------------------------------------


@app.command()
def migrate(as_json: bool = JsonOpt) -> None:
    """Apply pending database migrations (safe to run twice, or from two processes)."""
    rt = runtime()
    with rt.connect() as conn:
        done = apply_migrations(conn)
    if as_json:
        emit_json({"applied": done, "database": mask_url(rt.services.database_url)})
    elif done:
        out.print(f"applied {len(done)} migration(s): {', '.join(done)}")
    else:
        out.print("database is up to date")


@app.command()
def health(as_json: bool = JsonOpt) -> None:
    """Long-running mailflow processes on this host, and whether each has PostgreSQL and Redis.

    Read from the status files they keep under MAILFLOW_HOME/run, so it answers while the
    servers are down. Exit code 0 when every process runs with both servers, 1 otherwise.
    """
    s = settings()
    rows = read_statuses(s.home)
    if as_json:
        emit_json(rows)
    elif not rows:
        out.print(f"no mailflow process has published a status under {status_dir(s.home)}", markup=False)
    else:
        table = Table(box=None, pad_edge=False)
        for col in ("process", "state", "pid", "postgres", "redis", "since"):
            table.add_column(col, no_wrap=col != "since")
        for st in rows:
            services = st.get("services", {})

            def cell(svc: str) -> str:
                info = services.get(svc) or {}
                if not st["alive"]:
                    return "-"
                return "ok" if info.get("ok") else f"down {info.get('down_s', '?')} s"

            table.add_row(f"{st['role']}-{st['name']}"[:32], st["state"], str(st.get("pid", "")),
                          cell("postgres"), cell("redis"), str(st.get("started_at", ""))[:19])
        out.print(table)
    if not rows or any(not st["alive"] or st["state"] != "running" for st in rows):
        raise typer.Exit(1)


@app.command()
def relay() -> None:
    """Publish committed events to Redis (one leader; more instances wait as hot standbys)."""
    run_process("relay", None, lambda rt, stop, health: Relay(
        rt.store, rt.services.redis_url, rt.settings, health=health).run(stop))


@app.command()
def consume(
    name: str = typer.Argument(..., help="Projection to run, e.g. event_counts."),
    consumer_id: Optional[str] = typer.Option(None, help="Name within the consumer group (default host-pid)."),
) -> None:
    """Run a consumer: catch up from PostgreSQL, then follow the live stream. SIGTERM stops it."""
    from mailflow.runtime.projections import inline_projections

    if name in inline_projections():
        raise UsageError(f"{name} is an inline projection, kept current by the commands themselves; nothing to consume")
    projection = get_projection(name)
    cid = consumer_id or f"{socket.gethostname()}-{os.getpid()}"
    run_process("consumer", f"{name}.{cid}", lambda rt, stop, health: ConsumerRunner(
        projection, rt.store, rt.services.redis_url, rt.settings, consumer_id=cid, health=health).run(stop))


@app.command()
def demo(
    contacts: int = typer.Option(1000, "--contacts", min=1, max=1_000_000, help="How many contacts to import and mail."),
    transactional: int = typer.Option(20, "--transactional", min=0, help="Transactional messages sent during the campaign."),
    timeout: float = typer.Option(600, "--timeout", help="Give up after this many seconds."),
    as_json: bool = JsonOpt,
) -> None:
    """The outbound pipeline end to end against a misbehaving local SMTP server, then a summary.

    Exits 0 only if every job reached completed or failed.
    """
    from mailflow.runtime import demo as outbound_demo

    _quiet_logs()
    base = settings()
    # Demo pacing: retries after seconds, not minutes; no per-domain throttle on the local sink.
    _state.settings = base.model_copy(update={
        "retry_base_s": 2.0, "retry_max_attempts": 6, "rate_limits": {"*": 5000.0, **base.rate_limits},
        "job_lease_s": 10.0,  # the killed worker's jobs come back in seconds
    })
    rt = runtime(pool_size=16)
    if not as_json:
        err.print(f"services: PostgreSQL {mask_url(rt.services.database_url)}, Redis {mask_url(rt.services.redis_url)}")
    if as_json:
        res = outbound_demo.run(rt, contacts, transactional, timeout)
    else:
        with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err) as bar:
            tasks: dict[str, Any] = {}

            def progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total)
                bar.update(tasks[phase], completed=done, total=total)

            res = outbound_demo.run(rt, contacts, transactional, timeout, progress)
    if as_json:
        emit_json(res.to_dict())
    else:
        _print_demo(res)
    if not res.ok:
        raise typer.Exit(1)


def _print_demo(res: Any) -> None:
    out.print(f"imported {res.contacts} contacts ({res.rejected_rows} bad rows reported), "
              f"campaign to {res.recipients}, {res.transactional} transactional sent during it")
    table = Table(title="jobs by state")
    for s_ in res.states:
        table.add_column(s_, justify="right")
    table.add_row(*[str(n) for n in res.states.values()])
    out.print(table)
    in_flight = sum(f.get("jobs_in_flight", 0) for f in res.faults)
    out.print(f"retry attempts: {res.retries}; duplicates seen by the SMTP server: {res.duplicates}"
              + (f" (at most the {in_flight} in flight at the kill)" if in_flight else ""))
    for f in res.faults:
        if f["kind"] == "worker killed":
            out.print(f"fault at {f['at']}: {f['child']} killed with {f['signal']} with {f['jobs_in_flight']} job(s) "
                      f"in flight; restarted after {f.get('restarted_after_s', '?')} s, its jobs retried after their lease",
                      markup=False)
        else:
            out.print(f"fault at {f['at']}: Redis lost the job streams with {f['jobs_queued']} job(s) queued; "
                      "the queuer added them again from PostgreSQL", markup=False)
    for f in res.failures:
        out.print(f"failed {f['count']} x {f['kind']}: {f['example']}", markup=False)
    lat = Table(title="queue latency (pending -> accepted by SMTP) against the SLA")
    for col in ("priority", "completed", "p50", "p99", "SLA", "met"):
        lat.add_column(col, justify="left" if col == "priority" else "right")
    for r in res.latency:
        if not r["completed"]:
            continue
        lat.add_row(r["priority"], str(r["completed"]), f"{r['latency_p50_s']:.2f}s", f"{r['latency_p99_s']:.2f}s",
                    f"{r['sla_s']:.0f}s", "yes" if r["within_sla"] else "NO")
    out.print(lat)
    out.print(f"{res.seconds:.1f} s, {res.messages_per_s} messages/s delivered, {res.events} events recorded")
    out.print("OK: every job reached completed or failed" if res.ok else "FAILED: some jobs did not finish")


# -- events ---------------------------------------------------------------------------------


def _parse_json_object(raw: str, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


@events_app.command("append")
def events_append(
    stream: str = typer.Argument(..., help="Stream name, e.g. campaign-42."),
    event_type: str = typer.Argument(..., metavar="TYPE", help="Event type, e.g. CampaignCreated."),
    data: str = typer.Option(..., "--data", help="Event data as a JSON object."),
    expected_version: Optional[int] = typer.Option(
        None, "--expected-version", help="Fail unless the stream is at this version (0 = new stream)."
    ),
    schema: int = typer.Option(1, "--schema", min=1, help="Schema version of the data."),
    event_id: Optional[str] = typer.Option(None, "--id", help="Event id (UUID); retries with the same id are no-ops."),
    correlation_id: Optional[str] = typer.Option(None, "--correlation-id"),
    causation_id: Optional[str] = typer.Option(None, "--causation-id"),
    tenant: Optional[str] = typer.Option(None, "--tenant"),
    actor: Optional[str] = typer.Option(None, "--actor"),
    as_json: bool = JsonOpt,
) -> None:
    """Append one event (an operator's tool, like a console producer)."""
    _quiet_logs()
    payload = _parse_json_object(data, "--data")
    try:
        eid = uuid.UUID(event_id) if event_id else uuid7()
    except ValueError as exc:
        raise UsageError(f"--id {event_id!r} is not a UUID") from exc
    md = Metadata(correlation_id=correlation_id, causation_id=causation_id, tenant=tenant, actor=actor)
    store = runtime().store
    [env] = store.append(
        stream, [NewEvent(event_type, payload, schema=schema, id=eid, metadata=md)], expected_version
    )
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
    ts = env.recorded_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{env.position:>8}  {ts}  {env.stream}@{env.version}  {env.type}  {data}"


@events_app.command("tail")
def events_tail(
    from_position: Optional[int] = typer.Option(None, "--from", min=1, help="Start at this position (default: the last --limit events)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events until interrupted."),
    types: Optional[list[str]] = typer.Option(None, "--type", help="Only this type (repeatable)."),
    stream: Optional[str] = typer.Option(None, "--stream", help="Only this stream."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many to show without --from."),
    as_json: bool = JsonOpt,
) -> None:
    """Print events in position order; with --follow, wait for more (Ctrl-C or SIGTERM stops)."""
    _quiet_logs()
    rt = runtime()
    store = rt.store
    store.sequence(wait=False)
    head = store.head()
    after = from_position - 1 if from_position is not None else max(head - limit, 0)
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


@events_app.command("show")
def events_show(position: int = typer.Argument(..., min=1), as_json: bool = JsonOpt) -> None:
    """Show the full envelope of the event at POSITION."""
    _quiet_logs()
    env = runtime().store.get(position)
    if as_json:
        emit_json(env.to_dict())
    else:
        out.print_json(orjson.dumps(env.to_dict()).decode())


@events_app.command("stream")
def events_stream(stream: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Show every event of STREAM in version order."""
    _quiet_logs()
    envs = runtime().store.read_stream(stream)
    if not envs:
        raise MailflowError(f"stream {stream!r} has no events")
    if as_json:
        emit_json([e.to_dict() for e in envs])
        return
    for env in envs:
        pos = env.position if env.position is not None else "-"
        ts = env.recorded_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        out.print(f"v{env.version:<5} pos {pos!s:<8} {ts}  {env.type}  {orjson.dumps(env.data).decode()}", markup=False)


@events_app.command("stats")
def events_stats(
    hourly: bool = typer.Option(False, "--hourly", help="Per-hour counts for the last 24 hours."),
    as_json: bool = JsonOpt,
) -> None:
    """Events per type (from the event_counts projection; see `projections list` for its lag)."""
    _quiet_logs()
    rt = runtime()
    rt.store.sequence(wait=False)
    head = rt.store.head()
    with rt.connect() as conn:
        checkpoint = checkpoints(conn).get("event_counts", (0, None))[0]
        if hourly:
            since = datetime.now(timezone.utc) - timedelta(hours=24)
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


# -- projections ------------------------------------------------------------------------


@projections_app.command("list")
def projections_list(as_json: bool = JsonOpt) -> None:
    """Name, checkpoint, head position and lag (in events) of every projection."""
    _quiet_logs()
    rt = runtime()
    rt.store.sequence(wait=False)
    head = rt.store.head()
    with rt.connect() as conn:
        cps = checkpoints(conn)
        dead = DeadLetters(conn, rt.store, rt.redis, rt.keys).open_counts()
    from mailflow.runtime.projections import inline_projections

    known = available_projections()
    rows = [
        {"name": p.name, "description": p.description, "checkpoint": head, "head": head, "lag": 0,
         "dead_letters": 0, "updated_at": None, "inline": True}
        for p in inline_projections().values()
    ]
    for name in sorted(set(known) | set(cps)):
        cp, updated = cps.get(name, (0, None))
        rows.append({
            "name": name,
            "description": known[name].description if name in known else "(not installed here)",
            "checkpoint": cp,
            "head": head,
            "lag": head - cp,
            "dead_letters": int(dead.get(name, 0)),
            "updated_at": updated.isoformat() if isinstance(updated, datetime) else None,
            "inline": False,
        })
    if as_json:
        emit_json(rows)
        return
    table = Table()
    for col in ("name", "checkpoint", "head", "lag", "dead letters", "description"):
        table.add_column(col, justify="right" if col in ("checkpoint", "head", "lag", "dead letters") else "left")
    for r in rows:
        table.add_row(r["name"], str(r["checkpoint"]), str(r["head"]), str(r["lag"]), str(r["dead_letters"]), r["description"])
    out.print(table)


@projections_app.command("rebuild")
def projections_rebuild(
    name: str = typer.Argument(...),
    from_position: int = typer.Option(1, "--from", min=1, help="Rewind to this position (default: from scratch)."),
    as_json: bool = JsonOpt,
) -> None:
    """Undo and re-apply events from PostgreSQL, with a progress bar."""
    from mailflow.runtime.projections import inline_projections

    _quiet_logs()
    rt = runtime()
    if name in inline_projections():
        _rebuild_inline(rt, name, from_position, as_json)
        return
    runner = ConsumerRunner(get_projection(name), rt.store, rt.services.redis_url, rt.settings)
    stop_on_signals(runner.stop)
    started = datetime.now(timezone.utc)
    try:
        if as_json:
            applied = runner.rebuild(from_position)
        else:
            with Progress(
                TextColumn(f"rebuilding {name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            ) as bar:
                task = bar.add_task("rebuild", total=None)
                first: list[int] = []

                def progress(pos: int, upto: int) -> None:
                    if not first:
                        first.append(pos)
                    bar.update(task, total=max(upto - from_position + 1, 1), completed=pos - from_position + 1)

                applied = runner.rebuild(from_position, progress)
        checkpoint = runner.checkpoint()
    finally:
        runner.close()
    seconds = (datetime.now(timezone.utc) - started).total_seconds()
    result = {
        "projection": name,
        "from": from_position,
        "applied": applied,
        "checkpoint": checkpoint,
        "dead_lettered": runner.dead_lettered,
        "seconds": round(seconds, 3),
        "interrupted": runner.stop.is_set(),
    }
    if as_json:
        emit_json(result)
    else:
        out.print(
            f"rebuilt {name}: {applied} event(s) applied, checkpoint {checkpoint}, "
            f"{runner.dead_lettered} dead-lettered, {seconds:.1f} s"
            + (" (interrupted)" if runner.stop.is_set() else "")
        )
    if runner.stop.is_set():
        raise typer.Exit(130)


def _rebuild_inline(rt: Runtime, name: str, from_position: int, as_json: bool) -> None:
    from mailflow.runtime.projections import inline_projections

    if from_position > 1:
        raise UsageError(f"{name} is an inline projection: it is rebuilt from scratch (drop --from)")
    projection = inline_projections()[name]
    started = datetime.now(timezone.utc)
    if as_json:
        applied = projection.rebuild(rt.store)
    else:
        with Progress(TextColumn(f"rebuilding {name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err) as bar:
            task = bar.add_task("rebuild", total=None)
            applied = projection.rebuild(rt.store, lambda pos, upto: bar.update(task, completed=pos, total=upto))
    seconds = (datetime.now(timezone.utc) - started).total_seconds()
    if as_json:
        emit_json({"projection": name, "from": 1, "applied": applied, "seconds": round(seconds, 3), "inline": True})
    else:
        out.print(f"rebuilt {name}: {applied} event(s) replayed into {', '.join(projection.tables)}, {seconds:.1f} s")


# -- dlq ----------------------------------------------------------------------------------


def _dead_letters(rt: Runtime) -> tuple[DeadLetters, psycopg.Connection]:
    conn = rt.connect()
    return DeadLetters(conn, rt.store, rt.redis, rt.keys), conn


@dlq_app.command("list")
def dlq_list(
    consumer: Optional[str] = typer.Option(None, "--consumer", help="Only this consumer."),
    include_resolved: bool = typer.Option(False, "--all", help="Include retried and dropped ones."),
    as_json: bool = JsonOpt,
) -> None:
    """Dead letters (open ones unless --all)."""
    _quiet_logs()
    dl, conn = _dead_letters(runtime())
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
        table.add_row(str(d.id), d.consumer, where, d.event_type or "(malformed)", str(d.attempts), d.status, d.error[:100])
    out.print(table)


def _dlq_act(action: str, ids: list[int], every: bool, consumer: Optional[str], as_json: bool) -> None:
    _quiet_logs()
    rt = runtime()
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


@dlq_app.command("retry")
def dlq_retry(
    ids: Optional[list[int]] = typer.Argument(None, help="Dead letter ids."),
    every: bool = typer.Option(False, "--all", help="Every open dead letter (of --consumer)."),
    consumer: Optional[str] = typer.Option(None, "--consumer"),
    as_json: bool = JsonOpt,
) -> None:
    """Re-apply dead-lettered events (after the fault is fixed)."""
    _dlq_act("retry", ids or [], every, consumer, as_json)


@dlq_app.command("drop")
def dlq_drop(
    ids: Optional[list[int]] = typer.Argument(None, help="Dead letter ids."),
    every: bool = typer.Option(False, "--all", help="Every open dead letter (of --consumer)."),
    consumer: Optional[str] = typer.Option(None, "--consumer"),
    as_json: bool = JsonOpt,
) -> None:
    """Give up on dead letters for good (the events stay in the log)."""
    _dlq_act("drop", ids or [], every, consumer, as_json)


# -- contacts, segments, templates, suppressions --------------------------------------------


@contacts_app.command("import")
def contacts_import(
    path: Path = typer.Argument(..., help="CSV file with a header row and an `email` column."),
    as_json: bool = JsonOpt,
) -> None:
    """Import contacts; bad rows are reported by line number and the rest is imported."""
    from mailflow.outbound.contacts import import_contacts, parse_csv

    _quiet_logs()
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
                report = import_contacts(store, parse_csv(fh), path.name, progress=lambda n: bar.update(task, completed=n))
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


@contacts_app.command("list")
def contacts_list(
    segment: Optional[str] = typer.Option(None, "--segment", help="Only contacts in this segment."),
    limit: int = typer.Option(50, "--limit", "-n", min=1),
    as_json: bool = JsonOpt,
) -> None:
    """List contacts (optionally those of a segment)."""
    from mailflow.outbound import segments

    _quiet_logs()
    with runtime().connect() as conn:
        doc = segments.load(conn, segment) if segment else {}
        pv = segments.preview(conn, doc, sample=limit)
    _print_contacts(pv, as_json)


def _print_contacts(pv: Any, as_json: bool) -> None:
    if as_json:
        emit_json({"count": pv.count, "contacts": pv.sample})
        return
    table = Table(title=f"{pv.count} contact(s)" + (f", showing {len(pv.sample)}" if pv.count > len(pv.sample) else ""))
    for col in ("email", "status", "attributes"):
        table.add_column(col)
    for c in pv.sample:
        table.add_row(c["email"], c["status"], orjson.dumps(c["attributes"]).decode()[:80])
    out.print(table)


@segments_app.command("create")
def segments_create(
    name: str = typer.Argument(...),
    filter_json: str = typer.Option(..., "--filter", help='Filter, e.g. \'{"attributes.country": "NL"}\' (docs/segments.md).'),
    as_json: bool = JsonOpt,
) -> None:
    """Save a segment (redefining a name replaces its filter)."""
    from mailflow.outbound import segments

    _quiet_logs()
    doc = _parse_json_object(filter_json, "--filter")
    rt = runtime()
    segments.define(rt.store, name, doc)
    with rt.connect() as conn:
        count = segments.preview(conn, doc, sample=0).count
    if as_json:
        emit_json({"name": name, "filter": doc, "count": count})
    else:
        out.print(f"segment {name} saved: {count} contact(s) match now")


@segments_app.command("preview")
def segments_preview(
    name: Optional[str] = typer.Argument(None, help="A saved segment (or use --filter)."),
    filter_json: Optional[str] = typer.Option(None, "--filter"),
    sample: int = typer.Option(10, "--sample", min=0, max=1000),
    as_json: bool = JsonOpt,
) -> None:
    """How many contacts match, and a sample of them."""
    from mailflow.outbound import segments

    _quiet_logs()
    if (name is None) == (filter_json is None):
        raise UsageError("give a segment name or --filter (one of them)")
    with runtime().connect() as conn:
        doc = segments.load(conn, name) if name else _parse_json_object(filter_json or "", "--filter")
        pv = segments.preview(conn, doc, sample=sample)
    _print_contacts(pv, as_json)


@segments_app.command("list")
def segments_list(as_json: bool = JsonOpt) -> None:
    """Saved segments with their filters and current sizes."""
    from mailflow.outbound import queries as oq
    from mailflow.outbound import segments

    _quiet_logs()
    with runtime().connect() as conn:
        rows = [
            {"name": n, "filter": f, "count": segments.preview(conn, f, sample=0).count, "updated_at": u.isoformat()}
            for n, f, u in conn.execute(oq.LIST_SEGMENTS).fetchall()
        ]
    if as_json:
        emit_json(rows)
        return
    table = Table()
    for col in ("name", "contacts", "filter"):
        table.add_column(col, justify="right" if col == "contacts" else "left")
    for r in rows:
        table.add_row(r["name"], str(r["count"]), orjson.dumps(r["filter"]).decode())
    out.print(table)


def _read_text(path: Optional[Path]) -> str:
    if path is None:
        return ""
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    return path.read_text(encoding="utf-8")


@templates_app.command("create")
def templates_create(
    name: str = typer.Argument(...),
    subject: str = typer.Option(..., "--subject"),
    html: Optional[Path] = typer.Option(None, "--html", help="File with the HTML body."),
    text: Optional[Path] = typer.Option(None, "--text", help="File with the plain-text body."),
    as_json: bool = JsonOpt,
) -> None:
    """Save a template (checked: every part must compile); saving a name again replaces it."""
    from mailflow.outbound import templates

    _quiet_logs()
    tpl = templates.Template(name, subject, _read_text(html), _read_text(text))
    templates.save(runtime().store, tpl)
    if as_json:
        emit_json({"name": name, "subject": subject, "html": bool(tpl.html), "text": bool(tpl.text)})
    else:
        out.print(f"template {name} saved")


@templates_app.command("render")
def templates_render(
    name: str = typer.Argument(...),
    variables: str = typer.Option("{}", "--vars", help="Variables as a JSON object."),
    contact: Optional[str] = typer.Option(None, "--contact", help="Use this contact's attributes (and email)."),
    as_json: bool = JsonOpt,
) -> None:
    """Render a template with variables (or a contact's attributes) to check it."""
    from mailflow.outbound import segments, templates

    _quiet_logs()
    values = _parse_json_object(variables, "--vars")
    with runtime().connect() as conn:
        tpl = templates.load(conn, name)
        if contact:
            pv = segments.preview(conn, {"email": contact.strip().lower()}, sample=1)
            if not pv.sample:
                raise UsageError(f"no contact {contact!r}")
            values = {**pv.sample[0]["attributes"], "email": pv.sample[0]["email"], **values}
    r = templates.render(tpl, values)
    if as_json:
        emit_json({"subject": r.subject, "html": r.html, "text": r.text})
    else:
        out.print(f"Subject: {r.subject}\n\n--- text ---\n{r.text}\n--- html ---\n{r.html}", markup=False)


@templates_app.command("list")
def templates_list(as_json: bool = JsonOpt) -> None:
    """Saved templates."""
    from mailflow.outbound import queries as oq

    _quiet_logs()
    with runtime().connect() as conn:
        rows = [{"name": n, "subject": s_, "updated_at": u.isoformat()} for n, s_, u in conn.execute(oq.LIST_TEMPLATES)]
    if as_json:
        emit_json(rows)
    else:
        for r in rows:
            out.print(f"{r['name']:<24} {r['subject']}", markup=False)


@suppressions_app.command("list")
def suppressions_list(limit: int = typer.Option(1000, "--limit", min=1), as_json: bool = JsonOpt) -> None:
    """Suppressed addresses, newest first."""
    from mailflow.outbound import suppressions

    _quiet_logs()
    with runtime().connect() as conn:
        rows = suppressions.listing(conn, limit)
    if as_json:
        emit_json([{**r.__dict__, "created_at": r.created_at.isoformat()} for r in rows])
    else:
        for r in rows:
            out.print(f"{r.email:<40} {r.reason:<12} {r.detail}", markup=False)


@suppressions_app.command("add")
def suppressions_add(
    email: str = typer.Argument(...),
    reason: str = typer.Option("manual", "--reason"),
    detail: str = typer.Option("", "--detail"),
    as_json: bool = JsonOpt,
) -> None:
    """Never send to EMAIL again (until removed)."""
    from mailflow.outbound import suppressions

    _quiet_logs()
    email = suppressions.add(runtime().store, email, reason, detail)
    emit_json({"suppressed": email, "reason": reason}) if as_json else out.print(f"suppressed {email}")


@suppressions_app.command("remove")
def suppressions_remove(email: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Lift a suppression."""
    from mailflow.outbound import suppressions

    _quiet_logs()
    email = suppressions.remove(runtime().store, email)
    emit_json({"unsuppressed": email}) if as_json else out.print(f"no longer suppressed: {email}")


# -- services -----------------------------------------------------------------------------


@services_app.command("status")
def services_status(as_json: bool = JsonOpt) -> None:
    """Show the embedded PostgreSQL and Redis (or the configured URLs)."""
    s = settings()
    rows = []
    for svc in embedded.status(s.home):
        configured = s.database_url if svc.name == "postgres" else s.redis_url
        rows.append({
            "name": svc.name,
            "mode": "configured" if configured else "embedded",
            "running": svc.running,
            "pid": svc.pid,
            "url": mask_url(configured) if configured else svc.url,
            "detail": svc.detail,
        })
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        if r["mode"] == "configured":
            out.print(f"{r['name']:<9} configured  {r['url']}")
        else:
            state = f"running (pid {r['pid']})" if r["running"] else "stopped"
            out.print(f"{r['name']:<9} embedded    {state}  {r['url'] or r['detail']}")


@services_app.command("stop")
def services_stop(as_json: bool = JsonOpt) -> None:
    """Stop the embedded PostgreSQL and Redis under MAILFLOW_HOME."""
    s = settings()
    after = embedded.stop(s.home)
    if as_json:
        emit_json([{"name": x.name, "running": x.running} for x in after])
    else:
        for x in after:
            out.print(f"{x.name:<9} {'still running' if x.running else 'stopped'}")


from mailflow import cli_outbound  # noqa: E402,F401 - registers the outbound commands on `app`


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure a user can cause ends as one `error:` line and an exit code."""
    code = 0
    try:
        result = typer.main.get_command(app).main(args=argv, prog_name="mailflow", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Abort:
        code = 130
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.TyperException as exc:  # usage errors: bad option, missing argument
        message = " ".join((exc.format_message() if hasattr(exc, "format_message") else str(exc)).split())
        if message:  # empty when a group was called without a command: the help was shown
            err.print(f"error: {message} (see --help)", markup=False)
        code = getattr(exc, "exit_code", 2)
    except MailflowError as exc:
        err.print(f"error: {exc}", markup=False)
        code = exc.exit_code
    except psycopg.errors.UndefinedTable as exc:
        err.print(
            f"error: the database is not migrated ({exc.diag.message_primary}); run `mailflow migrate`",
            markup=False,
        )
        code = 2
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # noqa: BLE001
        if debug_enabled():
            raise
        err.print(
            f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())} "
            "(set MAILFLOW_DEBUG=1 for a traceback)",
            markup=False,
        )
        code = 70
    finally:
        _close()
    sys.exit(code)


def _close() -> None:
    if _state.runtime is not None:
        _state.runtime.close()


if __name__ == "__main__":
    # Run as a script, this module is a second copy of mailflow.cli; the commands are
    # registered on the real one (cli_outbound imports it), so run that.
    from mailflow.cli import main as real_main

    real_main()
