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

    @classmethod
    def quick(cls) -> Params:
        return cls(messages=1000, sessions=4, client_processes=1)


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
            env = dict(
                os.environ,
                MAILFLOW_DATABASE_URL=sc.db_url,
                MAILFLOW_REDIS_URL=sc.redis_url,
                MAILFLOW_REDIS_PREFIX=sc.prefix,
                MAILFLOW_HOME=str(sc.workdir),
                MAILFLOW_LOG_LEVEL="info",
                MAILFLOW_LOG_FORMAT="json",
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
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or inbound.poll() is not None:
                        raise RuntimeError("mailflow inbound did not start") from None
                    time.sleep(0.1)
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
    notes = {
        "clock": "from the first connection to the last reply, for all sessions together",
        "accept_ms": "the client's DATA call: sending 4 KiB on loopback plus the wait for the reply",
        "machine": "client, server, PostgreSQL share the machine's CPUs",
    }
    return finish(out, GOALS, p, notes, load_start, elapsed, t_total)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="1,000 messages (a smoke run)")
    ap.add_argument("--messages", type=int, default=None, metavar="N")
    ap.add_argument("--keep", action="store_true", help="keep the benchmark database")
    ap.add_argument("--server-processes", type=int, default=None, metavar="N", help="mailflow inbound --processes")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    p = Params.quick() if args.quick else Params()
    if args.messages:
        p.messages = args.messages
    if args.server_processes:
        p.server_processes = args.server_processes
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
