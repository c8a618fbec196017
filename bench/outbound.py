"""Benchmark of the outbound pipeline: a campaign drained through queuer, worker(s) and relay.

Run `python bench/outbound.py` (a table) or `python bench/outbound.py --json` (one JSON object
on stdout; progress goes to stderr). Services come from MAILFLOW_DATABASE_URL /
MAILFLOW_REDIS_URL, or the embedded default under MAILFLOW_HOME when they are unset
(mailflow.infra.services.resolve). The run creates a fresh database `mailflow_bench_out_<pid>` on the
server the URL points to (migrated with mailflow.infra.migrate, dropped at the end unless --keep) and
uses a unique Redis key prefix whose keys are deleted at the end. `--quick` is a smoke run
(5,000 recipients, 50 transactional messages).

The pipeline runs as separate processes, as in production: `python -m mailflow.cli relay`,
`python -m mailflow.cli queuer` and `--workers K` times `python -m mailflow.cli worker`, so the
machine's cores are shared by separate interpreters (no GIL between them). They get the run's
database and Redis prefix, and the tuning settings, through MAILFLOW_* variables.

The SMTP peer is Debian's postfix `smtp-sink` (a fast C server, in the `postfix` package)
started with `-D` so that every accepted transaction is appended to a dump file before its 250
reply; the dump is read back to count each Message-ID (`<job-id@domain>`). Without smtp-sink
an aiosmtpd server runs in a separate process and counts Message-IDs itself. The JSON says
which (`sink`).

Phases, in the order they run:

setup (untimed)
    N contacts imported (ContactsImported events, 1,000 per batch) over 20 recipient domains,
    a segment of all contacts, a sender whose relay is the sink, a campaign template (a
    ~2.7 kB multipart/alternative message) and a transactional template; ANALYZE.
bare_aiosmtplib_messages_per_s
    The baseline: plain aiosmtplib to the same sink, before the pipeline starts. K processes
    (one per worker), each with MAILFLOW_WORKER_CONCURRENCY tasks sharing
    MAILFLOW_WORKER_CONNECTIONS_PER_RELAY reused connections (the worker's RelayPool shape),
    sending prebuilt bytes of the same size as the campaign's messages (the campaign template
    rendered by mailflow.outbound.mime for one recipient; only the Message-ID differs).
    Connections are opened before the clock starts. Rate = messages / (last end - start).
pipeline start and warm-up (untimed)
    relay, queuer and workers start; a few transactional messages go through so that every
    worker has its SMTP sessions open and its sender/template caches filled.
campaign_start_s
    campaigns.start(): the recipient snapshot, N JobCreated events and N jobs rows in one
    transaction, while the pipeline runs. Then (inside the drain's clock, skipped with
    --no-analyze) ANALYZE of jobs, events, event_positions and streams, as autovacuum does
    within a minute of such a load: without it the planner keeps the picture of almost empty
    tables from before the campaign.
campaign_messages_per_s
    From the moment campaigns.start() returns to the last campaign job's finished_at (the
    database clock, same host): N / that time. Every job transition is an event
    (JobQueued, JobStarted, JobCompleted), appended and projected by the real processes.
high_priority_p99_ms
    While the campaign drains, `--transactional` (default 200) sending.send_transactional()
    calls are made from the bench process, spread over the drain by the sink's progress
    (message i when the sink has accepted (i+1)/(T+1) of the campaign). Latency per message
    = jobs.accepted_at - jobs.created_at (both database timestamps); p50/p99/max, plus the
    created->queued, queued->started and started->accepted parts.
events_per_message
    Events appended after campaigns.start() returned, until every job was terminal, divided
    by the messages sent in that window (campaign + transactional); by type in
    `events_by_type`.
lost, duplicates
    lost = jobs (campaign, transactional and warm-up) not terminal at the end, plus completed
    jobs whose Message-ID the sink never accepted; duplicates = extra acceptances of a job's
    Message-ID at the sink. Both must be 0.

Also reported: CPU seconds per process group during the drain (from /proc: queuer, workers,
relay, sink, bench, postgres, redis-server), the relay's backlog when the last job finished,
warnings/errors in the processes' logs, and with `--profile DIR` py-spy profiles of the
queuer, workers and relay during the drain (raw collapsed stacks in DIR, the hottest frames
in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import multiprocessing.context
import multiprocessing.synchronize
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

import orjson

from _common import collect, finish, percentile, phase, rnd, say, scalar, scratch
from mailflow import log as mailflow_log
from mailflow.config import load_settings
from mailflow.events.keys import Keys
from mailflow.events.relay import stream_last_id
from mailflow.events.store import EventStore
from mailflow.infra.personal import People
from mailflow.infra.services import connect, open_pool, redis_client
from mailflow.infra.tenancy import Scope
from mailflow.infra.vault import Keyring
from mailflow.outbound import campaigns, mime, segments, sending, templates
from mailflow.outbound.contacts import ContactRow, import_contacts
from mailflow.outbound.senders import Sender

GOALS: dict[str, tuple[str, float]] = {
    "campaign_messages_per_s": (">=", 1000),
    "ratio_vs_bare_aiosmtplib": (">=", 0.7),
    "high_priority_p99_ms": ("<", 1000),
    "lost": ("==", 0),
    "duplicates": ("==", 0),
}
Ctx = multiprocessing.context.SpawnContext

SENDER = "bench"
FROM_EMAIL = "news@bench.example.org"
MID_DOMAIN = "bench.example.org"  # the Message-ID domain: the sender's domain
CAMPAIGN_TEMPLATE = templates.Template(
    "bench-news",
    "News for {{ name }} ({{ country }})",
    "<html><body><h1>Hello {{ name }}</h1>\n"
    + "<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.</p>\n" * 12
    + '<p><a href="https://bench.example.org/offer?u={{ email }}">See the offer</a></p></body></html>\n',
    "Hello {{ name }}\n\n"
    + "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n" * 12
    + "See the offer: https://bench.example.org/offer?u={{ email }}\n",
)
TX_TEMPLATE = templates.Template(
    "bench-reset",
    "Reset your password, {{ name }}",
    "<p>Hi {{ name }}, your code is {{ code }}.</p>",
    "Hi {{ name }}, your code is {{ code }}.\n",
)
SINK_SEPARATOR = b"==MAILFLOW-BENCH-SINK==\n"  # smtp-sink -S: written before every dumped message
_MID_RE = re.compile(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>)")
BARE_ID_WIDTH = 36  # a job id (uuid) is 36 characters; bare Message-IDs keep that length


# -- parameters ----------------------------------------------------------------------------


@dataclass
class Params:
    recipients: int = 100_000
    workers: int = 1
    transactional: int = 200
    warmup_messages: int = 0  # 0: 2 x connections per worker x workers
    domains: int = 20
    bare_messages: int = 0  # 0: min(recipients, 50,000)
    worker_concurrency: int = 20
    worker_connections_per_relay: int = 4
    queuer_batch_size: int = 500
    queuer_interval_s: float = 0.05
    queue_max_depth: int = 5000
    rate_limits: dict[str, float] = field(default_factory=lambda: {"*": 100_000.0})
    rate_limits_source: str = "bench default (the built-in 50/s per domain would cap the run)"
    sink: str = "auto"
    stall_timeout_s: float = 120.0
    timeout_s: float = 1800.0
    analyze: bool = True
    profile_dir: str | None = None
    pipeline: str = "subprocesses: python -m mailflow.cli relay | queuer | worker (x workers)"
    tenant_sizes: tuple[int, int] = (20_000, 500)  # --tenants: the big and the small campaign

    @classmethod
    def quick(cls) -> Params:
        return cls(recipients=5_000, transactional=50)

    def finish(self) -> None:
        if self.bare_messages <= 0:
            self.bare_messages = min(self.recipients, 50_000)
        if self.warmup_messages <= 0:
            self.warmup_messages = 2 * self.worker_connections_per_relay * self.workers


def params_from_env(p: Params) -> Params:
    """The run's tuning settings: MAILFLOW_* when set, else mailflow's defaults (rate limits: ours)."""
    s = load_settings()
    p.worker_concurrency = s.worker_concurrency
    p.worker_connections_per_relay = s.worker_connections_per_relay
    p.queuer_batch_size = s.queuer_batch_size
    p.queuer_interval_s = s.queuer_interval_s
    p.queue_max_depth = s.queue_max_depth
    if "MAILFLOW_RATE_LIMITS" in os.environ:
        p.rate_limits = dict(s.rate_limits)
        p.rate_limits_source = "MAILFLOW_RATE_LIMITS (merged over the built-in defaults)"
    return p


# -- small helpers -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the SMTP sink exited with code {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.05)


# -- CPU accounting from /proc -------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[str, float] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    return comm, (int(rest[11]) + int(rest[12])) / _TICK  # utime + stime


def cpu_snapshot(named: dict[int, str]) -> dict[int, tuple[str, float]]:
    """CPU seconds of the named pids, of every postgres and redis-server process, and of the bench."""
    out: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        st = _proc_stat(pid)
        if st is None:
            continue
        comm, cpu = st
        if pid in named:
            out[pid] = (named[pid], cpu)
        elif comm == "postgres":
            out[pid] = ("postgres", cpu)
        elif comm.startswith("redis-server"):
            out[pid] = ("redis", cpu)
    return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def cpu_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], machine_s: float, wall_s: float
) -> dict[str, float]:
    """CPU seconds per group; `other` is everything else the machine did (other users' load)."""
    groups: dict[str, float] = {}
    for pid, (group, cpu) in after.items():
        base = before.get(pid, (group, 0.0))[1]
        groups[group] = groups.get(group, 0.0) + max(cpu - base, 0.0)
    out = {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
    out["other"] = round(max(machine_s - sum(groups.values()), 0.0), 2)
    out["machine_busy"] = round(machine_s, 2)
    out["machine_capacity"] = round(wall_s * (os.cpu_count() or 1), 2)
    return out


# -- the SMTP sinks ------------------------------------------------------------------------


def parse_message_ids(blob: bytes, separator: bytes) -> tuple[Counter[str], dict[str, int]]:
    """Message-IDs of the messages in a dump (each starts with `separator`), and size per Message-ID."""
    ids: Counter[str] = Counter()
    sizes: dict[str, int] = {}
    for chunk in blob.split(separator):
        if not chunk:
            continue
        head_end = chunk.find(b"\n\n")
        m = _MID_RE.search(chunk, 0, head_end if head_end >= 0 else len(chunk))
        mid = m.group(1).decode() if m else "<missing>"
        ids[mid] += 1
        sizes[mid] = len(chunk)
    return ids, sizes


class PostfixSink:
    """postfix's smtp-sink, dumping every transaction (before its 250) to one file."""

    kind = "postfix smtp-sink (-D dump file, Message-IDs read back from the dump)"

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="mailflow-bench-sink-"))
        self.dir.chmod(0o777)  # smtp-sink drops root privileges to `nobody`
        self.dump = self.dir / "dump"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._tail = b""
        self._count = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        sep = SINK_SEPARATOR.decode().replace("\n", "\\n")
        cmd = [self.binary]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += ["-D", str(self.dump), "-S", sep, "-m", "1024", f"127.0.0.1:{self.port}", "1024"]
        log = open(self.dir / "sink.log", "wb")  # noqa: SIM115 - closed with the process
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        wait_port("127.0.0.1", self.port, 10, self.proc)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def accepted(self) -> int:
        """Messages dumped so far (read incrementally)."""
        with self._lock:
            try:
                with open(self.dump, "rb") as fh:
                    fh.seek(self._offset)
                    new = fh.read()
            except FileNotFoundError:
                return 0
            if new:
                self._offset += len(new)
                buf = self._tail + new
                self._count += buf.count(SINK_SEPARATOR)
                self._tail = buf[-(len(SINK_SEPARATOR) - 1) :]
            return self._count

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def message_ids(self) -> tuple[Counter[str], dict[str, int]]:
        try:
            blob = self.dump.read_bytes()
        except FileNotFoundError:
            return Counter(), {}
        return parse_message_ids(blob, SINK_SEPARATOR)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _aiosmtpd_main(port: int, count: Any, ready: Any, stop: Any, results: Any) -> None:
    try:
        from aiosmtpd.controller import Controller

        ids: Counter[str] = Counter()
        sizes: dict[str, int] = {}

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                data = envelope.original_content or envelope.content
                head_end = data.find(b"\r\n\r\n")
                m = _MID_RE.search(data, 0, head_end if head_end >= 0 else len(data))
                mid = m.group(1).decode() if m else "<missing>"
                ids[mid] += 1
                sizes[mid] = len(data)
                with count.get_lock():
                    count.value += 1
                return "250 2.0.0 Ok: queued"

        controller = Controller(Handler(), hostname="127.0.0.1", port=port)
        controller.start()
        ready.set()
        stop.wait()
        controller.stop()
        results.put((dict(ids), sizes))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put(("error", traceback.format_exc()))


class AiosmtpdSink:
    """aiosmtpd in its own process, counting Message-IDs as it accepts them."""

    kind = "aiosmtpd (separate process, counts Message-IDs in handle_DATA)"

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.port = free_port()
        self.count = ctx.Value("q", 0)
        self.ready = ctx.Event()
        self.stop_ev = ctx.Event()
        self.results = ctx.Queue()
        self.proc: Any = None
        self._final: tuple[Counter[str], dict[str, int]] | None = None

    def start(self) -> None:
        self.proc = self.ctx.Process(
            target=_aiosmtpd_main, args=(self.port, self.count, self.ready, self.stop_ev, self.results), daemon=True
        )
        self.proc.start()
        if not self.ready.wait(30):
            raise RuntimeError("the aiosmtpd sink did not start")
        wait_port("127.0.0.1", self.port, 10)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def accepted(self) -> int:
        return int(self.count.value)

    def stop(self) -> None:
        if self.proc is None or self._final is not None:
            return
        self.stop_ev.set()
        try:
            item = self.results.get(timeout=60)
        except Empty:
            item = ("error", "the aiosmtpd sink did not report its counts")
        if isinstance(item, tuple) and item and item[0] == "error":
            raise RuntimeError(f"aiosmtpd sink failed:\n{item[1]}")
        ids, sizes = item
        self._final = (Counter(ids), sizes)
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()

    def message_ids(self) -> tuple[Counter[str], dict[str, int]]:
        self.stop()
        assert self._final is not None
        return self._final

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()


# -- the bare aiosmtplib baseline ------------------------------------------------------------


def _bare_sender(
    wid: int,
    port: int,
    count: int,
    first: int,
    concurrency: int,
    connections: int,
    template: bytes,
    placeholder: bytes,
    mail_from: str,
    domains: int,
    go: multiprocessing.synchronize.Event,
    results: Any,
) -> None:
    try:
        import aiosmtplib

        async def main() -> dict[str, Any]:
            pool: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
            clients = []
            for _ in range(connections):
                c = aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=port, timeout=30, use_tls=False, start_tls=False, validate_certs=False
                )
                await c.connect()
                clients.append(c)
                pool.put_nowait(c)
            results.put(("ready", wid))
            await asyncio.to_thread(go.wait)
            t0 = time.monotonic()
            nxt = 0

            async def task() -> None:
                nonlocal nxt
                while nxt < count:
                    i = first + nxt
                    nxt += 1
                    data = template.replace(placeholder, f"bare{i:0{BARE_ID_WIDTH - 4}d}".encode())
                    c = await pool.get()
                    try:
                        await c.sendmail(mail_from, [f"user{i}@d{i % domains}.example.net"], data)
                    finally:
                        pool.put_nowait(c)

            await asyncio.gather(*(task() for _ in range(concurrency)))
            t1 = time.monotonic()
            for c in clients:
                with contextlib.suppress(Exception):
                    await c.quit()
            return {"wid": wid, "sent": count, "start": t0, "end": t1}

        results.put(asyncio.run(main()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put(("error", traceback.format_exc()))


def bench_bare(ctx: Ctx, sink: Any, p: Params, secret: bytes) -> dict[str, Any]:
    placeholder = b"B" * BARE_ID_WIDTH
    sender = Sender(SENDER, FROM_EMAIL, "Bench", f"smtp://127.0.0.1:{sink.port}?tls=none")
    email = f"user12345@d{12345 % p.domains}.example.net"
    rendered = templates.render(CAMPAIGN_TEMPLATE, {"name": "User 12345", "country": "NL", "email": email})
    out = mime.build(
        job_id=placeholder.decode(),
        sender=sender,
        to=email,
        rendered=rendered,
        secret=secret,
        campaign_id=str(uuid.uuid4()),
    )
    # The job id appears in the Message-ID and the MIME boundary; each message gets its own.
    assert f"<{placeholder.decode()}@".encode() in out.data, "the placeholder must name the Message-ID"
    results = ctx.Queue()
    go = ctx.Event()
    per = [p.bare_messages // p.workers + (1 if w < p.bare_messages % p.workers else 0) for w in range(p.workers)]
    firsts = [sum(per[:w]) for w in range(p.workers)]
    procs = [
        ctx.Process(
            target=_bare_sender,
            args=(
                w,
                sink.port,
                per[w],
                firsts[w],
                p.worker_concurrency,
                p.worker_connections_per_relay,
                out.data,
                placeholder,
                out.mail_from,
                p.domains,
                go,
                results,
            ),
            daemon=True,
        )
        for w in range(p.workers)
    ]
    before = sink.accepted()
    try:
        for proc in procs:
            proc.start()
        collect(results, len(procs), procs, 60, "bare senders (start)")
        go.set()
        done = collect(results, len(procs), procs, 1800, "bare senders")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    start = min(d["start"] for d in done)
    end = max(d["end"] for d in done)
    sent = sum(d["sent"] for d in done)
    deadline = time.monotonic() + 10
    while sink.accepted() - before < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    return {
        "bare_aiosmtplib_messages_per_s": round(sent / (end - start)),
        "bare_messages": sent,
        "bare_seconds": round(end - start, 2),
        "bare_message_bytes": len(out.data),
    }


# -- the pipeline processes ----------------------------------------------------------------


MAILFLOW_CMD = [sys.executable, "-m", "mailflow.cli"]


class Pipeline:
    """relay, queuer and K workers as `mailflow relay|queuer|worker` subprocesses."""

    def __init__(self, env: dict[str, str], workdir: Path, workers: int) -> None:
        self.env = env
        self.workdir = workdir
        self.specs = [("relay", ["relay"]), ("queuer", ["queuer"])] + [
            (f"worker-{i}", ["worker", "--name", f"bench-worker-{i}"]) for i in range(workers)
        ]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self) -> None:
        for name, args in self.specs:
            log = open(self.log_path(name), "wb")  # noqa: SIM115 - closed with the process
            try:
                self.procs[name] = subprocess.Popen(
                    [*MAILFLOW_CMD, *args],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                log.close()

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.log_path(name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode}; its log:\n{tail}")

    def pids(self) -> dict[int, str]:
        return {proc.pid: ("worker" if name.startswith("worker") else name) for name, proc in self.procs.items()}

    def stop(self) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + 20
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
                codes[name] = None  # had to be killed
        return codes

    def log_problems(self) -> dict[str, Any]:
        counts: Counter[str] = Counter()
        samples: list[str] = []
        for name in self.procs:
            try:
                lines = self.log_path(name).read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                level = None
                try:
                    level = json.loads(line).get("level")
                except ValueError:
                    if "Traceback" in line or "Error" in line:
                        level = "error"
                if level in ("warning", "error", "critical"):
                    counts[f"{name}:{level}"] += 1
                    if len(samples) < 5:
                        samples.append(f"{name}: {line[:300]}")
        return {"counts": dict(counts), "samples": samples}


def wait_ready(pipeline: Pipeline, r: Any, keys: Keys, timeout: float = 120) -> None:
    """The relay and the queuer have set their epoch keys (the workers prove themselves in the warm-up)."""
    deadline = time.monotonic() + timeout
    while True:
        pipeline.check_alive()
        waiting = []
        if r.get(keys.relay_epoch) is None:
            waiting.append("relay (no relay epoch key)")
        if r.get(keys.jobs_epoch) is None:
            waiting.append("queuer (no jobs epoch key)")
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready within {timeout:.0f} s: {', '.join(waiting)}")
        time.sleep(0.1)


def warm_up(db_url: str, store: EventStore, pipeline: Pipeline, r: Any, keys: Keys, p: Params) -> int:
    """Transactional messages until every worker has taken some (SMTP sessions open, caches filled)."""
    sent = 0
    for _round in range(10):
        for _ in range(p.warmup_messages):
            send_tx(store, f"bench-warm-{sent}", f"warm{sent}@vip.example.net")
            sent += 1
        wait_jobs_terminal(db_url, 120, "warm-up", pipeline)
        # Consumers show up in the group once they were delivered something.
        names = {c["name"] for c in r.xinfo_consumers(keys.jobs("high"), "workers")}
        if len(names) >= p.workers:
            return sent
    raise RuntimeError(f"after {sent} warm-up messages only {len(names)} of {p.workers} workers took any")


# -- py-spy --------------------------------------------------------------------------------


PROFILE_RATE = 200  # py-spy samples per second


class Profiler:
    def __init__(self, directory: Path, pids: dict[int, str]) -> None:
        self.directory = directory
        self.pids = pids
        self.procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def start(self) -> None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.directory.mkdir(parents=True, exist_ok=True)
        seen: Counter[str] = Counter()
        for pid, group in self.pids.items():
            seen[group] += 1
            name = group if seen[group] == 1 else f"{group}-{seen[group]}"
            out = self.directory / f"{name}.txt"
            proc = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(PROFILE_RATE),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--threads",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(self.directory / f"{name}.py-spy.log", "wb"),  # noqa: SIM115
            )
            self.procs.append((name, out, proc))

    def stop(self) -> dict[str, Any]:
        for _, _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        summary: dict[str, Any] = {}
        for name, out, proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            summary[name] = summarize_profile(out)
        return summary


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Self time (leaf frames) and inclusive time of mailflow frames, as shares of all samples."""
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"error": f"no profile written to {path}"}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        parts = stack.split(";")
        if parts and parts[0].startswith("thread "):
            # "thread (tid): name" -> name, with asyncio's to_thread pool threads as one
            threads[re.sub(r"_\d+$", "_*", parts[0].split(": ", 1)[-1])] += count
        frames = [f for f in parts if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf[_short(frames[-1])] += count
        for f in {
            _short(f)
            for f in frames
            if "mailflow" in f or "psycopg" in f or "aiosmtplib" in f or "email/" in f or "jinja2" in f
        }:
            incl[f] += count
    if not total:
        return {"samples": 0}
    entry = max(incl.values(), default=0)  # the entry-point chain (main, cli, run loop): not informative
    incl = Counter({k: v for k, v in incl.items() if v < entry})
    return {
        "samples": total,
        "seconds_by_thread": {k: round(v / PROFILE_RATE, 1) for k, v in threads.most_common()},
        "self_top": {k: round(v / total, 3) for k, v in leaf.most_common(top)},
        "inclusive_top": {k: round(v / total, 3) for k, v in incl.most_common(top)},
    }


def _short(frame: str) -> str:
    """ "func (/long/path/pkg/file.py:123)" -> "func (pkg/file.py)"."""
    m = re.match(r"^(.*) \(([^()]*?):\d+\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({'/'.join(m.group(2).split('/')[-2:])})"


# -- the campaign --------------------------------------------------------------------------


def setup_catalog(store: EventStore, sink_port: int, p: Params) -> str:
    sending.save_sender(
        store, Sender(SENDER, FROM_EMAIL, "Bench News", f"smtp://127.0.0.1:{sink_port}?tls=none&timeout=30")
    )
    templates.save(store, CAMPAIGN_TEMPLATE)
    templates.save(store, TX_TEMPLATE)
    rows = (
        ContactRow(email=f"user{i}@d{i % p.domains}.example.net", attributes={"name": f"User {i}", "country": "NL"})
        for i in range(p.recipients)
    )
    report = import_contacts(store, rows, "bench", batch_size=1000)
    if report.imported != p.recipients:
        raise RuntimeError(f"imported {report.imported} contacts, expected {p.recipients}")
    segments.define(store, "bench-all", {})
    return campaigns.create(store, name="bench", sender=SENDER, template=CAMPAIGN_TEMPLATE.name, segment="bench-all")


def send_tx(store: EventStore, key: str, to: str) -> str:
    job_id, _ = sending.send_transactional(
        store,
        sender=SENDER,
        template=TX_TEMPLATE.name,
        to=to,
        variables={"name": "VIP", "code": "123456"},
        idempotency_key=key,
    )
    return job_id


NOT_TERMINAL = "SELECT count(*) FROM jobs WHERE state NOT IN ('completed', 'failed')"


def wait_jobs_terminal(db_url: str, timeout: float, what: str, pipeline: Pipeline) -> None:
    deadline = time.monotonic() + timeout
    with connect(db_url) as conn:
        while scalar(conn, NOT_TERMINAL) > 0:
            pipeline.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: jobs still unfinished after {timeout:.0f} s")
            time.sleep(0.1)


class Transactional(threading.Thread):
    """Sends T high-priority messages spread over the drain, paced by the sink's progress."""

    def __init__(self, store: EventStore, sink: Any, base: int, p: Params, done: threading.Event) -> None:
        super().__init__(name="bench-transactional", daemon=True)
        self.store, self.sink, self.base, self.p, self.done = store, sink, base, p, done
        self.job_ids: list[str] = []
        self.sent_at_progress: list[int] = []
        self.after_drain = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            n, t = self.p.recipients, self.p.transactional
            for i in range(t):
                threshold = (i + 1) * n // (t + 1)
                while True:
                    progress = self.sink.accepted() - self.base
                    if progress >= threshold:
                        break
                    if self.done.is_set():
                        self.after_drain += 1
                        break
                    time.sleep(0.01)
                self.sent_at_progress.append(progress)
                self.job_ids.append(send_tx(self.store, f"bench-tx-{i}", f"vip{i}@vip.example.net"))
        except BaseException:  # noqa: BLE001 - reported by the main thread
            self.error = traceback.format_exc()


def drain(db_url: str, store: EventStore, sink: Any, pipeline: Pipeline, p: Params, base: int) -> dict[str, Any]:
    """Wait until every job is terminal while the transactional thread runs; returns raw facts."""
    done = threading.Event()
    tx = Transactional(store, sink, base, p, done)
    tx.start()
    expected = p.recipients + p.transactional
    deadline = time.monotonic() + p.timeout_s
    last_progress, last_change = -1, time.monotonic()
    last_report, last_db = time.monotonic(), 0.0
    reported_at, reported_n = time.monotonic(), 0
    timed_out = None
    with connect(db_url) as conn:
        while True:
            now = time.monotonic()
            accepted = sink.accepted() - base
            if accepted != last_progress:
                last_progress, last_change = accepted, now
            finished_sending = tx.error is not None or len(tx.job_ids) >= p.transactional
            if (accepted >= expected and finished_sending) or now - last_db > 5:
                last_db = now
                if finished_sending and scalar(conn, NOT_TERMINAL) == 0:
                    break
            if now - last_report >= 5:
                rate = (accepted - reported_n) / (now - reported_at)
                say(
                    f"  sink accepted {accepted:,} of {expected:,} ({rate:,.0f}/s), transactional sent {len(tx.job_ids)}"
                )
                last_report, reported_at, reported_n = now, now, accepted
            pipeline.check_alive()
            if now > deadline:
                timed_out = f"gave up after --timeout {p.timeout_s:.0f} s"
                break
            if now - last_change > p.stall_timeout_s:
                timed_out = f"no message accepted for {p.stall_timeout_s:.0f} s"
                break
            time.sleep(0.05)
    done.set()
    tx.join(timeout=60)
    if tx.error:
        raise RuntimeError(f"a transactional send failed:\n{tx.error}")
    return {"tx": tx, "timed_out": timed_out}


def measure(db_url: str, campaign_id: str, tx_ids: list[str]) -> dict[str, Any]:
    with connect(db_url) as conn:
        end = scalar(
            conn, "SELECT extract(epoch FROM max(finished_at)) FROM jobs WHERE campaign_id = %s", (campaign_id,)
        )
        states = dict(
            conn.execute(
                "SELECT state, count(*) FROM jobs WHERE campaign_id = %s GROUP BY state", (campaign_id,)
            ).fetchall()
        )
        lat = conn.execute(
            """SELECT extract(epoch FROM accepted_at - created_at) * 1000,
                      extract(epoch FROM queued_at - created_at) * 1000,
                      extract(epoch FROM started_at - queued_at) * 1000,
                      extract(epoch FROM accepted_at - started_at) * 1000,
                      state, attempts
               FROM jobs WHERE id = ANY(%s::uuid[])""",
            (tx_ids,),
        ).fetchall()
        camp_lat = conn.execute(
            """SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - queued_at)),
                      max(attempts)
               FROM jobs WHERE campaign_id = %s""",
            (campaign_id,),
        ).fetchone()
    return {
        "end_wall": float(end) if end is not None else None,
        "states": states,
        "tx_rows": lat,
        "campaign_queue_wait_s": camp_lat[0],
        "campaign_max_attempts": camp_lat[1],
    }


def avg(values: list[int]) -> int | None:
    return round(sum(values) / len(values)) if values else None


def ms_stats(values: list[float]) -> dict[str, float | None]:
    v = sorted(values)
    return {"p50": rnd(percentile(v, 50)), "p99": rnd(percentile(v, 99)), "max": rnd(v[-1] if v else None)}


def run_people(workdir: Path) -> People:
    """Names people with the keyring the run's processes use (MAILFLOW_HOME/secret.key)."""
    return People(Keyring.load(workdir / "home"))


def pipeline_env(db_url: str, redis_url: str, prefix: str, workdir: Path, p: Params) -> dict[str, str]:
    """The environment of the relay, queuer and worker processes: this run's servers and tuning."""
    env = dict(os.environ)
    env.update(
        MAILFLOW_DATABASE_URL=db_url,
        MAILFLOW_REDIS_URL=redis_url,
        MAILFLOW_REDIS_PREFIX=prefix,
        MAILFLOW_HOME=str(workdir / "home"),
        MAILFLOW_LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", "warning"),
        MAILFLOW_LOG_FORMAT="json",
        MAILFLOW_WORKER_CONCURRENCY=str(p.worker_concurrency),
        MAILFLOW_WORKER_CONNECTIONS_PER_RELAY=str(p.worker_connections_per_relay),
        MAILFLOW_QUEUER_BATCH_SIZE=str(p.queuer_batch_size),
        MAILFLOW_QUEUER_INTERVAL_S=str(p.queuer_interval_s),
        MAILFLOW_QUEUE_MAX_DEPTH=str(p.queue_max_depth),
        MAILFLOW_RATE_LIMITS=json.dumps(p.rate_limits),
    )
    return env


def run_campaign(
    ctx: Ctx,
    db_url: str,
    redis_url: str,
    prefix: str,
    p: Params,
    workdir: Path,
    elapsed: dict[str, float],
    out: dict[str, Any],
) -> None:
    keys = Keys(prefix)
    secret = b"mailflow-bench-secret-key-0123456789"
    sink: Any
    smtp_sink = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None)
    if p.sink == "smtp-sink" and not smtp_sink:
        raise RuntimeError("--sink smtp-sink: no smtp-sink binary (apt-get install postfix)")
    if p.sink != "aiosmtpd" and smtp_sink:
        sink = PostfixSink(smtp_sink)
    else:
        sink = AiosmtpdSink(ctx)
    out["sink"] = sink.kind
    # The catalogue and campaigns as a tenant writes them (row-level security on); the queuer
    # and workers below run as the operator, as `mailflow up` runs them.
    pool = open_pool(db_url, scope=Scope.of("default"), min_size=1, max_size=4)
    people = run_people(workdir)
    store = EventStore(pool, tenant="default", people=people)
    # campaigns.start() on its own connection, whose statistics can be flushed right after it.
    start_pool = open_pool(db_url, scope=Scope.of("default"), min_size=1, max_size=1)
    start_store = EventStore(start_pool, tenant="default", people=people)
    r = redis_client(redis_url)
    pipeline: Pipeline | None = None
    profiler: Profiler | None = None
    try:
        sink.start()
        with phase(elapsed, "setup"):
            campaign_id = setup_catalog(store, sink.port, p)
            if p.analyze:
                with connect(db_url) as conn:
                    conn.execute("ANALYZE")
        with phase(elapsed, "bare_aiosmtplib"):
            out.update(bench_bare(ctx, sink, p, secret))
        env = pipeline_env(db_url, redis_url, prefix, workdir, p)
        env["MAILFLOW_SECRET_KEY"] = secret.decode()
        pipeline = Pipeline(env, workdir, p.workers)
        with phase(elapsed, "pipeline_start"):
            pipeline.start()
            wait_ready(pipeline, r, keys)
            out["warmup_messages"] = warm_up(db_url, store, pipeline, r, keys, p)
        named = {**pipeline.pids(), os.getpid(): "bench"}
        if sink.pid:
            named[sink.pid] = "sink"
        if p.profile_dir:
            profiler = Profiler(Path(p.profile_dir), pipeline.pids())
        base = sink.accepted()
        with phase(elapsed, "campaign_start"):
            t_start = time.perf_counter()
            created = campaigns.start(start_store, campaign_id)
            campaign_start_s = time.perf_counter() - t_start
            t0_wall = time.time()
            cpu_before = cpu_snapshot(named)
            busy_before, wall_before = machine_busy_s(), time.monotonic()
            with start_pool.connection() as conn:  # count the snapshot's work before the clock
                if conn.info.server_version >= 150000:
                    conn.execute("SELECT pg_stat_force_next_flush()")
            pg_before = pg_counters(db_url)
            if profiler:
                profiler.start()
        if created != p.recipients:
            raise RuntimeError(f"campaigns.start created {created} jobs, expected {p.recipients}")
        if p.analyze:
            # What autovacuum does within its naptime (a minute) after N new jobs and events:
            # without it the planner keeps the pre-campaign picture of tiny tables (seq scans of
            # events in the relay, the jobs_queued index in every claim). Inside the clock.
            t_an = time.perf_counter()
            with connect(db_url) as conn:
                conn.execute("ANALYZE jobs, events, event_positions, streams")
            out["analyze_after_start_s"] = round(time.perf_counter() - t_an, 2)
        with connect(db_url) as conn:
            # CampaignStarted is the snapshot transaction's last event: later seqs are the drain's.
            seq_t0 = scalar(
                conn,
                "SELECT seq FROM events WHERE stream = %s AND type = 'CampaignStarted'",
                (f"default/campaign-{campaign_id}",),
            )
        with phase(elapsed, "campaign_drain"):
            facts = drain(db_url, store, sink, pipeline, p, base)
            t_drained = time.monotonic()
            published_at_drain = stream_last_id(r, keys.events) or 0
        cpu_after = cpu_snapshot(named)
        busy_after, wall_after = machine_busy_s(), time.monotonic()
        if profiler:
            out["profile"] = profiler.stop()
            out["profile_dir"] = str(p.profile_dir)
        tx: Transactional = facts["tx"]
        with connect(db_url) as conn:
            ev_rows = conn.execute(
                "SELECT type, count(*) FROM events WHERE seq > %s GROUP BY type ORDER BY 2 DESC", (seq_t0,)
            ).fetchall()
            events_total = scalar(conn, "SELECT count(*) FROM events")
        # The relay: how far behind was it when the drain ended, and how long to catch up?
        # (Positions are dense from 1, so the stream is complete when its last ID is the count.)
        relay_behind = max(events_total - published_at_drain, 0)
        deadline = time.monotonic() + 120
        while (stream_last_id(r, keys.events) or 0) < events_total and time.monotonic() < deadline:
            time.sleep(0.05)
        relay_caught_up = (stream_last_id(r, keys.events) or 0) >= events_total
        relay_catchup_s = time.monotonic() - t_drained if relay_behind else 0.0
        m = measure(db_url, campaign_id, tx.job_ids)
        # Campaign completion is housekeeping (the queuer, once a second).
        with connect(db_url) as conn:
            deadline = time.monotonic() + 5
            while (status := scalar(conn, "SELECT status FROM campaigns WHERE id = %s", (campaign_id,))) != "completed":
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            completed_ids = [str(j) for (j,) in conn.execute("SELECT id FROM jobs WHERE state = 'completed'")]
            non_terminal = scalar(conn, NOT_TERMINAL)
            failed = dict(
                conn.execute(
                    "SELECT coalesce(failure_kind, '?'), count(*) FROM jobs WHERE state = 'failed' GROUP BY 1"
                ).fetchall()
            )
            all_jobs = scalar(conn, "SELECT count(*) FROM jobs")
        codes = pipeline.stop()
        pg_after = pg_counters(db_url)  # the processes' backends have exited: their stats are flushed
        problems = pipeline.log_problems()
        pipeline = None
        sink.stop()
        ids, sizes = sink.message_ids()

        # -- results ------------------------------------------------------------------------
        job_acceptances = {
            mid: n for mid, n in ids.items() if mid.endswith(f"@{MID_DOMAIN}>") and not mid.startswith("<bare")
        }
        bare_acceptances = sum(n for mid, n in ids.items() if mid.startswith("<bare"))
        with connect(db_url) as conn:
            campaign_mids = {
                f"<{j}@{MID_DOMAIN}>"
                for (j,) in conn.execute("SELECT id FROM jobs WHERE campaign_id = %s", (campaign_id,))
            }
        never_accepted = sum(1 for j in completed_ids if f"<{j}@{MID_DOMAIN}>" not in job_acceptances)
        duplicates = sum(n - 1 for n in job_acceptances.values() if n > 1)
        unknown = sum(n for mid, n in ids.items() if not mid.endswith(f"@{MID_DOMAIN}>"))
        drain_s = (m["end_wall"] - t0_wall) if m["end_wall"] else None
        messages = p.recipients + len(tx.job_ids)
        events_during = sum(n for _, n in ev_rows)
        tx_rows = m["tx_rows"]
        rate = round(p.recipients / drain_s) if drain_s and not facts["timed_out"] else None
        out.update(
            {
                "campaign_messages_per_s": rate,
                "ratio_vs_bare_aiosmtplib": round(rate / out["bare_aiosmtplib_messages_per_s"], 3) if rate else None,
                "campaign_recipients": p.recipients,
                "campaign_drain_s": rnd(drain_s, 2),
                "campaign_start_s": round(campaign_start_s, 2),
                "campaign_start_jobs_per_s": round(p.recipients / campaign_start_s),
                "campaign_jobs": {k: int(v) for k, v in m["states"].items()},
                "campaign_status_after": status,
                "campaign_queued_to_started_s": {
                    "p50": rnd(m["campaign_queue_wait_s"][0], 2) if m["campaign_queue_wait_s"] else None,
                    "p99": rnd(m["campaign_queue_wait_s"][1], 2) if m["campaign_queue_wait_s"] else None,
                },
                "high_priority_p99_ms": ms_stats([float(x[0]) for x in tx_rows if x[0] is not None])["p99"],
                "high_priority_latency_ms": {
                    "created_to_accepted": ms_stats([float(x[0]) for x in tx_rows if x[0] is not None]),
                    "created_to_queued": ms_stats([float(x[1]) for x in tx_rows if x[1] is not None]),
                    "queued_to_started": ms_stats([float(x[2]) for x in tx_rows if x[2] is not None]),
                    "started_to_accepted": ms_stats([float(x[3]) for x in tx_rows if x[3] is not None]),
                    "messages": len(tx_rows),
                    "not_completed": sum(1 for x in tx_rows if x[4] != "completed"),
                    "sent_after_the_drain": tx.after_drain,
                    "sent_at_campaign_progress": [tx.sent_at_progress[0], tx.sent_at_progress[-1]]
                    if tx.sent_at_progress
                    else None,
                },
                "events_per_message": round(events_during / messages, 3) if messages else None,
                "events_during_drain": events_during,
                "events_by_type": {t: int(n) for t, n in ev_rows},
                "lost": int(non_terminal) + never_accepted,
                "lost_detail": {"not_terminal": int(non_terminal), "completed_never_accepted": never_accepted},
                "duplicates": duplicates,
                "failed_jobs": {k: int(v) for k, v in failed.items()},
                "jobs_total": int(all_jobs),
                "sink_accepted": {"jobs": sum(job_acceptances.values()), "bare": bare_acceptances, "unknown": unknown},
                # Bytes per message as the sink stored it (smtp-sink adds ~250 bytes of its own headers
                # and drops CRs): a check that the baseline sent messages of the campaign's size.
                "sink_avg_message_bytes": {
                    "campaign": avg([n for mid, n in sizes.items() if mid in campaign_mids]),
                    "bare": avg([n for mid, n in sizes.items() if mid.startswith("<bare")]),
                },
                "relay": {
                    "behind_when_drained_events": int(relay_behind),
                    "caught_up": relay_caught_up,
                    "catch_up_s": round(relay_catchup_s, 2),
                },
                "postgres_per_message": pg_delta(pg_before, pg_after, messages),
                "cpu_seconds_during_drain": cpu_delta(
                    cpu_before, cpu_after, busy_after - busy_before, wall_after - wall_before
                ),
                "process_exit_codes": codes,
                "process_log_problems": problems,
            }
        )
        if facts["timed_out"]:
            out["timed_out"] = facts["timed_out"]
    finally:
        if profiler is not None and "profile" not in out:
            with contextlib.suppress(Exception):
                profiler.stop()
        if pipeline is not None:
            pipeline.stop()
        with contextlib.suppress(Exception):
            sink.stop()
        sink.cleanup()
        r.close()
        store.close()
        pool.close()
        start_store.close()
        start_pool.close()


# -- orchestration -------------------------------------------------------------------------


def pg_counters(db_url: str) -> dict[str, Any]:
    """This database's cumulative statistics, and buffer accesses per table and per index.

    Backends flush their statistics at transaction end at most once a second (and on exit),
    so deltas over a window are approximate by up to a second of work at either end.
    """
    with connect(db_url) as conn:
        row = conn.execute(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, blks_hit + blks_read "
            "FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        names = ("commits", "rollbacks", "rows_inserted", "rows_updated", "rows_deleted", "blocks_accessed")
        out: dict[str, Any] = {n: int(v) for n, v in zip(names, row)}
        out["tables"] = {
            name: (int(heap or 0), int(idx or 0))
            for name, heap, idx in conn.execute(
                "SELECT relname, heap_blks_hit + heap_blks_read, idx_blks_hit + idx_blks_read FROM pg_statio_user_tables"
            )
        }
        out["indexes"] = {
            name: (int(scans or 0), int(read or 0), int(blks or 0))
            for name, scans, read, blks in conn.execute(
                "SELECT i.indexrelname, i.idx_scan, i.idx_tup_read, io.idx_blks_hit + io.idx_blks_read "
                "FROM pg_stat_user_indexes i JOIN pg_statio_user_indexes io USING (indexrelid)"
            )
        }
    return out


def pg_delta(before: dict[str, Any], after: dict[str, Any], messages: int, top: int = 8) -> dict[str, Any]:
    per = {k: round((after[k] - before[k]) / messages, 2) for k in after if k not in ("tables", "indexes")}
    tables = {
        name: round(sum(a) - sum(before["tables"].get(name, (0, 0))), 0) / messages
        for name, a in after["tables"].items()
    }
    per["blocks_by_table"] = {k: round(v, 1) for k, v in sorted(tables.items(), key=lambda kv: -kv[1])[:top]}
    idx = {}
    for name, (scans, read, blks) in after["indexes"].items():
        b = before["indexes"].get(name, (0, 0, 0))
        idx[name] = {
            "scans": round((scans - b[0]) / messages, 2),
            "tuples_read": round((read - b[1]) / messages, 1),
            "blocks": round((blks - b[2]) / messages, 1),
        }
    per["indexes"] = dict(sorted(idx.items(), key=lambda kv: -kv[1]["tuples_read"])[:top])
    return per


def source_state() -> dict[str, Any]:
    """The commit the run measured, and whether src/ had uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "migrations"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    return {"commit": commit or None, "uncommitted": sorted(line[3:] for line in dirty if line.strip())}


def run(p: Params, keep: bool) -> dict[str, Any]:
    t_total = time.perf_counter()
    load_start = os.getloadavg()[0]
    mailflow_log.configure(level="warning", stream=sys.stderr)
    elapsed: dict[str, float] = {}
    ctx = mp.get_context("spawn")
    with scratch("bench-out", keep, elapsed) as sc:
        out: dict[str, Any] = {**sc.info, "source": source_state()}
        run_campaign(ctx, sc.db_url, sc.redis_url, sc.prefix, p, sc.workdir, elapsed, out)
    notes = {
        "campaign": "N recipients over 20 domains; relay, queuer and workers are separate processes; the clock runs "
        "from campaigns.start() returning to the last campaign job's finished_at; every job transition is an event",
        "baseline": "plain aiosmtplib, one process per worker, worker_concurrency tasks sharing "
        "worker_connections_per_relay reused connections, prebuilt bytes of the campaign message's size, same sink",
        "rate_limits": f"{p.rate_limits} ({p.rate_limits_source})",
        "machine": "clients, servers and the sink share the machine's CPUs; cpu_seconds_during_drain shows who used them",
    }
    return finish(out, GOALS, p, notes, load_start, elapsed, t_total)


# -- fairness between tenants ---------------------------------------------------------------

TENANT_GOALS: dict[str, tuple[str, float]] = {"small_shared_vs_alone": ("<=", 2.0), "lost": ("==", 0)}


def _tenant_catalog(ops: EventStore, tenant: str, sink_port: int, recipients: int) -> None:
    store = ops.for_tenant(tenant)
    sending.save_sender(store, Sender(SENDER, FROM_EMAIL, tenant, f"smtp://127.0.0.1:{sink_port}?tls=none&timeout=30"))
    templates.save(store, CAMPAIGN_TEMPLATE)
    rows = (
        ContactRow(email=f"{tenant}{i}@d{i % 20}.example.net", attributes={"name": f"User {i}", "country": "NL"})
        for i in range(recipients)
    )
    import_contacts(store, rows, "bench", batch_size=1000)
    segments.define(store, "all", {})


def _campaign_done_s(db_url: str, campaign_id: str, t0: float, timeout: float) -> float:
    """Seconds from t0 (wall clock) to the campaign's last job finishing."""
    deadline = time.monotonic() + timeout
    with connect(db_url) as conn:
        while True:
            left, last = conn.execute(
                "SELECT count(*) FILTER (WHERE state NOT IN ('completed', 'failed')), max(finished_at) "
                "FROM jobs WHERE campaign_id = %s",
                (campaign_id,),
            ).fetchone()
            if left == 0:
                return round(last.timestamp() - t0, 3)
            if time.monotonic() > deadline:
                raise RuntimeError(f"campaign {campaign_id} unfinished after {timeout:.0f} s ({left} jobs left)")
            time.sleep(0.02)


def run_tenants(ctx: Ctx, p: Params, keep: bool) -> dict[str, Any]:
    """Two tenants through the same queuer and workers: tenant small's campaign of S recipients
    started right after tenant big's of B recipients, then small's again, alone."""
    from mailflow.tenants import registry

    t_total = time.perf_counter()
    load_start = os.getloadavg()[0]
    mailflow_log.configure(level="warning", stream=sys.stderr)
    elapsed: dict[str, float] = {}
    big_n, small_n = p.tenant_sizes
    with scratch("bench-tenants", keep, elapsed) as sc:
        out: dict[str, Any] = {
            **sc.info,
            "source": source_state(),
            "big_recipients": big_n,
            "small_recipients": small_n,
        }
        smtp_sink = shutil.which("smtp-sink") or (
            "/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None
        )
        sink: Any = PostfixSink(smtp_sink) if smtp_sink and p.sink != "aiosmtpd" else AiosmtpdSink(ctx)
        out["sink"] = sink.kind
        pool = open_pool(sc.db_url, scope=Scope.operator(), min_size=1, max_size=4)
        ops = EventStore(pool, people=run_people(sc.workdir))
        keys = Keys(sc.prefix)
        r = redis_client(sc.redis_url)
        pipeline: Pipeline | None = None
        try:
            sink.start()
            with phase(elapsed, "setup"):
                for tenant, n in (("big", big_n), ("small", small_n), ("warm", 200)):
                    registry.create(ops, tenant)
                    _tenant_catalog(ops, tenant, sink.port, n)
                with connect(sc.db_url) as conn:
                    conn.execute("ANALYZE")
            env = pipeline_env(sc.db_url, sc.redis_url, sc.prefix, sc.workdir, p)
            pipeline = Pipeline(env, sc.workdir, p.workers)
            with phase(elapsed, "pipeline_start"):
                pipeline.start()
                wait_ready(pipeline, r, keys)
            small = ops.for_tenant("small")
            big = ops.for_tenant("big")
            with phase(elapsed, "warm_up"):  # a third tenant's campaign: SMTP sessions open, caches warm
                warm = ops.for_tenant("warm")
                wid = campaigns.create(warm, name="warm", sender=SENDER, template=CAMPAIGN_TEMPLATE.name, segment="all")
                t0 = time.time()
                campaigns.start(warm, wid)
                _campaign_done_s(sc.db_url, wid, t0, p.timeout_s)
            with phase(elapsed, "both"):
                shared = campaigns.create(
                    small, name="shared", sender=SENDER, template=CAMPAIGN_TEMPLATE.name, segment="all"
                )
                bulk = campaigns.create(big, name="bulk", sender=SENDER, template=CAMPAIGN_TEMPLATE.name, segment="all")
                t0 = time.time()
                campaigns.start(big, bulk)  # the big one first: its jobs are older than the small one's
                t_small = time.time()
                campaigns.start(small, shared)
                out["big_start_s"] = round(t_small - t0, 3)
                out["small_shared_s"] = _campaign_done_s(sc.db_url, shared, t_small, p.timeout_s)
                out["big_s"] = _campaign_done_s(sc.db_url, bulk, t0, p.timeout_s)
            with phase(elapsed, "small_alone"):
                alone = campaigns.create(
                    small, name="alone", sender=SENDER, template=CAMPAIGN_TEMPLATE.name, segment="all"
                )
                t0 = time.time()
                campaigns.start(small, alone)
                out["small_alone_s"] = _campaign_done_s(sc.db_url, alone, t0, p.timeout_s)
            out["small_shared_vs_alone"] = round(out["small_shared_s"] / out["small_alone_s"], 2)
            out["big_messages_per_s"] = round(big_n / out["big_s"], 1)
            with connect(sc.db_url) as conn:
                out["lost"] = scalar(conn, "SELECT count(*) FROM jobs WHERE state <> 'completed'")
        finally:
            if pipeline is not None:
                pipeline.stop()
            sink.stop()
            r.close()
            ops.close()
            pool.close()
    notes = {
        "tenants": "tenant small's campaign started just after tenant big's (both tenants new: no recent usage), "
        "then, once big's is done, small's campaign alone; started after big's, small's jobs are the youngest due "
        "work, so without sharing they would wait behind all of big's; clocks run from each start() to the "
        "campaign's last finished_at",
        "rate_limits": f"{p.rate_limits} ({p.rate_limits_source})",
    }
    return finish(out, TENANT_GOALS, p, notes, load_start, elapsed, t_total)


def print_table(res: dict[str, Any]) -> None:
    names = [
        "campaign_messages_per_s",
        "bare_aiosmtplib_messages_per_s",
        "ratio_vs_bare_aiosmtplib",
        "campaign_start_s",
        "high_priority_p99_ms",
        "events_per_message",
        "lost",
        "duplicates",
    ]
    rows = []
    for name in names:
        if name not in res:
            continue
        value = res[name]
        shown = f"{value:,}" if isinstance(value, int) else f"{value}"
        goal = res["goals"].get(name)
        rows.append((name, shown, goal["goal"] if goal else "", "" if not goal else "ok" if goal["met"] else "MISSED"))
    width = [max(len(r[i]) for r in rows + [("metric", "value", "goal", "")]) for i in range(4)]
    print(
        f"mailflow outbound benchmark ({res['services']} services: PostgreSQL {res['postgres_version']}, "
        f"Redis {res['redis_version']}; {res.get('campaign_recipients')} recipients, "
        f"{res['params']['workers']} worker(s); sink: {res.get('sink')})"
    )
    print(f"{'metric':<{width[0]}}  {'value':>{width[1]}}  {'goal':<{width[2]}}")
    for r in rows:
        print(f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:<{width[2]}}  {r[3]}")
    print(
        "cpu seconds during the drain: "
        + ", ".join(f"{k} {v}" for k, v in res.get("cpu_seconds_during_drain", {}).items())
    )
    print("elapsed: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["elapsed_s"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="5,000 recipients and 50 transactional messages")
    ap.add_argument("--recipients", type=int, default=None, metavar="N", help="campaign size (default 100,000)")
    ap.add_argument("--workers", type=int, default=1, metavar="K", help="worker processes (default 1)")
    ap.add_argument(
        "--transactional",
        type=int,
        default=None,
        metavar="T",
        help="high-priority messages sent during the drain (default 200; 50 with --quick)",
    )
    ap.add_argument(
        "--sink",
        choices=("auto", "smtp-sink", "aiosmtpd"),
        default="auto",
        help="SMTP sink (auto: postfix smtp-sink when installed, else aiosmtpd)",
    )
    ap.add_argument("--timeout", type=float, default=1800, metavar="S", help="give up on the drain after S seconds")
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="py-spy record the relay, queuer and workers during the drain into DIR",
    )
    ap.add_argument(
        "--no-analyze",
        action="store_true",
        help="no ANALYZE after loading the contacts and after the campaign start (a fresh database)",
    )
    ap.add_argument(
        "--tenants",
        action="store_true",
        help="fairness: tenant small's 500-recipient campaign alone, then beside tenant big's 20,000 "
        "(with --quick: 200 and 5,000)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the database, the Redis keys and the process logs")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    p = Params.quick() if args.quick else Params()
    params_from_env(p)
    if args.recipients is not None:
        if args.recipients < 1:
            ap.error("--recipients must be at least 1")
        p.recipients = args.recipients
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    p.workers = args.workers
    if args.transactional is not None:
        if args.transactional < 1:
            ap.error("--transactional must be at least 1")
        p.transactional = args.transactional
    p.sink = args.sink
    p.timeout_s = args.timeout
    p.analyze = not args.no_analyze
    p.profile_dir = str(Path(args.profile).resolve()) if args.profile else None
    p.finish()
    if args.tenants:
        if args.quick:
            p.tenant_sizes = (5_000, 200)
        res = run_tenants(mp.get_context("spawn"), p, args.keep)
        if not args.json:
            print(
                f"small alone {res['small_alone_s']} s, beside big {res['small_shared_s']} s "
                f"(x{res['small_shared_vs_alone']}, goal <= 2); big {res['big_s']} s, lost {res['lost']}"
            )
            return 0
    else:
        res = run(p, args.keep)
    if args.json:
        sys.stdout.write(orjson.dumps(res).decode() + "\n")
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
