"""HTTP API benchmark: `mailflow web` under wrk, against the same server stack answering a constant body.

Run `python bench/api.py --json` (one JSON object on stdout; progress on stderr) against the
servers MAILFLOW_DATABASE_URL and MAILFLOW_REDIS_URL point to, or the embedded default. It
needs `wrk` (Debian: apt-get install wrk; LuaJIT-built, as Debian's is) and installs nothing
itself: without it, it exits with one line saying so.

Setup (untimed), in a database of its own (dropped at the end unless --keep): the default
tenant gets a sender whose relay is a local SMTP sink (mailflow.testing.sink; no worker runs,
so nothing is sent), a template, --contacts contacts, a segment of them and a draft campaign,
and an API key with the scopes `campaigns:read` and `messages:send`. Then it starts
`mailflow web --processes N` (N = --processes, default the CPU count; the processes share the
port with SO_REUSEPORT) and N processes of bench/api_baseline.py (the same uvicorn, Starlette,
FastAPI and RequestContext middleware, answering the bytes of the real GET's body), each on a
free loopback port, with rate limits set far above what the run offers
(MAILFLOW_API_RATE_PER_KEY / _PER_TENANT and their bursts: the limiter's Redis script still
runs on every request, its cost is part of the figures).

Phases (wrk with a Lua script of this file, written to the run's folder):

baseline_rps       GET /api/v1/constant (an `async def` operation), closed loop, --connections
                   connections over 2 wrk threads, --duration seconds
get_rps            GET /api/v1/campaigns/{id} with `Authorization: Bearer <key>`, the same way
                   (GET /api/v1/jobs/{id} of a transactional job if the campaigns route is not
                   there yet; `get_path` says which)
baseline_sync_rps  GET /api/v1/constant-sync: the constant body from a `def` operation, which
                   FastAPI runs in its threadpool as it runs mailflow's (information)
get_p99_ms         the GET at --rate (500) requests/s offered, open loop: --rate-connections
                   connections, each its own wrk thread with a fixed schedule; a request's
                   latency runs from when it was due, not from when it was sent, so a stall
                   counts for every request it held back (coordinated-omission correction,
                   wrk2's method)
send_rps           POST /api/v1/messages, each request with its own Idempotency-Key,
                   X-Request-Id and recipient (so each creates a job), closed loop, for
                   --send-duration seconds; then no new request is sent and the answers in
                   flight are awaited. `committed` counts the distinct request ids among the
                   JobCreated events in PostgreSQL and must equal `send_2xx`.

Each phase reports its non-2xx answers and socket errors, and the CPU seconds the server
processes, wrk and the whole machine used (from /proc). `--profile DIR` also records the web
processes with py-spy during get_rps (pip install py-spy) and sorts the samples into where a
GET's time goes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import finish, phase, say, scratch
from mailflow.config import load_settings
from mailflow.infra.services import connect
from mailflow.runtime.wiring import Runtime

GOALS: dict[str, tuple[str, float]] = {
    "get_rps": (">=", 2000),
    "get_p99_ms": ("<", 50),
    "send_rps": (">=", 1000),
    "send_lost": ("==", 0),
}
HERE = Path(__file__).resolve().parent
SENDER = "bench"
TEMPLATE = "receipt"
SCOPES = ["campaigns:read", "messages:send"]
TICKS = os.sysconf("SC_CLK_TCK")
# After the POST window wrk waits this long for the answers in flight, and must end before
# uvicorn closes the idle connections (its keep-alive timeout is 5 s): wrk would reconnect and
# send one request more on each.
SEND_GRACE_S = 3


PHASES = ("baseline", "get", "baseline_sync", "rate", "send")


@dataclass
class Params:
    processes: int = os.cpu_count() or 2  # mailflow web --processes, and as many baseline servers
    connections: int = 64  # closed-loop phases
    threads: int = 2  # wrk threads of the closed-loop phases
    duration_s: int = 30  # each closed-loop GET phase
    warmup_s: int = 5  # closed loop on each server before the clock
    rate: int = 500  # offered requests/s of the fixed-rate phase
    rate_connections: int = 20
    rate_duration_s: int = 30
    send_connections: int = 32
    send_duration_s: int = 20
    contacts: int = 1000
    phases: tuple[str, ...] = PHASES

    @classmethod
    def quick(cls) -> Params:
        return cls(duration_s=8, warmup_s=2, rate_duration_s=10, send_duration_s=6, contacts=200)


# -- the wrk script -------------------------------------------------------------------------

WRK_LUA = r"""
-- wrk script of bench/api.py (wrk 4 built with LuaJIT, as Debian's is).
--   -- max                          closed loop
--   -- rate R C                      R requests/s in all over C connections (run with -tC -cC)
--   -- send STOP_S TAG BODY_PREFIX   POST with unique bodies; nothing new after STOP_S
-- done() prints one line "MFJSON {...}".
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } mf_timespec;
int clock_gettime(int clk_id, mf_timespec *tp);
]]
local ts = ffi.new("mf_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC: one clock for every thread
  return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local mode, interval, next_due, due, planned, stop_at, tag, body_prefix
local n = 0
statuses = {}
lats = {}
first_us = nil
last_us = nil
sent = 0

function init(args)
  mode = args[1] or "max"
  if mode == "rate" then
    local total, conns = tonumber(args[2]), tonumber(args[3])
    interval = 1e6 * conns / total -- this connection's period
    next_due = now_us() + 200000 + tid * (1e6 / total) -- staggered, so the sum arrives evenly
  elseif mode == "send" then
    stop_at = now_us() + tonumber(args[2]) * 1e6
    tag, body_prefix = args[3], args[4]
  end
end

function delay()
  local now = now_us()
  if mode == "rate" then
    planned = next_due
    next_due = next_due + interval
    local wait = planned - now
    if wait <= 0 then return 0 end -- behind schedule: at once (and the latency counts from due)
    return math.ceil(wait / 1000) -- wrk's timers count whole ms: never early
  elseif mode == "send" and now >= stop_at then
    return 3600000 -- the window is over: nothing new, wrk ends with no request in flight
  end
  return 0
end

local static = nil
function request()
  local now = now_us()
  if first_us == nil then first_us = now end
  sent = sent + 1
  if mode == "send" then
    n = n + 1
    local id = tag .. "-" .. tid .. "-" .. n
    local headers = {}
    for k, v in pairs(wrk.headers) do headers[k] = v end
    headers["Content-Type"] = "application/json"
    headers["Idempotency-Key"] = id
    headers["X-Request-Id"] = id
    local body = body_prefix .. '"to":"r' .. tid .. "x" .. n .. '@rcpt.bench.example","variables":{"order":"' .. id .. '"}}'
    return wrk.format("POST", nil, headers, body)
  end
  if mode == "rate" then
    due = planned or now -- a connection's first request may go out undelayed
    planned = nil
  end
  if static == nil then static = wrk.format() end
  return static
end

function response(status, headers, body)
  local now = now_us()
  last_us = now
  statuses[status] = (statuses[status] or 0) + 1
  if mode == "rate" and due ~= nil then
    lats[#lats + 1] = now - due
    due = nil
  end
end

local function json_counts(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = '"' .. tostring(k) .. '":' .. tostring(v) end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local counts, all = {}, {}
  local first, last, sent_all = nil, nil, 0
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses") or {}) do counts[k] = (counts[k] or 0) + v end
    for _, x in ipairs(t:get("lats") or {}) do all[#all + 1] = x end
    local f, l = t:get("first_us"), t:get("last_us")
    if f ~= nil and (first == nil or f < first) then first = f end
    if l ~= nil and (last == nil or l > last) then last = l end
    sent_all = sent_all + (t:get("sent") or 0)
  end
  table.sort(all)
  local function pct(p)
    if #all == 0 then return "null" end
    return string.format("%.3f", all[math.max(1, math.ceil(p / 100 * #all))] / 1000)
  end
  local e = summary.errors
  io.write(string.format(
    'MFJSON {"requests":%d,"duration_s":%.3f,"bytes":%d,"statuses":%s,"sent":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"wrk_latency_ms":{"mean":%.3f,"p50":%.3f,"p90":%.3f,"p99":%.3f,"max":%.3f},' ..
    '"corrected_ms":{"n":%d,"p50":%s,"p90":%s,"p99":%s,"p999":%s,"max":%s},"span_s":%s}\n',
    summary.requests, summary.duration / 1e6, summary.bytes, json_counts(counts), sent_all,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean / 1000, latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    #all, pct(50), pct(90), pct(99), pct(99.9), (#all > 0) and string.format("%.3f", all[#all] / 1000) or "null",
    (first ~= nil and last ~= nil) and string.format("%.3f", (last - first) / 1e6) or "null"))
end
"""


def wrk_version(wrk: str) -> str:
    proc = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    return (proc.stdout + proc.stderr).splitlines()[0].strip() if (proc.stdout + proc.stderr) else "wrk"


# -- processes and CPU ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(root: int) -> list[int]:
    """root and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def machine_busy_s() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / TICKS, sum(fields[:8]) / TICKS


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it answered (see its log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")
        time.sleep(0.2)


def http_get(url: str, token: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def stop_proc(proc: subprocess.Popen[bytes], timeout: float = 30) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


# -- wrk ------------------------------------------------------------------------------------


DB_STATS = """
SELECT xact_commit + xact_rollback, tup_inserted, tup_updated, tup_deleted
FROM pg_stat_database WHERE datname = current_database()
"""
BACKENDS = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"


@dataclass
class Load:
    wrk: str
    script: Path
    token: str
    servers: dict[str, list[int]]  # server name -> its root pids (for CPU accounting)
    db_url: str  # the run's database: the CPU of its PostgreSQL backends is counted

    def backends(self) -> dict[int, float]:
        with connect(self.db_url) as conn:
            pids = [int(r[0]) for r in conn.execute(BACKENDS).fetchall()]
        return {pid: cpu_s([pid]) for pid in pids}

    def db_stats(self) -> dict[str, int]:
        with connect(self.db_url) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(DB_STATS).fetchone()
        assert row is not None
        return dict(zip(("transactions", "rows_inserted", "rows_updated", "rows_deleted"), map(int, row), strict=True))

    def run(
        self,
        url: str,
        server: str,
        *,
        threads: int,
        connections: int,
        duration_s: float,
        args: list[str],
        extra: list[str] | None = None,
    ) -> dict[str, Any]:
        cmd = [
            self.wrk,
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{duration_s:g}s",
            "--timeout",
            "10s",
            "-H",
            f"Authorization: Bearer {self.token}",
            *(extra or []),
            "-s",
            str(self.script),
            url,
            "--",
            *args,
        ]
        pids = [p for root in self.servers[server] for p in descendants(root)]
        db0, stats0 = self.backends(), self.db_stats()
        wrk0 = cpu_wrk_children()
        cpu0, (busy0, all0) = cpu_s(pids), machine_busy_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = proc.communicate(timeout=duration_s + 120)
        wall = time.perf_counter() - t0
        cpu1, (busy1, all1) = cpu_s(pids), machine_busy_s()
        db1 = self.backends()
        time.sleep(1.2)  # PostgreSQL publishes a backend's counters within a second of its transactions
        stats1 = self.db_stats()
        res_wrk = cpu_wrk_children() - wrk0  # wrk's CPU, counted once it was reaped
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {stderr.decode(errors='replace').strip()[:500]}")
        line = next((x for x in stdout.decode().splitlines() if x.startswith("MFJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result: {stdout.decode(errors='replace')[:500]}")
        res: dict[str, Any] = orjson.loads(line.removeprefix("MFJSON "))
        statuses = {int(k): v for k, v in res.pop("statuses").items()}
        ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
        res["ok_2xx"] = ok
        res["non_2xx"] = {str(k): v for k, v in sorted(statuses.items()) if not 200 <= k < 300}
        res["socket_errors"] = {k: v for k, v in res.pop("errors").items() if k != "status" and v}
        res["server_cpu_s"] = round(cpu1 - cpu0, 2)
        res["wrk_cpu_s"] = round(res_wrk, 2)
        res["postgres_cpu_s"] = round(sum(v - db0.get(pid, 0.0) for pid, v in db1.items()), 2)
        answered = sum(statuses.values())
        res["postgres_per_request"] = {
            k: round((stats1[k] - stats0[k]) / answered, 2) if answered else None for k in stats0
        }
        res["machine_cpu_busy_share"] = round((busy1 - busy0) / (all1 - all0), 3) if all1 > all0 else None
        ours = res["server_cpu_s"] + res["postgres_cpu_s"] + res["wrk_cpu_s"]
        res["others_cpu_cores"] = round(max(0.0, (busy1 - busy0) - ours) / wall, 2)  # other users, Redis, this script
        res["wall_s"] = round(wall, 2)
        return res


def cpu_wrk_children() -> float:
    ru = os.times()
    return ru.children_user + ru.children_system


def closed_loop(load: Load, url: str, server: str, p: Params, duration_s: float) -> dict[str, Any]:
    res = load.run(url, server, threads=p.threads, connections=p.connections, duration_s=duration_s, args=["max"])
    res["rps"] = round(res["ok_2xx"] / res["duration_s"], 1)
    per_request(res)
    return res


def with_ms(prof: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """A profile's shares turned into server CPU ms per 2xx answer of its phase."""
    ms = res["server_cpu_ms_per_request"] or 0.0
    prof["cpu_ms_per_request_by_owner"] = {k: round(v * ms, 3) for k, v in prof["share_by_owner"].items()}
    return prof


def per_request(res: dict[str, Any]) -> None:
    """CPU ms per 2xx answer: the server processes', PostgreSQL's (the run's backends), wrk's."""
    n = res["ok_2xx"]
    for what in ("server", "postgres", "wrk"):
        res[f"{what}_cpu_ms_per_request"] = round(1000 * res[f"{what}_cpu_s"] / n, 3) if n else None


# -- setup ----------------------------------------------------------------------------------


def setup(rt: Runtime, p: Params, sink_url: str) -> tuple[str, str, str]:
    """The default tenant's sender, template, contacts, segment, draft campaign, a
    transactional job (for the fallback GET) and an API key: (campaign id, job id, key)."""
    from mailflow.outbound import campaigns, segments, sending, templates
    from mailflow.outbound.contacts import import_csv_text
    from mailflow.outbound.senders import Sender
    from mailflow.tenants import keys

    store = rt.store.for_tenant("default")
    sending.save_sender(store, Sender(SENDER, "orders@bench.example", "Bench Shop", sink_url), rt.vault)
    templates.save(
        store,
        templates.Template(
            TEMPLATE, "Order {{ order }} confirmed", "<p>Thank you, order {{ order }} is on its way.</p>"
        ),
    )
    people = "\n".join(f"reader{i}@readers.example,Reader {i}" for i in range(p.contacts))
    import_csv_text(store, "email,name\n" + people + "\n")
    segments.define(store, "readers", {})
    campaign_id = campaigns.create(store, name="bench campaign", sender=SENDER, template=TEMPLATE, segment="readers")
    job_id, _ = sending.send_transactional(
        store, sender=SENDER, template=TEMPLATE, to="first@rcpt.bench.example", variables={"order": "0"}
    )
    _, token = keys.create(store, "bench", SCOPES)
    return campaign_id, job_id, token


def campaign_route(openapi: dict[str, Any]) -> str | None:
    """The path template of `GET /campaigns/{...}` in the OpenAPI document, if there is one."""
    for path, ops in (openapi.get("paths") or {}).items():
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "campaigns" and parts[1].startswith("{") and "get" in ops:
            return path
    return None


COMMITTED = """
SELECT count(DISTINCT metadata->>'correlation_id') AS committed, count(*) AS events
FROM events WHERE type = 'JobCreated' AND metadata->>'correlation_id' LIKE %(like)s
"""
JOBS = "SELECT count(*) FROM jobs WHERE idempotency_key LIKE %(like)s"


# -- the run --------------------------------------------------------------------------------


def run(p: Params, keep: bool, profile: Path | None) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    elapsed: dict[str, float] = {}
    t_total = time.perf_counter()
    load_start = os.getloadavg()[0]
    out: dict[str, Any] = {
        "tool": {
            "name": "wrk",
            "version": wrk_version(wrk),
            "closed_loop": "wrk, --connections connections over --threads threads",
            "fixed_rate": "wrk + this script's Lua schedule (wrk2's method: one connection per thread, "
            "latency from the due time, coordinated-omission corrected)",
        },
        "processes": p.processes,
        "cpus": os.cpu_count(),
    }
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []
    from mailflow.testing.sink import SinkServer

    with scratch("api", keep, elapsed) as sc, SinkServer() as sink:
        out.update(sc.info)
        settings = load_settings().model_copy(
            update={"database_url": sc.db_url, "redis_url": sc.redis_url, "redis_prefix": sc.prefix, "home": sc.workdir}
        )
        with phase(elapsed, "setup"):
            rt = Runtime(settings, pool_size=2, operator=True)
            try:
                campaign_id, job_id, token = setup(rt, p, sink.relay_url(timeout_s=10))
            finally:
                rt.close()
            with connect(sc.db_url) as conn:
                conn.execute("ANALYZE")
        script = sc.workdir / "api.lua"
        script.write_text(WRK_LUA)
        env = dict(
            os.environ,
            MAILFLOW_DATABASE_URL=sc.db_url,
            MAILFLOW_REDIS_URL=sc.redis_url,
            MAILFLOW_REDIS_PREFIX=sc.prefix,
            MAILFLOW_HOME=str(sc.workdir),
            MAILFLOW_LOG_FORMAT="json",
            MAILFLOW_API_RATE_PER_KEY="1000000",
            MAILFLOW_API_BURST_PER_KEY="1000000",
            MAILFLOW_API_RATE_PER_TENANT="1000000",
            MAILFLOW_API_BURST_PER_TENANT="1000000",
        )
        try:
            with phase(elapsed, "start_servers"):
                web_port, base_port = free_port(), free_port()
                logs.append(open(sc.workdir / "web.log", "wb"))  # noqa: SIM115 - closed below
                web_cmd = [sys.executable, "-m", "mailflow.cli", "web", "--port", str(web_port)]
                if p.processes > 1:
                    web_cmd += ["--processes", str(p.processes)]
                web = subprocess.Popen(web_cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT)
                procs.append(web)
                web_url = f"http://127.0.0.1:{web_port}"
                wait_http(f"{web_url}/healthz", web, "mailflow web")
                openapi = orjson.loads(urllib.request.urlopen(f"{web_url}/api/v1/openapi.json", timeout=10).read())
                route = campaign_route(openapi)
                if route is not None:
                    get_path = "/api/v1" + route.split("{", 1)[0] + campaign_id
                    out["get_path"] = f"/api/v1{route}"
                else:
                    get_path = f"/api/v1/jobs/{job_id}"
                    out["get_path"] = "/api/v1/jobs/{job_id} (no GET /campaigns/{id} in the OpenAPI document yet)"
                status, body = http_get(web_url + get_path, token)
                if status != 200:
                    raise RuntimeError(f"GET {get_path} answered {status}: {body[:300]!r}")
                out["get_body_bytes"] = len(body)
                (sc.workdir / "body.json").write_bytes(body)
                logs.append(open(sc.workdir / "baseline.log", "wb"))  # noqa: SIM115 - closed below
                bases = [
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(HERE / "api_baseline.py"),
                            "--port",
                            str(base_port),
                            "--body-file",
                            str(sc.workdir / "body.json"),
                            "--shared-port",
                        ],
                        env=env,
                        stdout=logs[-1],
                        stderr=subprocess.STDOUT,
                    )
                    for _ in range(p.processes)
                ]
                procs.extend(bases)
                base_url = f"http://127.0.0.1:{base_port}"
                for b in bases:
                    wait_http(f"{base_url}/healthz", b, "bench/api_baseline.py")
                time.sleep(1)  # every baseline process listening
                web_pids = [x for x in descendants(web.pid) if x == web.pid or b"--shared-port" in _cmdline(x)]
                if len(web_pids) > 1:
                    web_pids.remove(web.pid)  # the supervisor: it serves nothing
                out["web_server_processes"] = len(web_pids)
            load = Load(wrk, script, token, {"web": [web.pid], "baseline": [b.pid for b in bases]}, sc.db_url)
            with phase(elapsed, "warmup"):
                closed_loop(load, base_url + "/api/v1/constant", "baseline", p, p.warmup_s)
                closed_loop(load, web_url + get_path, "web", p, p.warmup_s)
            ph: dict[str, dict[str, Any]] = {}
            if "baseline" in p.phases:
                with phase(elapsed, "baseline"):
                    ph["baseline"] = closed_loop(load, base_url + "/api/v1/constant", "baseline", p, p.duration_s)
                say(f"  baseline: {ph['baseline']['rps']:.0f} req/s")
            if "get" in p.phases:
                profiler = Profiler(profile, web_pids, "get", OWNERS) if profile else None
                with phase(elapsed, "get_max"):
                    if profiler:
                        profiler.start()
                    get = ph["get_max"] = closed_loop(load, web_url + get_path, "web", p, p.duration_s)
                    if profiler:
                        out["profile"] = with_ms(profiler.stop(), get)
                say(f"  GET: {get['rps']:.0f} req/s")
            if "baseline_sync" in p.phases:
                with phase(elapsed, "baseline_sync"):
                    ph["baseline_sync"] = closed_loop(
                        load, base_url + "/api/v1/constant-sync", "baseline", p, p.duration_s
                    )
            if "rate" in p.phases:
                with phase(elapsed, "get_rate"):
                    fixed = ph["get_rate"] = load.run(
                        web_url + get_path,
                        "web",
                        threads=p.rate_connections,
                        connections=p.rate_connections,
                        duration_s=p.rate_duration_s,
                        args=["rate", str(p.rate), str(p.rate_connections)],
                    )
                    per_request(fixed)
                    fixed["achieved_rps"] = round(fixed["ok_2xx"] / fixed["span_s"], 1) if fixed["span_s"] else None
                say(f"  GET at {p.rate}/s: p99 {fixed['corrected_ms']['p99']} ms")
            if "send" in p.phases:
                tag = f"bsend{uuid.uuid4().hex[:8]}"
                with phase(elapsed, "send"):
                    prefix = orjson.dumps({"sender": SENDER, "template": TEMPLATE}).decode()[:-1] + ","
                    send_profiler = Profiler(profile, web_pids, "send", SEND_OWNERS) if profile else None
                    if send_profiler:
                        send_profiler.start()
                    send = ph["send"] = load.run(
                        web_url + "/api/v1/messages",
                        "web",
                        threads=p.threads,
                        connections=p.send_connections,
                        duration_s=p.send_duration_s + SEND_GRACE_S,  # after the window: the answers in flight
                        args=["send", str(p.send_duration_s), tag, prefix],
                    )
                    send["rps"] = round(send["ok_2xx"] / send["span_s"], 1) if send["span_s"] else None
                    per_request(send)
                    if send_profiler:
                        out["profile_send"] = with_ms(send_profiler.stop(), send)
                    with connect(sc.db_url) as conn:
                        committed, events = conn.execute(COMMITTED, {"like": f"{tag}-%"}).fetchone()  # type: ignore[misc]
                        jobs = conn.execute(JOBS, {"like": f"api:{tag}-%"}).fetchone()[0]  # type: ignore[index]
                say(f"  POST /messages: {send['rps']} req/s, {committed} committed of {send['ok_2xx']} 2xx")
                out.update(
                    send_2xx=send["ok_2xx"],
                    committed=committed,
                    send_lost=max(0, send["ok_2xx"] - committed),
                    send_committed_matches=committed == send["ok_2xx"],
                    send_jobs=jobs,
                    send_job_created_events=events,
                )
            with phase(elapsed, "stop_servers"):
                out["exit_codes"] = {"web": stop_proc(web, 60), "baseline": [stop_proc(b) for b in bases]}
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            for f in logs:
                f.close()
        out["web_log_problems"] = _log_problems(sc.workdir / "web.log")
    figures = {
        "get_rps": ph.get("get_max", {}).get("rps"),
        "get_p99_ms": ph.get("get_rate", {}).get("corrected_ms", {}).get("p99"),
        "send_rps": ph.get("send", {}).get("rps"),
        "baseline_rps": ph.get("baseline", {}).get("rps"),
    }
    if figures["get_rps"] and figures["baseline_rps"]:
        figures["ratio_vs_baseline"] = round(figures["get_rps"] / figures["baseline_rps"], 3)
    figures["baseline_sync_rps"] = ph.get("baseline_sync", {}).get("rps")
    out.update({k: v for k, v in figures.items() if v is not None})
    out["errors"] = {name: {**r["non_2xx"], **r["socket_errors"]} for name, r in ph.items()}
    out["phases"] = ph
    notes = {
        "closed_loop": f"{p.connections} connections over {p.threads} wrk threads, {p.duration_s} s each; "
        "rps = 2xx answers / wrk's duration",
        "get_p99_ms": f"{p.rate} req/s offered over {p.rate_connections} connections for {p.rate_duration_s} s; "
        "latency from each request's due time (coordinated-omission corrected; includes up to 1 ms of "
        "wrk's millisecond timers); phases.get_rate.wrk_latency_ms is from the actual send",
        "send": f"{p.send_connections} connections for {p.send_duration_s} s, then the answers in flight; "
        "rps = 2xx / (last answer - first request); committed = distinct X-Request-Ids among the "
        "JobCreated events",
        "machine": "wrk, the servers, PostgreSQL and Redis share the machine's CPUs; "
        "machine_cpu_busy_share per phase shows how busy it was, other users' load included",
    }
    first = ("get_rps", "get_p99_ms", "send_rps", "baseline_rps", "ratio_vs_baseline", "committed", "send_2xx")
    out = {**{k: out[k] for k in first if k in out}, **out}
    return finish(out, GOALS, p, notes, load_start, elapsed, t_total)


def _log_problems(path: Path) -> dict[str, int]:
    """Warnings and errors in the web servers' log, by event name."""
    seen: Counter[str] = Counter()
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            if line.strip():
                seen["(not json)"] += 1
            continue
        if not isinstance(rec, dict):
            continue
        inner = rec
        if rec.get("level") in ("warning", "error", "critical"):
            seen[f"{inner.get('level')}: {inner.get('event')}"] += 1
    return dict(seen.most_common(20))


# -- py-spy ---------------------------------------------------------------------------------

PROFILE_RATE = 250

# Where a GET's CPU goes. py-spy samples only the thread holding the GIL (--gil), so the
# samples add up to the processes' Python CPU time. A sample belongs to the deepest frame of
# its stack that one of these names: psycopg's frames under Gate.authenticate are the key
# lookup, under _campaigns the read, and so on.
OWNERS: list[tuple[str, tuple[str, ...]]] = [
    ("auth: key lookup (PostgreSQL)", ("Gate.authenticate", "verify (tenants/keys.py)", "Gate._touch", "judge (")),
    ("auth: rate limit (Redis script)", ("Gate._charge",)),
    ("auth: the dependency", ("require.<locals>.dependency",)),
    ("operation: the read (PostgreSQL)", ("_campaigns (", "Ctx.reading", "reading (consumers/inline.py)", "views.py")),
    ("pool: getting and returning a PostgreSQL connection", ("psycopg_pool/",)),
    (
        "response: validation + serialization",
        (
            "model_validate",
            "serialize_response",
            "jsonable_encoder",
            "Response.render",
            "Response.__init__",
            "_prepare_response_content",
            "ModelField.validate",
            "ModelField.serialize",
            "dump_json",
        ),
    ),
    ("routing: matching the path", ("._match (", ".matches (", "get_route_path")),
    (
        "fastapi: request handling, parameters",
        (
            "solve_dependencies",
            "request_params_to_args",
            "get_request_handler",
            "IdempotentRoute",
            "run_endpoint_function",
            "_run_sync_endpoint",
        ),
    ),
    (
        "threadpool: to a worker thread and back",
        (
            "run_sync",
            "run_in_threadpool",
            "WorkerThread",
            "to_thread",
            "Queue.put",
            "Queue.get",
            "checkpoint",
            "call_soon_threadsafe",
            "Future.set_result",
        ),
    ),
    (
        "middleware: RequestContext",
        ("RequestContext.__call__", "bound_contextvars", "acting (", "uuid4", "decorated_send", "counting_receive"),
    ),
    ("http: uvicorn + h11", ("h11", "H11Protocol", "RequestResponseCycle", "httptools")),
    (
        "starlette/fastapi middleware and routers",
        (
            "ServerErrorMiddleware",
            "ExceptionMiddleware",
            "AsyncExitStack",
            "Telemetry",
            "BodyLimit",
            "Mount.handle",
            "Router.__call__",
            "Router.app",
            "wrapped_app",
            "Starlette.__call__",
            "FastAPI.__call__",
            "APIRouter",
            "APIRoute.handle",
            "request_response",
        ),
    ),
    ("asyncio event loop", ("BaseEventLoop", "selector", "Handle._run", "asyncio")),
]


# Where a POST /messages's CPU goes (the same rule: the deepest frame named here).
SEND_OWNERS: list[tuple[str, tuple[str, ...]]] = [
    ("auth: key lookup + rate limit", ("Gate.authenticate",)),
    ("idempotency: claim the key (own transaction)", ("claim (api/idempotency.py)",)),
    ("idempotency: keep the response (own transaction)", ("keep (api/idempotency.py)",)),
    ("send: look up key, sender, template", ("_job_by_key", "load_sender", "templates.py")),
    ("send: render the template (check)", ("render (", "jinja2")),
    ("send: write the job + events (commit)", ("create_jobs", "job_to", "writing (consumers/inline.py)", "Writer.")),
    ("send: read the job back", ("get_job (outbound/views.py)", "views.py")),
    ("send: the rest of send_transactional", ("send_transactional",)),
    ("pool: getting and returning a PostgreSQL connection", ("psycopg_pool/",)),
    (
        "request: body, validation (EmailStr), serialization",
        ("pydantic", "email_validator", "jsonable_encoder", "serialize_response", "Request.body", "Request.json"),
    ),
    ("routing: matching the path", ("._match (", ".matches (", "get_route_path")),
    ("fastapi: request handling, parameters", ("solve_dependencies", "request_params_to_args", "get_request_handler")),
    ("threadpool: to a worker thread and back", dict(OWNERS)["threadpool: to a worker thread and back"]),
    (
        "middleware, http, asyncio",
        tuple(
            m
            for k in (
                "middleware: RequestContext",
                "http: uvicorn + h11",
                "starlette/fastapi middleware and routers",
                "asyncio event loop",
            )
            for m in dict(OWNERS)[k]
        ),
    ),
]


def _short(frame: str) -> str:
    """ "func (/long/path/pkg/file.py:123)" -> "func (pkg/file.py)"."""
    m = re.match(r"^(.*) \(([^()]*?):\d+\)$", frame)
    return frame if not m else f"{m.group(1)} ({'/'.join(m.group(2).split('/')[-2:])})"


def _owner(frames: list[str], owners: list[tuple[str, tuple[str, ...]]]) -> str:
    for frame in reversed(frames):
        for label, marks in owners:
            if any(m in frame for m in marks):
                return label
    return "other"


class Profiler:
    def __init__(self, directory: Path, pids: list[int], name: str, owners: list[tuple[str, tuple[str, ...]]]) -> None:
        self.directory = directory
        self.pids = pids
        self.name = name
        self.owners = owners
        self.procs: list[tuple[Path, subprocess.Popen[bytes]]] = []

    def start(self) -> None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists() and not shutil.which(pyspy):
            raise SystemExit("bench/api.py --profile needs py-spy: pip install py-spy")
        self.directory.mkdir(parents=True, exist_ok=True)
        for pid in self.pids:
            outp = self.directory / f"{self.name}-{pid}.txt"
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
                    "--gil",
                    "--output",
                    str(outp),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(self.directory / f"{self.name}-{pid}.py-spy.log", "wb"),  # noqa: SIM115
            )
            self.procs.append((outp, proc))

    def stop(self) -> dict[str, Any]:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        return {**summarize([outp for outp, _ in self.procs], self.owners), "files": str(self.directory)}


def summarize(paths: list[Path], owners: list[tuple[str, tuple[str, ...]]] = OWNERS) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks: the share of the samples each owner has, the hottest leaves."""
    shares: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            frames = [_short(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
            if frames:
                total += int(n)
                shares[_owner(frames, owners)] += int(n)
                leaves[frames[-1]] += int(n)
    return {
        "samples_holding_gil": total,
        "rate_hz": PROFILE_RATE,
        "share_by_owner": {k: round(v / total, 3) for k, v in shares.most_common()} if total else {},
        "self_top": {k: round(v / total, 3) for k, v in leaves.most_common(15)} if total else {},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="short phases (a smoke run, about a minute)")
    ap.add_argument("--processes", type=int, default=None, metavar="N", help="mailflow web --processes (default: CPUs)")
    ap.add_argument("--connections", type=int, default=None, metavar="C", help="closed-loop connections (64)")
    ap.add_argument("--duration", type=int, default=None, metavar="S", help="each closed-loop GET phase (30)")
    ap.add_argument("--rate", type=int, default=None, metavar="R", help="offered req/s of the p99 phase (500)")
    ap.add_argument("--send-duration", type=int, default=None, metavar="S", help="the POST phase (20)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR", help="py-spy the web processes during get_rps")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"a subset of {','.join(PHASES)} (in that order)")
    ap.add_argument("--keep", action="store_true", help="keep the database, Redis keys and logs")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench/api.py needs wrk (HTTP load generator): apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    p = Params.quick() if args.quick else Params()
    for name, value in (
        ("processes", args.processes),
        ("connections", args.connections),
        ("duration_s", args.duration),
        ("rate", args.rate),
        ("send_duration_s", args.send_duration),
    ):
        if value is not None:
            setattr(p, name, value)
    p.phases = tuple(x.strip() for x in args.phases.split(",") if x.strip())
    unknown = set(p.phases) - set(PHASES)
    if unknown:
        print(
            f"bench/api.py: unknown --phases {', '.join(sorted(unknown))}; choose from {','.join(PHASES)}",
            file=sys.stderr,
        )
        return 2
    res = run(p, args.keep, args.profile)
    if args.json:
        sys.stdout.write(orjson.dumps(res).decode() + "\n")
    else:
        for k, v in res.items():
            if not isinstance(v, dict | list):
                print(f"{k:<26} {v}")
        print(f"{'tool':<26} {res['tool']['version']}")
        m = res["machine"]
        print(f"{'load average (1 min)':<26} {m['loadavg_1m_start']} at the start, {m['loadavg_1m_end']} at the end")
        print(f"{'errors':<26} {orjson.dumps(res.get('errors', {})).decode()}")
        print(
            f"{'phase':<14} {'req/s':>8} {'server ms':>10} {'pg ms':>7} {'p50 ms':>8} {'p99 ms':>8}  (CPU per request)"
        )
        for name, r in res.get("phases", {}).items():
            lat = r["corrected_ms"] if r["corrected_ms"]["n"] else r["wrk_latency_ms"]
            rps = r.get("rps") or r.get("achieved_rps")
            print(
                f"{name:<14} {rps:>8} {r['server_cpu_ms_per_request']:>10} {r['postgres_cpu_ms_per_request']:>7} "
                f"{lat['p50']:>8} {lat['p99']:>8}"
            )
        for name, goal in res.get("goals", {}).items():
            print(f"{name:<26} goal {goal['goal']}: {'ok' if goal['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
