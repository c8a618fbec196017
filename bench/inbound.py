"""Inbound benchmark: `mailflow inbound` against a bare aiosmtpd server, same client, same run.

Run `python bench/inbound.py --json` (one JSON object on stdout; progress on stderr) against
the servers MAILFLOW_DATABASE_URL and MAILFLOW_REDIS_URL point to, or the embedded default.
It creates its own database (dropped at the end unless --keep), a tenant domain and mailbox,
and sends N messages of realistic size (4 KiB, each different) over S sessions:

1. to a bare aiosmtpd server in its own process whose handler only answers 250
   (`baseline_aiosmtpd_per_s`);
2. to `mailflow inbound` in its own process, where every 250 means committed
   (`inbound_accepted_per_s`, `accept_p99_ms`: end of DATA to the reply, as the client sees it).

Then it counts what PostgreSQL holds: `lost` is the messages that got a 250 and are not
stored (must be 0). The client is postfix's `smtp-source` when it is installed (apt-get
install postfix), else aiosmtplib in client processes; the result says which (smtp-source
reports no per-message latency, so accept_p99_ms is null then).

Authentication is on, against a DNS server of the benchmark's own on loopback that publishes
SPF (`ip4:127.0.0.1`), a DKIM key and DMARC (`p=none`) for the senders' domain; the aiosmtplib
client DKIM-signs every message (before the clock starts), smtp-source's messages are not
signed (the result says `dkim_signed`). The spam check is the built-in rules. Routing is
decided before the 250 and committed with the message: `routed_per_s` is the messages that
landed in the mailbox over the span of their delivery times.

3. What came back (`classified_per_s`): a realistic mix of --classify-messages messages - DSN
   bounces in three MTAs' formats to campaign jobs' VERP addresses, a few ARF complaints,
   replies and out-of-office answers to the sender's From, and other mail to the mailbox - is
   accepted by `mailflow inbound` first (a backlog), then the relay, the inbound_classifier and
   the outbound_feedback consumers are started as processes: from the first classification to
   the moment every message is classified, its effects applied (the feedback consumer at the
   head of the log) and its notification published on pub/sub (counted by a subscriber), over
   the number of messages. `classify_lost` is accepted messages without a classification.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import finish, percentile, phase, rnd, say, scratch
from mailflow.config import load_settings
from mailflow.infra.services import connect
from mailflow.runtime.wiring import Runtime
from mailflow.testing.dns import DnsServer, dkim_keypair

GOALS: dict[str, tuple[str, float]] = {
    "inbound_accepted_per_s": (">=", 1000),
    "classified_per_s": (">=", 500),
    "classify_lost": ("==", 0),
    "ratio_vs_aiosmtpd": (">=", 0.5),
    "accept_p99_ms": ("<", 50),
    "lost": ("==", 0),
}
DOMAIN = "bench.example"
MAILBOX = f"inbox@{DOMAIN}"
SENDERS = "customers.example"


def zone(record: str) -> dict[tuple[str, str], list[str]]:
    return {
        (SENDERS, "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
        (f"bench._domainkey.{SENDERS}", "TXT"): [record],
        (f"_dmarc.{SENDERS}", "TXT"): ["v=DMARC1; p=none"],
    }


@dataclass
class Params:
    messages: int = 20_000
    sessions: int = 10
    client_processes: int = 2
    size: int = 4096
    server_processes: int = 2  # mailflow inbound --processes: servers sharing the port
    classify_messages: int = 5000  # the what-came-back mix (phase 3)

    @classmethod
    def quick(cls) -> Params:
        return cls(messages=1000, sessions=4, client_processes=1, classify_messages=1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(i: int, size: int) -> bytes:
    head = (
        f"From: Sender {i} <sender{i}@customers.example>\r\nTo: {MAILBOX}\r\nSubject: Question {i}\r\n"
        f"Message-ID: <{uuid.uuid4()}@customers.example>\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def _baseline_server(port: int, ready: Any) -> None:
    from aiosmtpd.smtp import SMTP

    class Answer:
        async def handle_DATA(self, server, session, envelope):
            return "250 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Answer(), decode_data=False), "127.0.0.1", port)
        ready.set()
        async with server:
            await asyncio.Event().wait()

    asyncio.run(main())


def _client(port: int, first: int, count: int, sessions: int, size: int, key: bytes, out: Any) -> None:
    import aiosmtplib
    import dkim

    latencies: list[float] = []
    acked = 0
    signed = {}
    for i in range(first, first + count):  # before the clock: signing is the sender's cost
        data = message(i, size)
        headers = [b"from", b"to", b"subject", b"date", b"message-id"]
        signed[i] = dkim.sign(data, b"bench", SENDERS.encode(), key, include_headers=headers) + data
    out.put("signed")

    async def session(indices: list[int]) -> None:
        nonlocal acked
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await smtp.connect()
        for i in indices:
            await smtp.mail(f"sender{i}@{SENDERS}")
            await smtp.rcpt(MAILBOX)
            data = signed[i]
            t0 = time.perf_counter()
            reply = await smtp.data(data)
            latencies.append((time.perf_counter() - t0) * 1000)
            if reply.code == 250:
                acked += 1
        await smtp.quit()

    async def main() -> None:
        mine = list(range(first, first + count))
        await asyncio.gather(*(session(mine[k::sessions]) for k in range(sessions)))

    asyncio.run(main())
    out.put((acked, latencies))


def drive(port: int, p: Params, first: int, key: bytes) -> dict[str, Any]:
    """Send p.messages to the port; messages/s, acked, latencies."""
    source = shutil.which("smtp-source") or (
        "/usr/sbin/smtp-source" if Path("/usr/sbin/smtp-source").exists() else None
    )
    t0 = time.perf_counter()
    if source and not os.environ.get("BENCH_AIOSMTPLIB"):
        subprocess.run(
            [source, "-s", str(p.sessions), "-m", str(p.messages), "-l", str(p.size), "-c",
             "-f", f"sender@{SENDERS}", "-t", MAILBOX, f"127.0.0.1:{port}"],
            check=True, capture_output=True, timeout=1800,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        return {
            "client": "smtp-source",
            "per_s": p.messages / seconds,
            "acked": p.messages,
            "latencies": [],
            "dkim_signed": False,
        }
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    share = p.messages // p.client_processes
    procs = [
        ctx.Process(
            target=_client,
            args=(port, first + k * share, share, max(1, p.sessions // p.client_processes), p.size, key, out),
        )
        for k in range(p.client_processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        assert out.get(timeout=1800) == "signed"
    t0 = time.perf_counter()
    results = [out.get(timeout=1800) for _ in procs]
    seconds = time.perf_counter() - t0
    for proc in procs:
        proc.join(30)
    acked = sum(a for a, _ in results)
    latencies = sorted(x for _, lat in results for x in lat)
    return {
        "client": f"aiosmtplib ({p.client_processes} processes, {p.sessions} sessions in all)",
        "per_s": acked / seconds,
        "acked": acked,
        "latencies": latencies,
        "dkim_signed": True,
    }


ROUTED = """
SELECT (SELECT count(*) FROM mailbox_messages),
       (SELECT extract(epoch FROM max(delivered_at) - min(delivered_at)) FROM mailbox_messages),
       (SELECT jsonb_object_agg(v, n) FROM (SELECT auth->>'spf' || '/' || coalesce(auth->'dkim'->0->>'result', 'none')
                                              || '/' || (auth->>'dmarc') AS v, count(*) AS n
                                            FROM inbound_messages GROUP BY 1) x)
"""


def _stages(log: Path) -> dict[str, float] | None:
    """The servers' own time per message and stage, from their `inbound.stop` log lines
    (weighted by what each committed)."""
    totals: dict[str, float] = {}
    committed = 0
    for line in log.read_bytes().splitlines():
        if b'"inbound.stop"' not in line:
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        n = int(record.get("committed", 0))
        committed += n
        for k, v in record.items():
            if k.endswith("_ms"):
                totals[k.removesuffix("_ms")] = totals.get(k.removesuffix("_ms"), 0.0) + v * n
    return {k: round(v / committed, 2) for k, v in totals.items()} if committed else None


def _child_env(sc: Any, **extra: str) -> dict[str, str]:
    """The environment of a `mailflow` child process on the scratch database and prefix."""
    return dict(
        os.environ,
        MAILFLOW_DATABASE_URL=sc.db_url,
        MAILFLOW_REDIS_URL=sc.redis_url,
        MAILFLOW_REDIS_PREFIX=sc.prefix,
        MAILFLOW_HOME=str(sc.workdir),
        MAILFLOW_LOG_FORMAT="json",
        **extra,
    )


def run(p: Params, keep: bool) -> dict[str, Any]:
    elapsed: dict[str, float] = {}
    t_total = time.perf_counter()
    load_start = os.getloadavg()[0]
    out: dict[str, Any] = {}
    with scratch("inbound", keep, elapsed) as sc:
        out.update(sc.info)
        settings = load_settings().model_copy(
            update={"database_url": sc.db_url, "redis_url": sc.redis_url, "redis_prefix": sc.prefix, "home": sc.workdir}
        )
        rt = Runtime(settings, pool_size=2)
        with phase(elapsed, "setup"):
            from mailflow.inbound import directory

            directory.add_domain(rt.store, DOMAIN)
            directory.add_mailbox(rt.store, MAILBOX, "bench")
        rt.close()
        key, record = dkim_keypair()
        dns_server = DnsServer(zone(record)).__enter__()
        with phase(elapsed, "baseline_aiosmtpd"):
            port = free_port()
            ctx = mp.get_context("spawn")
            ready = ctx.Event()
            server = ctx.Process(target=_baseline_server, args=(port, ready), daemon=True)
            server.start()
            ready.wait(30)
            base = drive(port, p, 0, key)
            server.terminate()
            server.join(10)
        out["baseline_aiosmtpd_per_s"] = round(base["per_s"])
        say(f"  bare aiosmtpd: {base['per_s']:.0f} messages/s ({base['client']})")
        with phase(elapsed, "mailflow_inbound"):
            port = free_port()
            env = _child_env(
                sc,
                MAILFLOW_LOG_LEVEL="info",
                MAILFLOW_INBOUND_MAX_CONNECTIONS_PER_IP=str(max(20, p.sessions * 2)),
                MAILFLOW_DNS_SERVERS=orjson.dumps([dns_server.address]).decode(),
            )
            inbound = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mailflow.cli",
                    "inbound",
                    "--port",
                    str(port),
                    "--processes",
                    str(p.server_processes),
                ],
                env=env,
                stdout=(log := open(sc.workdir / "inbound.log", "wb")),  # noqa: SIM115 - closed with the process
                stderr=subprocess.STDOUT,
            )
            _listening(port, inbound)
            got = drive(port, p, p.messages, key)
            inbound.send_signal(signal.SIGTERM)
            inbound.wait(60)
            log.close()
            stages = _stages(sc.workdir / "inbound.log")
        dns_server.__exit__(None, None, None)
        with connect(sc.db_url) as conn:
            stored = conn.execute("SELECT count(*) FROM inbound_messages").fetchone()[0]  # type: ignore[index]
            routed, span, verdicts = conn.execute(ROUTED).fetchone()  # type: ignore[misc]
        lat = got["latencies"]
        out.update(
            client=got["client"],
            messages=p.messages,
            message_bytes=p.size,
            inbound_accepted_per_s=round(got["per_s"]),
            ratio_vs_aiosmtpd=round(got["per_s"] / base["per_s"], 3) if base["per_s"] else None,
            accept_p50_ms=rnd(percentile(lat, 50), 2) if lat else None,
            accept_p99_ms=rnd(percentile(lat, 99), 2) if lat else None,
            acked=got["acked"],
            stored=stored,
            lost=max(0, got["acked"] - stored),
            routed=routed,
            routed_per_s=round(routed / span) if span else None,
            dkim_signed=got["dkim_signed"],
            verdicts=verdicts,
            server_ms_per_message=stages,
        )
        say(f"  mailflow inbound: {got['per_s']:.0f} messages/s, {stored} stored of {got['acked']} acknowledged")
    if p.classify_messages:
        with phase(elapsed, "classify"):
            out.update(classify_mix(p.classify_messages, keep, elapsed))
        say(f"  classified: {out['classified_per_s']} messages/s, {out['classify_lost']} lost")
    notes = {
        "classified_clock": "from the first classification to every message classified, applied and announced",
        "clock": "from the first connection to the last reply, for all sessions together",
        "accept_ms": "the client's DATA call: sending 4 KiB on loopback plus the wait for the reply",
        "machine": "client, server, PostgreSQL share the machine's CPUs",
    }
    return finish(out, GOALS, p, notes, load_start, elapsed, t_total)


OUT_SENDER = "news@bench-out.example"


def _mix(rt: Runtime, n: int) -> list[tuple[str, str, str, bytes]]:
    """n messages that come back, as (kind, mail from, rcpt to, data): to the jobs of a started
    campaign (one per contact), in the proportions a sending domain sees."""
    from mailflow.mail import tokens
    from mailflow.mail.message_ids import message_id
    from mailflow.outbound import campaigns, segments, templates
    from mailflow.outbound.contacts import import_csv_text
    from mailflow.outbound.senders import Sender
    from mailflow.outbound.sending import save_sender
    from mailflow.testing import mail

    save_sender(rt.store, Sender("news", OUT_SENDER, "News", "smtp://127.0.0.1:9?tls=none"))
    templates.save(rt.store, templates.Template("news", "News", "<p>Hello</p>", "Hello"))
    people = [f"reader{i}@readers.example" for i in range(n)]
    import_csv_text(rt.store, "email,name\n" + "\n".join(f"{e},R" for e in people) + "\n")
    segments.define(rt.store, "readers", {})
    cid = campaigns.create(rt.store, name="bench", sender="news", template="news", segment="readers")
    campaigns.start(rt.store, cid)
    with rt.connect() as conn:
        conn.execute("UPDATE jobs SET accepted_at = now(), state = 'completed' WHERE campaign_id = %s", (cid,))
        jobs = {str(s): str(j) for s, j in conn.execute("SELECT subject, id FROM jobs WHERE campaign_id = %s", (cid,))}
        subjects = {e: rt.store.subject(conn, e) for e in people}
    key = rt.keyring.signing_key
    out = []
    for i, email in enumerate(people):
        job = jobs[subjects[email]]
        sent = mail.Sent(
            message_id(job, "bench-out.example"), tokens.verp_address(key, job, "bench-out.example"), OUT_SENDER, email
        )
        k = i % 20
        if k < 6:  # 30%: bounces, hard and soft, three formats
            data = (
                mail.postfix_dsn(sent)
                if k % 3 == 0
                else mail.gmail_bounce(sent)
                if k % 3 == 1
                else mail.exim_bounce(sent)
            )
            if k == 3:
                data = mail.postfix_dsn(sent, "5.2.2", "552", "Mailbox full")
            out.append(("bounce", "", sent.return_path, data))
        elif k == 6:  # 5%: complaints
            out.append(("complaint", "", sent.return_path, mail.arf_complaint(sent)))
        elif k < 10:  # 15%: replies, some without References
            out.append(("reply", email, OUT_SENDER, mail.reply(sent, f"Answer {i}", references=k != 9)))
        elif k < 12:  # 10%: out of office
            out.append(("auto_reply", email, OUT_SENDER, mail.out_of_office(sent, ("en", "de")[k % 2])))
        else:  # 40%: other mail to the mailbox
            out.append(("other", f"sender{i}@{SENDERS}", MAILBOX, message(i, 2048)))
    return out


def _listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until `mailflow inbound` (proc) answers on the port."""
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("mailflow inbound did not start") from None
            time.sleep(0.1)


def _deliver(port: int, mix: list[tuple[str, str, str, bytes]], sessions: int = 8) -> int:
    import aiosmtplib

    async def session(part: list[tuple[str, str, str, bytes]]) -> int:
        ok = 0
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await smtp.connect()
        for _, mail_from, to, data in part:
            await smtp.mail(mail_from)
            await smtp.rcpt(to)
            ok += (await smtp.data(data)).code == 250
        await smtp.quit()
        return ok

    async def main() -> int:
        return sum(await asyncio.gather(*(session(mix[k::sessions]) for k in range(sessions))))

    return asyncio.run(main())


EFFECTS = """
SELECT type, count(*) FROM events
WHERE type IN ('SuppressionAdded', 'CampaignStoppedForContact', 'SoftBounceCounted', 'DeliverabilityAlertRaised')
GROUP BY type
"""
CONSUMERS_AT = """
SELECT coalesce(min(position), 0) AS position, count(*) AS n FROM consumer_checkpoints
WHERE consumer IN ('inbound_classifier', 'outbound_feedback')
"""


def classify_mix(n: int, keep: bool, elapsed: dict[str, float]) -> dict[str, Any]:
    """Phase 3 (module docstring), in a database of its own: accept the mix, then time its
    classification, effects and notifications."""
    import redis as redis_lib

    with scratch("inbound-classify", keep, elapsed) as sc:
        settings = load_settings().model_copy(
            update={"database_url": sc.db_url, "redis_url": sc.redis_url, "redis_prefix": sc.prefix, "home": sc.workdir}
        )
        rt = Runtime(settings, pool_size=2)
        from mailflow.inbound import directory

        directory.add_domain(rt.store, DOMAIN)
        directory.add_mailbox(rt.store, MAILBOX, "bench")
        mix = _mix(rt, n)
        rt.close()
        env = _child_env(sc, MAILFLOW_INBOUND_AUTHENTICATION="false")
        port = free_port()
        with open(sc.workdir / "inbound.log", "wb") as log:
            inbound = subprocess.Popen(
                [sys.executable, "-m", "mailflow.cli", "inbound", "--port", str(port), "--processes", "1"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            _listening(port, inbound)
            acked = _deliver(port, mix)
            inbound.send_signal(signal.SIGTERM)
            inbound.wait(60)
        r = redis_lib.Redis.from_url(sc.redis_url)
        sub = r.pubsub()
        sub.subscribe(f"{sc.prefix}:notifications")
        parts = (["relay"], ["consume", "inbound_classifier"], ["consume", "outbound_feedback"])
        logs = [open(sc.workdir / f"{args[-1]}.log", "wb") for args in parts]  # noqa: SIM115 - closed below
        children = [
            subprocess.Popen([sys.executable, "-m", "mailflow.cli", *args], env=env, stdout=f, stderr=subprocess.STDOUT)
            for args, f in zip(parts, logs, strict=True)
        ]
        announced, done_at, classified = 0, None, 0
        with connect(sc.db_url) as conn:
            stored = int(conn.execute("SELECT count(*) FROM inbound_messages").fetchone()[0])  # type: ignore[index]
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                while (m := sub.get_message(timeout=0.01)) is not None:
                    announced += m["type"] == "message"
                classified = int(conn.execute("SELECT count(*) FROM inbound_classifications").fetchone()[0])  # type: ignore[index]
                head = int(conn.execute("SELECT coalesce(max(position), 0) FROM event_positions").fetchone()[0])  # type: ignore[index]
                at, both = conn.execute(CONSUMERS_AT).fetchone()  # type: ignore[misc]
                if classified >= stored and both == 2 and at >= head and announced >= classified:
                    done_at = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
                    break
            first = conn.execute("SELECT min(classified_at) FROM inbound_classifications").fetchone()[0]  # type: ignore[index]
            kinds = dict(conn.execute("SELECT kind, count(*) FROM inbound_classifications GROUP BY kind").fetchall())
            effects = dict(conn.execute(EFFECTS).fetchall())
        for c in children:
            c.send_signal(signal.SIGTERM)
        for c in children:
            c.wait(60)
        for f in logs:
            f.close()
        r.close()
    seconds = (done_at - first).total_seconds() if done_at is not None and first is not None else None
    expected = {"bounce": 0, "complaint": 0, "reply": 0, "auto_reply": 0, "other": 0}
    for kind, *_ in mix:
        expected[kind] += 1
    return {
        "classify_messages": n,
        "classify_acked": acked,
        "classified": classified,
        "classify_lost": max(0, acked - classified),
        "classified_per_s": round(classified / seconds) if seconds else None,
        "classified_kinds": kinds,
        "classify_sent_kinds": expected,
        "classify_effects": effects,
        "notifications_seen": announced,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="1,000 messages (a smoke run)")
    ap.add_argument("--messages", type=int, default=None, metavar="N")
    ap.add_argument("--keep", action="store_true", help="keep the benchmark database")
    ap.add_argument("--server-processes", type=int, default=None, metavar="N", help="mailflow inbound --processes")
    ap.add_argument("--classify-messages", type=int, default=None, metavar="N", help="the mix of phase 3 (0: skip)")
    ap.add_argument("--only-classify", action="store_true", help="phase 3 alone")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    p = Params.quick() if args.quick else Params()
    if args.messages:
        p.messages = args.messages
    if args.server_processes:
        p.server_processes = args.server_processes
    if args.classify_messages is not None:
        p.classify_messages = args.classify_messages
    if args.only_classify:
        elapsed: dict[str, float] = {}
        t0, load = time.perf_counter(), os.getloadavg()[0]
        mix = classify_mix(p.classify_messages, args.keep, elapsed)
        goals = {k: GOALS[k] for k in ("classified_per_s", "classify_lost")}
        res = finish(mix, goals, p, {"classified_clock": "see the module docstring"}, load, elapsed, t0)
    else:
        res = run(p, args.keep)
    if args.json:
        sys.stdout.write(orjson.dumps(res).decode() + "\n")
    else:
        for k, v in res.items():
            if not isinstance(v, dict | list):
                print(f"{k:<28} {v}")
        for name, goal in res.get("goals", {}).items():
            print(f"{name:<28} goal {goal['goal']}: {'ok' if goal['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
