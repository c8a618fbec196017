"""Commands room: `mailflow demo` - the outbound pipeline end to end, with faults."""

from __future__ import annotations

from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    err,
    new_app,
    out,
    quiet_logs,
    runtime,
    settings,
    state,
)
from mailflow.config import mask_url

app = new_app()


@app.command()
def demo(
    contacts: int = typer.Option(
        1000, "--contacts", min=1, max=1_000_000, help="How many contacts to import and mail."
    ),
    transactional: int = typer.Option(
        20, "--transactional", min=0, help="Transactional messages sent during the campaign."
    ),
    timeout: float = typer.Option(600, "--timeout", help="Give up after this many seconds."),
    as_json: bool = JsonOpt,
) -> None:
    """The outbound pipeline end to end against a misbehaving local SMTP server, then a summary.

    Exits 0 only if every job reached completed or failed.
    """
    from mailflow.runtime import demo as outbound_demo

    quiet_logs()
    base = settings()
    # Demo pacing: retries after seconds, not minutes; no per-domain throttle on the local sink.
    state.settings = base.model_copy(
        update={
            "retry_base_s": 2.0,
            "retry_max_attempts": 6,
            "rate_limits": {"*": 5000.0, **base.rate_limits},
            "job_lease_s": 10.0,  # the killed worker's jobs come back in seconds
        }
    )
    rt = runtime(pool_size=16)
    if not as_json:
        err.print("services:", markup=False)
        err.print(f"  PostgreSQL {mask_url(rt.services.database_url)}", markup=False)
        err.print(f"  Redis {mask_url(rt.services.redis_url)}", markup=False)
    if as_json:
        res = outbound_demo.run(rt, contacts, transactional, timeout)
    else:
        with Progress(
            TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err
        ) as bar:
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
    _say(
        f"tenant {res.tenant}: imported {res.contacts} contacts ({res.rejected_rows} bad rows reported), "
        f"campaign to {res.recipients}, {res.transactional} transactional sent during it"
    )
    if res.secret:
        out.print(f"relay password: only in the secrets table, encrypted (key {res.secret['key_id']})", markup=False)
        out.print(
            f"  {res.secret['fingerprint']}; in {res.secret['events_with_password']} events; "
            f"{res.relay_logins} SMTP logins with it",
            markup=False,
        )
    table = Table(title="jobs by state")
    for s_ in res.states:
        table.add_column(s_, justify="right")
    table.add_row(*[str(n) for n in res.states.values()])
    out.print(table)
    in_flight = sum(f.get("jobs_in_flight", 0) for f in res.faults)
    _say(
        f"retry attempts: {res.retries}; duplicates seen by the SMTP server: {res.duplicates}"
        + (f" (at most the {in_flight} in flight at the kill)" if in_flight else "")
    )
    for f in res.faults:
        if f["kind"] == "worker killed":
            _say(
                f"fault at {f['at']}: {f['child']} killed with {f['signal']} with {f['jobs_in_flight']} job(s) "
                f"in flight; restarted after {f.get('restarted_after_s', '?')} s, its jobs retried after their lease"
            )
        else:
            _say(
                f"fault at {f['at']}: Redis lost the job streams with {f['jobs_queued']} job(s) queued; "
                "the queuer added them again from PostgreSQL"
            )
    for f in res.failures:
        out.print(f"failed {f['count']} x {f['kind']}: {f['example']}"[:80], markup=False)
    lat = Table(title="queue latency (pending -> accepted by SMTP) against the SLA")
    for col in ("priority", "completed", "p50", "p99", "SLA", "met"):
        lat.add_column(col, justify="left" if col == "priority" else "right")
    for r in res.latency:
        if not r["completed"]:
            continue
        lat.add_row(
            r["priority"],
            str(r["completed"]),
            f"{r['latency_p50_s']:.2f}s",
            f"{r['latency_p99_s']:.2f}s",
            f"{r['sla_s']:.0f}s",
            "yes" if r["within_sla"] else "NO",
        )
    out.print(lat)
    out.print(f"{res.seconds:.1f} s, {res.messages_per_s} messages/s delivered, {res.events} events recorded")
    if res.erasure:
        e = res.erasure
        out.print(f"erased {e['email']}:", markup=False)
        out.print(
            f"  {e['rows_naming_before']} rows named them, {e['rows_naming_after']} now; "
            f"campaign counts {'unchanged' if e['counts_unchanged'] else 'CHANGED'}",
            markup=False,
        )
        out.print(f"  a new send is {e['send_after']}"[:80], markup=False)
    if res.inbound:
        i = res.inbound
        out.print(f"inbound: mailflow inbound receives for {i['domain']}", markup=False)
        out.print(f"  (mailbox {i['mailbox']}, a catch-all route to it)", markup=False)
        for r in i["replies"]:
            out.print(f"  {r['what'][:38]:<38} {r['code']} {r['reply'][:34]}", markup=False)
        for m in i.get("messages", []):
            where = ", ".join(m["mailboxes"]) or m["state"]
            dkim = ",".join(m["dkim"]) or "none"
            out.print(f"  {m['state']:<11} to {m['to'][:30]:<30} -> {where[:28]}", markup=False)
            out.print(f"              spf={m['spf']} dkim={dkim} dmarc={m['dmarc']} spam={m['spam']}", markup=False)
        if i.get("came_back"):
            _print_came_back(i["came_back"])
    if res.sending_domain:
        d = res.sending_domain
        checks = ", ".join(f"{c['purpose']} {c['status']}" for c in d["checks"])
        _say(
            f"sending domain {d['domain']}: DKIM key made, records published on a loopback DNS server: {checks} -> {d['status']}"
        )
    if res.api:
        _print_api(res.api)
    if res.stats:
        from mailflow.commands.stats import render_dict

        out.print()
        _say("the last 24 hours, as `mailflow stats` shows them (the aggregates and the facts of this hour):")
        render_dict(res.stats)
        _say(
            f"dashboard: it was served at http://127.0.0.1:{res.dashboard_port}/dashboard during the run; "
            "to look at it now, add a user (`mailflow users add you@example.org --role owner`), run "
            "`mailflow web` and open http://127.0.0.1:8025/dashboard"
        )
    out.print("OK: every job reached completed or failed" if res.ok else "FAILED: some jobs did not finish")


def _print_api(a: dict) -> None:
    """The transactional messages, sent over the HTTP API."""
    _say(
        f"HTTP API {a['url']} (docs {a['docs']}): {a['sent']} transactional messages POSTed to /messages "
        f"with key {a['key']} ({', '.join(a['scopes'])})"
    )
    repeat = (
        "replayed, same job, nothing sent again" if a["repeat_replayed"] and a["repeat_same_job"] else "NOT replayed"
    )
    _say(f"  the first repeated with its Idempotency-Key: {a['repeat_status']} {repeat}")
    _say(f"  {a['events_with_request_id']} of its jobs' {a['events']} events carry the request id as correlation id")


def _print_came_back(c: dict) -> None:
    """What the campaign's recipients sent back, and what it changed."""
    out.print("what came back from the campaign's recipients (classified, applied):", markup=False)
    for a in c["answers"]:
        verdict = a["kind"] + (f" {a['reason']}" if a["reason"] else "")
        if a["kind"] == "bounce":
            verdict += " (hard)" if a["hard"] else " (soft)"
        out.print(f"  {a['what'][:32]:<32} {a['code']} -> {verdict[:40]}", markup=False)
    _say(
        f"  {c['suppressed']} address(es) suppressed, {c['stopped_for_repliers']} contact(s) the campaign "
        f"stopped for (they replied), {c['alerts']} deliverability alert(s)"
    )
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c["came_back"].items() if v)
    _say(f"  campaign status: {counts}")
    if c.get("threads") is not None:
        _say(f"  {c['threads']} conversation thread(s) with replies")
    for w in c.get("webhooks", []):
        _say(f"  webhook {w['url']}: {w['received']} delivery(ies), {w['verified']} signature(s) verified")


def _say(text: str) -> None:
    """A line of the summary, wrapped at 80 columns (what follows the first line indented)."""
    import textwrap

    out.print(textwrap.fill(text, width=80, subsequent_indent="  "), markup=False)
