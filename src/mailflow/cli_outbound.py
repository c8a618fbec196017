"""The `mailflow` command, outbound part: senders, send, campaigns, jobs, queues, queuer, worker, up, web.

Registered on the app in cli.py; same conventions: human output, --json, one-line errors.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import orjson
import typer
from rich.table import Table

from mailflow.cli import JsonOpt, _parse_json_object, _quiet_logs, app, emit_json, group, out, run_process, runtime, settings
from mailflow.errors import ConfigurationError, UsageError
from mailflow.outbound import campaigns, sending
from mailflow.outbound import queries as oq
from mailflow.outbound.queuer import Queuer, queue_stats
from mailflow.outbound.senders import Sender, smtp_client
from mailflow.mail.tokens import load_secret
from mailflow.outbound.worker import Worker

senders_app = group("senders", "Senders: From identity, SMTP relay, DKIM key.")
campaigns_app = group("campaigns", "Campaigns: draft -> running -> completed.")
jobs_app = group("jobs", "Jobs: one per recipient message.")


def _iso(v: object) -> object:
    return v.isoformat() if isinstance(v, datetime) else v


# -- senders --------------------------------------------------------------------------------


@senders_app.command("add")
def senders_add(
    name: str = typer.Argument(...),
    from_email: str = typer.Option(..., "--from", help="From address, e.g. news@example.org."),
    from_name: str = typer.Option("", "--from-name"),
    relay: str = typer.Option(..., "--relay", help="smtp://user:pass@host:587, smtps://host:465 (?tls=none for plain), or direct:// to deliver to the recipients' MX hosts."),
    dkim_selector: Optional[str] = typer.Option(None, "--dkim-selector"),
    dkim_key: Optional[Path] = typer.Option(None, "--dkim-key", help="PEM private key file."),
    as_json: bool = JsonOpt,
) -> None:
    """Add or replace a sender."""
    _quiet_logs()
    key = None
    if dkim_key is not None:
        if not dkim_key.is_file():
            raise UsageError(f"no such file: {dkim_key}")
        key = dkim_key.read_text()
    s = sending.save_sender(runtime().store, Sender(name, from_email, from_name, relay, dkim_selector, key))
    if as_json:
        emit_json({"name": s.name, "from": s.from_email, "dkim": key is not None})
    else:
        out.print(f"sender {s.name} saved ({s.from_email} via {s.relay.describe()}, tls {s.relay.tls})")


@senders_app.command("list")
def senders_list(as_json: bool = JsonOpt) -> None:
    """Senders (relay passwords are not shown)."""
    from mailflow.config import mask_url

    _quiet_logs()
    with runtime().connect() as conn:
        rows = [
            {"name": n, "from": f, "from_name": fn, "relay": mask_url(r), "dkim": d}
            for n, f, fn, r, d in conn.execute(oq.LIST_SENDERS).fetchall()
        ]
    if as_json:
        emit_json(rows)
    else:
        for r in rows:
            out.print(f"{r['name']:<16} {r['from']:<32} {r['relay']}{'  dkim' if r['dkim'] else ''}", markup=False)


@senders_app.command("test")
def senders_test(
    name: str = typer.Argument(...),
    domain: str = typer.Option(None, "--domain", help="Direct delivery: the recipient domain whose MX to try"),
    as_json: bool = JsonOpt,
) -> None:
    """Connect to the sender's relay (or, for direct delivery, a domain's MX host) and EHLO."""
    import aiosmtplib

    from mailflow.outbound import mx

    _quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        s = sending.load_sender(conn, name)

    async def probe() -> dict[str, object]:
        relay = s.relay
        if relay.direct:
            target_domain = domain or s.domain
            try:
                host, port = (await mx.MxResolver(rt.settings.mx_overrides, nameservers=rt.settings.dns_servers).hosts(target_domain))[0]
            except (mx.NoRoute, mx.LookupFailed) as exc:
                raise UsageError(f"direct delivery to {target_domain}: {exc}") from exc
            relay = relay.at(host, port or relay.port)
        client = smtp_client(relay, rt.settings.ehlo_hostname)
        started = time.perf_counter()
        try:
            await client.connect()
            code, message = await client.ehlo()
            exts = sorted(client.esmtp_extensions)
            await client.quit()
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise UsageError(f"relay {relay.host}:{relay.port} failed: {exc}") from exc
        return {"sender": name, "host": relay.host, "port": relay.port, "tls": relay.tls, "direct": relay.direct,
                "ehlo_code": code, "greeting": " ".join(message.split())[:200], "extensions": exts,
                "ms": round((time.perf_counter() - started) * 1000, 1)}

    res = asyncio.run(probe())
    if as_json:
        emit_json(res)
    else:
        out.print(f"{res['host']}:{res['port']} answered EHLO with {res['ehlo_code']} in {res['ms']} ms; "
                  f"extensions: {', '.join(res['extensions'])}")


# -- send ---------------------------------------------------------------------------------------


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
    _quiet_logs()
    rt = runtime()
    job_id, created = sending.send_transactional(
        rt.store, sender=sender, template=template, to=to,
        variables=_parse_json_object(variables, "--vars"), idempotency_key=idempotency_key,
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


# -- campaigns -----------------------------------------------------------------------------------


@campaigns_app.command("create")
def campaigns_create(
    name: str = typer.Argument(...),
    sender: str = typer.Option(..., "--sender"),
    template: str = typer.Option(..., "--template"),
    segment: str = typer.Option(..., "--segment"),
    as_json: bool = JsonOpt,
) -> None:
    """Create a draft campaign."""
    _quiet_logs()
    cid = campaigns.create(runtime().store, name=name, sender=sender, template=template, segment=segment)
    emit_json({"id": cid, "name": name, "status": "draft"}) if as_json else out.print(f"campaign {name} created: {cid}")


@campaigns_app.command("start")
def campaigns_start(
    ref: str = typer.Argument(..., help="Campaign id or name."),
    at: Optional[datetime] = typer.Option(None, "--at", help="Start later, at this ISO 8601 time."),
    as_json: bool = JsonOpt,
) -> None:
    """Start now (snapshot the recipients, one job each) or schedule for --at."""
    _quiet_logs()
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
    @campaigns_app.command(action)
    def command(ref: str = typer.Argument(..., help="Campaign id or name."), as_json: bool = JsonOpt) -> None:
        _quiet_logs()
        rt = runtime()
        with rt.connect() as conn:
            cid = campaigns.find(conn, ref)
        fn(rt.store, cid)
        emit_json({"id": cid, "action": action}) if as_json else out.print(f"campaign {action}: {cid}")

    command.__doc__ = f"{action.capitalize()} a campaign."


_simple("pause", campaigns.pause)
_simple("resume", campaigns.resume)
_simple("cancel", campaigns.cancel)


@campaigns_app.command("resend-failed")
def campaigns_resend_failed(ref: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """New jobs for recipients whose job failed for a retryable reason (not bounces or suppressions)."""
    _quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        cid = campaigns.find(conn, ref)
    n = campaigns.resend_failed(rt.store, cid)
    emit_json({"id": cid, "jobs_created": n}) if as_json else out.print(f"{n} recipient(s) will be sent to again")


@campaigns_app.command("status")
def campaigns_status(ref: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Per-state job counts, retries and failures with reasons: who did not get it, and why."""
    _quiet_logs()
    with runtime().connect() as conn:
        st = campaigns.status(conn, campaigns.find(conn, ref))
    if as_json:
        emit_json(st)
        return
    out.print(f"{st['name']} ({st['id']}): {st['status']}, {st['total']} job(s), {st['retries']} retry attempt(s)")
    out.print("  " + "  ".join(f"{k} {v}" for k, v in st["jobs"].items()))
    for f in st["failures"]:
        out.print(f"  failed {f['count']} x {f['kind']}: {f['example']}", markup=False)


@campaigns_app.command("list")
def campaigns_list(limit: int = typer.Option(50, "--limit"), as_json: bool = JsonOpt) -> None:
    """Campaigns, newest first."""
    _quiet_logs()
    with runtime().connect() as conn:
        rows = [
            dict(zip(("id", "name", "status", "recipients", "sender", "template", "segment", "created_at", "started_at", "finished_at"),
                     (str(r[0]), *[_iso(x) for x in r[1:]])))
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


# -- jobs and queues ----------------------------------------------------------------------------


@jobs_app.command("list")
def jobs_list(
    state: Optional[str] = typer.Option(None, "--state"),
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Campaign id or name."),
    limit: int = typer.Option(50, "--limit", "-n", min=1),
    as_json: bool = JsonOpt,
) -> None:
    """Jobs, newest first."""
    _quiet_logs()
    with runtime().connect() as conn:
        cid = campaigns.find(conn, campaign) if campaign else None
        rows = conn.execute(oq.LIST_JOBS, {"state": state, "campaign": cid, "limit": limit}).fetchall()
    keys = ("id", "priority", "state", "email", "campaign_id", "attempts", "last_code", "failure_kind", "created_at", "finished_at")
    items = [dict(zip(keys, (str(r[0]), r[1], r[2], r[3], str(r[4]) if r[4] else None, *[_iso(x) for x in r[5:]]))) for r in rows]
    if as_json:
        emit_json(items)
        return
    for j in items:
        out.print(f"{j['id']}  {j['priority']:<6} {j['state']:<9} {j['email']:<36} attempts {j['attempts']}  {j['last_code'] or ''} {j['failure_kind'] or ''}", markup=False)


@jobs_app.command("show")
def jobs_show(job_id: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """A job's current state and its full history from its events."""
    _quiet_logs()
    rt = runtime()
    jid = sending.job_uuid(job_id)
    with rt.connect() as conn:
        row = conn.execute(oq.GET_JOB, (jid,)).fetchone()
    if row is None:
        raise UsageError(f"no job {job_id}")
    keys = ("id", "idempotency_key", "priority", "state", "email", "sender", "template", "campaign_id", "attempts",
            "due_at", "queue_seq", "lease_until", "worker", "last_code", "last_reply", "failure_kind", "created_at",
            "queued_at", "started_at", "accepted_at", "finished_at")
    job = {k: (str(v) if k in ("id", "campaign_id") and v else _iso(v)) for k, v in zip(keys, row)}
    history = [e.to_dict() for e in rt.store.read_stream(f"job-{jid}")]
    if as_json:
        emit_json({"job": job, "history": history})
        return
    out.print(f"job {job['id']}: {job['state']} ({job['priority']}), to {job['email']}, attempts {job['attempts']}", markup=False)
    for e in history:
        d = {k: v for k, v in e["data"].items() if k not in ("job_id", "variables")}
        out.print(f"  {e['recorded_at']}  {e['type']:<18} {orjson.dumps(d).decode()[:140]}", markup=False)


@app.command("queues")
def queues(as_json: bool = JsonOpt) -> None:
    """Per priority: stream depth, jobs by state, oldest unfinished, p50/p99 latency (pending -> accepted) vs SLA."""
    _quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        rows = queue_stats(conn, rt.redis, rt.keys)
    if as_json:
        emit_json(rows)
        return
    table = Table()
    for col in ("priority", "depth", "pending", "retry", "queued", "active", "completed", "failed", "oldest", "p50", "p99", "SLA"):
        table.add_column(col, justify="left" if col == "priority" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.2f}s"  # noqa: E731
    for r in rows:
        sla = f"{r['sla_s']:.0f}s " + ("" if r["within_sla"] is None else ("ok" if r["within_sla"] else "MISSED"))
        table.add_row(r["priority"], str(r["stream_depth"]), str(r["pending"]), str(r["retry"]), str(r["queued"]),
                      str(r["active"]), str(r["completed"]), str(r["failed"]), fmt(r["oldest_unfinished_s"]),
                      fmt(r["latency_p50_s"]), fmt(r["latency_p99_s"]), sla)
    out.print(table)


# -- long-running processes -------------------------------------------------------------------------


@app.command("queuer")
def queuer_cmd() -> None:
    """Move due jobs from PostgreSQL to the Redis priority streams (one leader; others stand by)."""
    run_process("queuer", None, lambda rt, stop, health: Queuer(
        rt.store, rt.services.redis_url, rt.settings, health=health).run(stop))


@app.command("worker")
def worker_cmd(name: Optional[str] = typer.Option(None, "--name", help="Consumer name (default host-pid).")) -> None:
    """Send jobs over SMTP (asyncio; MAILFLOW_WORKER_CONCURRENCY at once). SIGTERM finishes in-flight sends."""

    def body(rt, stop: threading.Event, health) -> None:
        s = rt.settings
        worker = Worker(rt.store, rt.services.redis_url, s, load_secret(s.home, s.secret_key), name=health.name,
                        health=health)

        async def main() -> None:
            astop = asyncio.Event()
            loop = asyncio.get_running_loop()
            threading.Thread(target=lambda: (stop.wait(), loop.call_soon_threadsafe(astop.set)), daemon=True).start()
            await worker.run(astop)

        asyncio.run(main())

    run_process("worker", name, body, pool_size=8)


@app.command("up")
def up(workers: int = typer.Option(1, "--workers", min=1, max=16)) -> None:
    """Run the whole pipeline, supervised: relay, event_counts, queuer and worker(s) as child processes.

    A child that dies is restarted (and the log says which and why); SIGTERM stops them all.
    """
    from mailflow.outbound.worker import check_settings
    from mailflow.runtime.supervisor import FATAL_EXIT, Supervisor, pipeline_parts

    check_settings(settings())  # before any child starts: one line, exit 2

    def body(rt, stop: threading.Event, health) -> None:
        # Children resolve the same servers: embedded ones are started (once) here first.
        s = rt.settings.model_copy(update={"database_url": rt.services.database_url, "redis_url": rt.services.redis_url})
        supervisor = Supervisor(s, pipeline_parts(workers), health=health)
        code = supervisor.run(stop)
        if code == FATAL_EXIT and supervisor.fatal is not None:
            c = supervisor.fatal
            raise ConfigurationError(f"{c.name} cannot run: {c.last_error or (c.tail[-1] if c.tail else c.last_exit)}")
        if code:
            raise typer.Exit(code)

    run_process("up", None, body)


@app.command("web")
def web_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (put a TLS reverse proxy in front)."),
    port: int = typer.Option(8025, "--port", min=1, max=65535, help="TCP port to listen on."),
) -> None:
    """Serve the unsubscribe links (RFC 8058 one-click) and /healthz over HTTP. SIGTERM stops it."""
    from mailflow.web.app import serve

    run_process("web", f"{host}:{port}", lambda rt, stop, health: serve(rt, host, port, health=health), pool_size=8)
