"""`mailflow demo`: the outbound pipeline end to end, on one machine, with a misbehaving SMTP peer.

Imports N generated contacts (a few bad rows among them), builds a segment, a template and
a campaign, starts it, and sends transactional messages while it drains - through the real
relay, queuer and two workers, run as supervised child processes exactly as `mailflow up`
runs them, into an in-process SMTP server (aiosmtpd) that sometimes answers 4xx, 5xx,
slowly, or drops the connection. Half-way it does what production does now and then: one
worker is killed with SIGKILL (the supervisor restarts it; its jobs come back after their
lease) and Redis loses the job streams (the queuer adds the queued jobs again). Ends with
a summary; exits 0 only if every job reached completed or failed. The children's logs
are in MAILFLOW_HOME/demo-logs. Every number in the summary is this run's alone (its
campaign and the transactional jobs it created; runtime/queries.py), so runs can share a
MAILFLOW_HOME.
"""

from __future__ import annotations

import asyncio
import csv
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailflow.consumers.runtime import ConsumerRunner
from mailflow.infra.net import free_port
from mailflow.infra.personal import Erased
from mailflow.outbound import campaigns, contacts, segments, sending, templates
from mailflow.outbound.contacts import import_contacts, parse_csv
from mailflow.outbound.jobs import SLA_SECONDS, Priority
from mailflow.outbound.senders import Sender
from mailflow.projectors import analytics
from mailflow.projectors.facts import Facts
from mailflow.runtime import demo_api, demo_feedback
from mailflow.runtime import queries as rq
from mailflow.runtime.supervisor import Child, Supervisor, pipeline_parts
from mailflow.runtime.wiring import Runtime
from mailflow.testing.sink import FaultRates, Sink, SinkServer

TEMPLATE_HTML = """<h1>Spring news, {{ first_name }}</h1>
<p>Your {{ plan }} plan in {{ country }} now includes more.</p>
<p><a href="https://example.org/offers?c={{ email | urlencode }}">See the offers</a></p>"""
TEMPLATE_TEXT = (
    "Spring news, {{ first_name }}!\nYour {{ plan }} plan in {{ country }} now includes more.\n"
    "Unsubscribe: {{ unsubscribe_url }}"
)
RECEIPT_HTML = "<p>Thanks {{ name }}, your order {{ order }} is confirmed.</p>"


# Per mille of recipients that misbehave, each the same way on every attempt: unknown users,
# policy blocks, greylisting, dropped connections and slow answers, as real servers do.
FAULTS = FaultRates(bounce=10, policy=5, tempfail=30, drop=10, slow=20)


def write_contacts(path: Path, n: int, run: str) -> int:
    """Write n contacts (and a bad row every 400); returns the number of data rows."""
    countries, plans = ["NL", "BE", "DE", "FR", "GB"], ["free", "pro", "team"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["email", "first_name", "country", "plan", "signup_year"])
        for i in range(n):
            w.writerow([f"reader{i}.{run}@example.net", f"Reader{i}", countries[i % 5], plans[i % 3], 2015 + i % 10])
            if i and i % 400 == 0:
                w.writerow([f"not-an-address-{i}", "Broken", "NL", "free", 2020])  # reported, not imported
    return n + (n - 1) // 400


@dataclass
class DemoResult:
    contacts: int = 0
    rejected_rows: int = 0
    recipients: int = 0
    transactional: int = 0
    states: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    latency: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    messages_per_s: float = 0.0
    events: int = 0
    duplicates: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    timed_out: bool = False
    tenant: str = ""
    relay_logins: int = 0  # SMTP sessions the relay let in with the password from the vault
    secret: dict[str, Any] = field(default_factory=dict)  # its fingerprint, and where the password is not
    erasure: dict[str, Any] = field(default_factory=dict)  # one reader erased after the run
    inbound: dict[str, Any] = field(default_factory=dict)  # mail sent back to mailflow's SMTP server
    api: dict[str, Any] = field(default_factory=dict)  # the transactional messages, sent over HTTP
    sending_domain: dict[str, Any] = field(default_factory=dict)  # its DNS records, published and verified
    stats: dict[str, Any] = field(default_factory=dict)  # `mailflow stats --json` at the end (the last 24 h)
    dashboard_port: int = 0  # where `mailflow web` served the dashboard during the run

    @property
    def ok(self) -> bool:
        unfinished = sum(n for s, n in self.states.items() if s not in ("completed", "failed"))
        return unfinished == 0 and not self.timed_out

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ok"] = self.ok
        return d


def run(
    rt: Runtime,
    contacts: int = 1000,
    transactional: int = 20,
    timeout_s: float = 600,
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoResult:
    res = DemoResult(transactional=transactional)
    store = rt.store
    tag = time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)  # two runs in one second stay apart
    sink = Sink(slow_s=0.2, rates=FAULTS)
    password = secrets.token_urlsafe(12)  # the relay asks for it: the worker reads it from the vault
    with SinkServer(sink, credentials=("demo", password)) as server, tempfile.TemporaryDirectory() as tmp:
        relay = server.relay_url(timeout_s=10).replace("smtp://", f"smtp://demo:{password}@")
        sending.save_sender(store, Sender("demo", "news@example.org", "mailflow demo", relay), rt.vault)
        res.tenant = rt.tenant or ""
        templates.save(
            store, templates.Template("demo-news", "Spring news for {{ first_name }}", TEMPLATE_HTML, TEMPLATE_TEXT)
        )
        templates.save(store, templates.Template("demo-receipt", "Order {{ order }} confirmed", RECEIPT_HTML))
        csv_path = Path(tmp) / "contacts.csv"
        rows = write_contacts(csv_path, contacts, tag)
        with csv_path.open(newline="") as fh:
            report = import_contacts(
                store,
                parse_csv(fh),
                csv_path.name,
                progress=(lambda n: progress("import", n, rows)) if progress else None,
            )
        res.contacts, res.rejected_rows = report.imported, len(report.rejected)
        segment = f"demo-{tag}"
        segments.define(store, segment, {"email": {"$contains": f".{tag}@"}})
        cid = campaigns.create(store, name=f"demo-{tag}", sender="demo", template="demo-news", segment=segment)
        res.sending_domain = demo_api.sending_domain(rt, "example.org")
        head_before = store.sync()
        stop = threading.Event()
        api = demo_api.DemoApi(rt, free_port(), tag)
        supervisor, watcher = _start_pipeline(rt, res, stop, web_port=api.port)
        api.open()
        started = time.perf_counter()
        res.recipients = campaigns.start(store, cid)
        total = res.recipients + transactional
        run_jobs: dict[str, Any] = {"campaign_id": cid, "job_ids": []}  # this run's, for every query
        deadline = time.monotonic() + timeout_s
        try:
            with rt.connect() as conn:
                while True:
                    done = rq.one(conn, rq.DEMO_FINISHED, run_jobs)["done"]
                    # Transactional mail while the campaign drains: it should overtake it.
                    while (sent_tx := len(run_jobs["job_ids"])) < transactional and done >= (
                        sent_tx * res.recipients
                    ) // max(transactional, 1):
                        run_jobs["job_ids"].append(api.send(_receipt(tag, sent_tx)))
                    _inject_faults(rt, supervisor, conn, res, done, total, run_jobs)
                    if progress:
                        progress("send", done, total)
                    if done >= total:
                        break
                    if time.monotonic() > deadline:
                        res.timed_out = True
                        break
                    time.sleep(0.2)
            res.api = api.summary(_receipt(tag, 0), run_jobs["job_ids"])
        finally:
            res.seconds = time.perf_counter() - started
            stop.set()
            watcher.join(120)
        with rt.connect() as conn:
            st = campaigns.status(conn, cid)
            tx_states = {row["state"]: row["n"] for row in rq.rows(conn, rq.DEMO_TRANSACTIONAL_STATES, run_jobs)}
            tx_failures = rq.rows(conn, rq.DEMO_TRANSACTIONAL_FAILURES, run_jobs)
            tx_retries = int(rq.one(conn, rq.DEMO_TRANSACTIONAL_RETRIES, run_jobs)["retries"])
            res.latency = latency(rq.rows(conn, rq.DEMO_LATENCY, run_jobs))
        res.events = store.sync() - head_before
        # Campaign and transactional jobs together: every failure counted is explained.
        res.states = dict(st["jobs"])
        for s, n in tx_states.items():
            res.states[s] = res.states.get(s, 0) + int(n)
        res.retries = st["retries"] + tx_retries
        failures = {f["kind"]: dict(f) for f in st["failures"]}
        for row in tx_failures:
            kind = row["kind"] or "unknown"
            merged = failures.setdefault(kind, {"kind": kind, "count": 0, "example": row["reply"]})
            merged["count"] += int(row["n"])
        res.failures = sorted(failures.values(), key=lambda f: -f["count"])
        delivered = res.states.get("completed", 0)
        res.messages_per_s = round(delivered / res.seconds, 1) if res.seconds else 0.0
        res.duplicates = sum(n - 1 for n in sink.message_ids().values() if n > 1)
        res.relay_logins = server.logins
        with rt.connect() as conn:
            res.secret = rq.one(conn, rq.DEMO_SENDER_SECRET, {"password": f"%{password}%"})
        res.erasure = _erase_one(rt, cid, f"reader1.{tag}@example.net")
        res.inbound = _inbound(rt, tag, cid)
        res.dashboard_port = api.port
        _catch_up_facts(rt)
        with rt.connect() as conn:
            now = datetime.now(UTC)
            res.stats = analytics.summary(conn, analytics.Filter(now - timedelta(hours=24), now), "hour").to_dict()
    return res


def _catch_up_facts(rt: Runtime) -> int:
    """Apply what the facts consumer has not yet (what came back after the pipeline stopped),
    as `mailflow consume facts` would: the numbers are then whole."""
    op = Runtime(rt.settings, pool_size=2, operator=True)
    runner = ConsumerRunner(Facts(), op.store, op.services.redis_url, op.settings)
    try:
        return runner.catch_up()
    finally:
        runner.close()
        op.close()


def _inbound(rt: Runtime, tag: str, campaign_id: str) -> dict[str, Any]:
    """`mailflow inbound` in this process, with authentication against a DNS server of the
    demo's own on loopback (SPF, DKIM and DMARC for two customer domains): a tenant's domain,
    mailbox and catch-all route, then a DKIM-signed question to the mailbox, a message to
    another address at the domain (the route takes it), a spoofed From of a p=reject domain
    (refused at DATA), one of a p=quarantine domain (held), and an attempt to relay (refused).
    Then what comes back from the campaign's recipients (demo_feedback.py): bounces, a
    complaint, auto-replies and replies, classified and applied."""
    import dkim

    from mailflow.inbound import directory, mailbox, routes
    from mailflow.inbound.authn import Authenticator
    from mailflow.inbound.server import Limits, serve
    from mailflow.infra.net import listen
    from mailflow.testing.dns import DnsServer, dkim_keypair

    domain = f"in-{tag}.example"
    directory.add_domain(rt.store, domain)
    box = directory.add_mailbox(rt.store, f"help@{domain}", "Help desk")
    routes.add_route(rt.store, f"*@{domain}", "mailbox", box)
    key, record = dkim_keypair()
    zone = {
        ("customer.example", "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
        ("demo._domainkey.customer.example", "TXT"): [record],
        ("_dmarc.customer.example", "TXT"): ["v=DMARC1; p=reject"],
        ("bank.example", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
        ("_dmarc.bank.example", "TXT"): ["v=DMARC1; p=reject"],
        ("shop.example", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
        ("_dmarc.shop.example", "TXT"): ["v=DMARC1; p=quarantine"],
    }
    operator = Runtime(rt.settings, pool_size=4, operator=True)
    stop, ready, port = threading.Event(), threading.Event(), [0]

    def on_ready(bound: int) -> None:
        port[0] = bound
        ready.set()

    sent = [
        ("a signed question to the mailbox", "ann@customer.example", box),
        ("a message the catch-all route takes", "ann@customer.example", f"sales@{domain}"),
        ("a spoofed From of a p=reject bank", "x@customer.example", box),
        ("a spoofed From of a p=quarantine shop", "x@customer.example", box),
        ("an attempt to relay through mailflow", "spammer@bad.example", "victim@elsewhere.example"),
    ]
    senders = {2: "Bank <alerts@bank.example>", 3: "Shop <news@shop.example>"}
    replies = []
    with rt.connect() as conn:  # this run's messages only (the home may hold earlier runs')
        started = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    with DnsServer(zone) as dns_server:
        server = threading.Thread(
            target=serve,
            args=(operator.store, "127.0.0.1", 0, stop),
            kwargs={
                "limits": Limits(),
                "secret": rt.keyring.verifying_keys,
                "hostname": "mx.demo",
                "listen": listen,
                "ready": on_ready,
                "authenticator": Authenticator(nameservers=[dns_server.address], timeout_s=2.0),
            },
            daemon=True,
        )
        server.start()
        ready.wait(20)
        try:
            for i, (what, mail_from, to) in enumerate(sent):
                data = _demo_message(senders.get(i, mail_from or "MAILER-DAEMON@mx.example.net"), to, what)
                if i in (0, 1):
                    data = (
                        dkim.sign(data, b"demo", b"customer.example", key, include_headers=[b"from", b"subject"]) + data
                    )
                code, text = asyncio.run(_send_one(port[0], mail_from, to, data))
                replies.append({"what": what, "code": code, "reply": text})
            receiver = demo_feedback.Receiver()
            demo_feedback.subscribe(rt, receiver)
            answers = demo_feedback.answer(rt, port[0], campaign_id)
        finally:
            stop.set()
            server.join(30)
        demo_feedback.apply(operator)
        demo_feedback.deliver(operator, receiver, started)
        receiver.close()
        operator.close()
    came_back = demo_feedback.summary(rt, campaign_id, started, answers, receiver)
    with rt.connect() as conn:
        stored = int(rq.one(conn, rq.DEMO_INBOUND_STORED, {"mailbox": box})["n"])
        received = mailbox.messages(conn, limit=20)
    verdicts = [
        {
            "to": ", ".join(m["recipients"]),
            "state": m["state"],
            "mailboxes": m["mailboxes"],
            "spf": (m["auth"] or {}).get("spf"),
            "dkim": [d["result"] for d in (m["auth"] or {}).get("dkim", [])],
            "dmarc": (m["auth"] or {}).get("dmarc"),
            "spam": (m["spam"] or {}).get("score"),
        }
        for m in reversed(received)
        if m["received_at"] >= started and any(r.endswith("@" + domain) for r in m["recipients"])
    ]
    return {
        "domain": domain,
        "mailbox": box,
        "replies": replies,
        "stored_for_mailbox": stored,
        "messages": verdicts,
        "came_back": came_back,
    }


def _demo_message(from_: str, to: str, subject: str) -> bytes:
    return (
        f"From: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
        f"Message-ID: <{uuid.uuid4()}@demo.example>\r\n\r\nHello\r\n"
    ).encode()


async def _send_one(port: int, mail_from: str, to: str, message: bytes) -> tuple[int, str]:
    import aiosmtplib

    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(mail_from)
        await client.rcpt(to)
        reply = await client.data(message)
        return reply.code, reply.message
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        client.close()


def _erase_one(rt: Runtime, campaign_id: str, email: str) -> dict[str, Any]:
    """Erase one reader after the run: the rows that named them before and after, the
    campaign's counts before and after, and what a new send to them answers."""
    like = {"like": f"%{email}%"}
    with rt.connect() as conn:
        before = int(rq.one(conn, rq.DEMO_ROWS_NAMING, like)["rows"])
        counts_before = dict(campaigns.status(conn, campaign_id)["jobs"])
    erased = contacts.erase(rt.store, email.upper(), actor="mailflow demo")
    with rt.connect() as conn:
        after = int(rq.one(conn, rq.DEMO_ROWS_NAMING, like)["rows"])
        counts_after = dict(campaigns.status(conn, campaign_id)["jobs"])
    try:
        sending.send_transactional(
            rt.store, sender="demo", template="demo-receipt", to=email, variables={"name": "x", "order": "x"}
        )
        send = "sent (wrong)"
    except Erased as exc:
        send = f"refused: {exc}"
    return {
        "email": email,
        "jobs": erased.jobs,
        "rows_naming_before": before,
        "rows_naming_after": after,
        "counts_unchanged": counts_before == counts_after,
        "send_after": send,
    }


def latency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per priority (high first): the run's finished jobs and its latency percentiles against the SLA."""
    by_priority = {row["priority"]: row for row in rows}
    out = []
    for p in Priority:
        row = by_priority.get(str(p), {})
        p50, p99 = row.get("p50"), row.get("p99")
        out.append(
            {
                "priority": str(p),
                "completed": int(row.get("completed") or 0),
                "failed": int(row.get("failed") or 0),
                "latency_p50_s": None if p50 is None else round(float(p50), 3),
                "latency_p99_s": None if p99 is None else round(float(p99), 3),
                "sla_s": SLA_SECONDS[p],
                "within_sla": None if p99 is None else float(p99) <= SLA_SECONDS[p],
            }
        )
    return out


DEMO_WORKERS = 2


def _receipt(tag: str, n: int) -> dict[str, Any]:
    """The body of the demo's n-th transactional message (POST /api/v1/messages)."""
    return {
        "sender": "demo",
        "template": "demo-receipt",
        "to": f"buyer{n}.{tag}@example.com",
        "variables": {"name": f"Buyer {n}", "order": f"A-{1000 + n}"},
    }


def _start_pipeline(
    rt: Runtime, res: DemoResult, stop: threading.Event, *, web_port: int
) -> tuple[Supervisor, threading.Thread]:
    """Relay, the consumers, queuer, two workers and the web (the HTTP API on `web_port`) as child
    processes, as `mailflow up` runs them."""
    s = rt.settings.model_copy(update={"database_url": rt.services.database_url, "redis_url": rt.services.redis_url})

    def on_exit(child: Child, code: int) -> None:
        for f in res.faults:
            if f.get("child") == child.name and "exit" not in f:
                f["exit"] = child.last_exit
                f["restarted_after_s"] = child.restart_in

    supervisor = Supervisor(
        s,
        pipeline_parts(DEMO_WORKERS, prefix="demo", web=["--host", "127.0.0.1", "--port", str(web_port)]),
        log_dir=s.home / "demo-logs",
        on_exit=on_exit,
    )
    supervisor.start()
    watcher = threading.Thread(target=supervisor.run, args=(stop,), name="demo-supervisor", daemon=True)
    watcher.start()
    return supervisor, watcher


def _inject_faults(
    rt: Runtime, supervisor: Supervisor, conn: Any, res: DemoResult, done: int, total: int, run_jobs: dict[str, Any]
) -> None:
    """At 25%: Redis loses the job streams (with a backlog queued). At 50%: SIGKILL a worker mid-send."""
    kinds = {f["kind"] for f in res.faults}
    if "worker killed" not in kinds and done >= total * 0.5:
        child = supervisor.child("worker-1")
        if child.proc is not None:
            in_flight = rq.one(conn, rq.DEMO_ACTIVE_OF, {**run_jobs, "worker": child.args[-1]})["n"]
            child.proc.kill()
            res.faults.append(
                {
                    "kind": "worker killed",
                    "child": child.name,
                    "signal": "SIGKILL",
                    "at": f"{100 * done // max(total, 1)}%",
                    "jobs_in_flight": int(in_flight),
                }
            )
    if "job streams lost" not in kinds and done >= total * 0.25:
        keys = [rt.keys.jobs(p) for p in ("high", "normal", "low")] + [rt.keys.jobs_epoch]
        queued = rq.one(conn, rq.DEMO_QUEUED, run_jobs)["n"]
        rt.redis.delete(*keys)
        res.faults.append(
            {"kind": "job streams lost", "at": f"{100 * done // max(total, 1)}%", "jobs_queued": int(queued)}
        )
