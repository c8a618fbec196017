"""Benchmark of the event log spine: appends, relay lag, projection rebuild, and a baseline.

Run `python bench/events.py` (a table) or `python bench/events.py --json` (one JSON object on
stdout; progress goes to stderr). Services come from MAILFLOW_DATABASE_URL /
MAILFLOW_REDIS_URL, or the embedded default under MAILFLOW_HOME when they are unset
(mailflow.infra.services.resolve). The run creates a fresh database `mailflow_bench_<pid>` on the
server the URL points to (migrated with mailflow.infra.migrate, dropped at the end unless --keep)
and uses a unique Redis key prefix whose keys are deleted at the end. `--quick` is a smoke
run (small sizes, short phases); the full run takes about 1.5 minutes on 2 cores.

Phases, in the order they run (all appends are durable, with the server's own
synchronous_commit; every figure is wall-clock on this one machine, clients included):

append_batched_events_per_s, eventsourcing_batched_events_per_s, ratio_vs_eventsourcing
    One process. mailflow: EventStore.append() of 1000 events (~100 bytes of JSON data each)
    per call with an expected version, round-robin over 8 streams. Baseline: the PyPI
    `eventsourcing` library's PostgresApplicationRecorder.insert_events() (its default path:
    table lock + NOTIFY + unnest insert, in a pipeline) in the same database, with lists of
    1000 StoredEvent whose `state` is the same 100-byte JSON, round-robin over 8 aggregates.
    Inputs are built before timing (serialising them is timed: it is part of each call).
    After a warm-up of both, they run in alternating rounds so that table growth,
    checkpoints and other load hit both alike; rate = events / timed seconds over all rounds.
append_concurrent_events_per_s
    16 writer processes (a pool of one connection and an EventStore each), warmed up and
    released together by an event, each appending 3 events at a time with an expected version
    to its own streams for a fixed time. Rate = all events / (last finish - start).
relay_lag_p50_ms, relay_lag_p99_ms, relay_lag_max_ms
    The database then holds the events of the phases above. It is sequenced and ANALYZEd
    (as autovacuum would have done in a running system; --no-analyze skips that) and the
    event_counts consumer catches up, so that the relay resumes from its checkpoint. Then a
    real relay runs (`python -m mailflow.cli relay` subprocess) and the clock starts once a
    marker event has reached the stream. 4 writer processes offer 5,000 events/s on a fixed
    schedule (5-event appends); each event's commit time is taken right after append()
    returns. A reader process does XREAD BLOCK on `<prefix>:events` and notes when each entry
    arrives. Lag = arrival - commit, for events committed after a warm-up (time.monotonic()
    is system-wide on Linux, so times taken in different processes compare).
rebuild_events_per_s
    Events are appended in batches until the database holds `--rebuild-events` (default
    1,000,000, counting those of earlier phases), sequenced with store.sync() and VACUUM
    ANALYZEd, all untimed (sequencer_events_per_s is the sync's rate); then
    ConsumerRunner(EventCounts(), ...).rebuild(1) is timed and its counts are checked.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.context
import multiprocessing.synchronize
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from psycopg.conninfo import conninfo_to_dict

from _common import collect, finish, percentile, phase, rnd, say, scalar, scratch
from mailflow import log as mailflow_log
from mailflow.config import Settings, load_settings
from mailflow.consumers.runtime import ConsumerRunner
from mailflow.events.envelope import NewEvent
from mailflow.events.keys import Keys
from mailflow.events.store import NO_STREAM, EventStore
from mailflow.infra.services import connect, open_pool, redis_client
from mailflow.infra.tenancy import Scope
from mailflow.projectors.event_counts import EventCounts

# Appends run as a tenant would: row-level security on, every event stamped with its tenant.
TENANT = Scope.of("default")

EVENT_TYPES = ("JobQueued", "JobActivated", "MessageDelivered", "MessageOpened", "ReplyReceived")
DATA_BYTES = 100
GOALS: dict[str, tuple[str, float]] = {
    "append_batched_events_per_s": (">=", 60_000),
    "append_concurrent_events_per_s": (">=", 10_000),
    "relay_lag_p99_ms": ("<", 50),
    "rebuild_events_per_s": (">=", 50_000),
    "ratio_vs_eventsourcing": (">=", 1.6),
}
Ctx = multiprocessing.context.SpawnContext
PHASES = ("batched", "concurrent", "relay", "rebuild")  # the order they run in


# -- parameters ----------------------------------------------------------------------------


@dataclass
class Params:
    batch_size: int = 1000
    batched_streams: int = 8
    batched_warmup_batches: int = 10
    batched_rounds: int = 6
    batched_batches_per_round: int = 50
    concurrent_writers: int = 16
    concurrent_events_per_append: int = 3
    concurrent_streams_per_writer: int = 50
    concurrent_warmup_appends: int = 20
    concurrent_seconds: float = 10.0
    concurrent_prebuilt_appends: int = 5000
    relay_rate_events_per_s: int = 5000
    relay_writers: int = 4
    relay_events_per_append: int = 5
    relay_warmup_s: float = 2.0
    relay_seconds: float = 10.0
    rebuild_events: int = 1_000_000
    rebuild_load_batch: int = 2000
    data_bytes: int = DATA_BYTES
    analyze: bool = True
    phases: list[str] = field(default_factory=lambda: list(PHASES))

    @classmethod
    def quick(cls) -> Params:
        return cls(
            batched_warmup_batches=5,
            batched_rounds=4,
            batched_batches_per_round=10,
            concurrent_seconds=3.0,
            concurrent_warmup_appends=10,
            relay_warmup_s=1.0,
            relay_seconds=4.0,
            rebuild_events=50_000,
        )


# -- small helpers -------------------------------------------------------------------------


def payload(n: int, size: int = DATA_BYTES) -> dict[str, Any]:
    """Event data whose compact JSON is `size` bytes (for n below 10**9)."""
    base = {"campaign_id": f"c-{n % 997:05d}", "contact": f"k-{n:09d}", "pad": ""}
    pad = size - len(orjson.dumps(base))
    base["pad"] = "x" * max(pad, 0)
    return base


def new_events(count: int, start: int, size: int = DATA_BYTES) -> list[NewEvent]:
    return [NewEvent(EVENT_TYPES[(start + i) % len(EVENT_TYPES)], payload(start + i, size)) for i in range(count)]


def _stop_children(procs: list[Any], grace_s: float = 5.0) -> None:
    """Let child processes exit (they have reported); terminate any still running after grace_s."""
    started = [p for p in procs if p.pid is not None]
    deadline = time.monotonic() + grace_s
    for p in started:
        p.join(timeout=max(deadline - time.monotonic(), 0.01))
    for p in started:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


# -- phase 1: batched appends vs eventsourcing ---------------------------------------------


def _es_recorder(db_url: str) -> tuple[Any, Any]:
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    info = conninfo_to_dict(db_url)
    datastore = PostgresDatastore(
        dbname=str(info["dbname"]),
        host=str(info.get("host") or "localhost"),
        port=str(info.get("port") or "5432"),
        user=str(info.get("user") or "postgres"),
        password=str(info.get("password") or ""),
        pool_size=1,
    )
    recorder = PostgresApplicationRecorder(datastore, events_table_name="es_stored_events")
    recorder.create_table()
    return datastore, recorder


def bench_batched(store: EventStore, db_url: str, p: Params) -> dict[str, Any]:
    from eventsourcing.persistence import StoredEvent

    datastore, recorder = _es_recorder(db_url)
    mf_versions = [0] * p.batched_streams
    es_ids = [uuid.uuid4() for _ in range(p.batched_streams)]
    es_versions = [0] * p.batched_streams
    counter = [0]

    def mf_batches(n: int) -> list[tuple[int, list[NewEvent]]]:
        out = []
        for _ in range(n):
            evs = new_events(p.batch_size, counter[0] * p.batch_size, p.data_bytes)
            out.append((counter[0] % p.batched_streams, evs))
            counter[0] += 1
        return out

    def es_batches(n: int) -> list[list[StoredEvent]]:
        out = []
        for _ in range(n):
            s = counter[0] % p.batched_streams
            v0 = es_versions[s]
            batch = [
                StoredEvent(
                    originator_id=es_ids[s],
                    originator_version=v0 + i + 1,
                    topic=f"bench.events:{EVENT_TYPES[i % len(EVENT_TYPES)]}",
                    state=orjson.dumps(payload(counter[0] * p.batch_size + i, p.data_bytes)),
                )
                for i in range(p.batch_size)
            ]
            es_versions[s] = v0 + p.batch_size
            out.append(batch)
            counter[0] += 1
        return out

    def run_mf(batches: list[tuple[int, list[NewEvent]]]) -> float:
        t0 = time.perf_counter()
        for s, evs in batches:
            expected = mf_versions[s] or NO_STREAM
            store.append(f"bench-batched-{s}", evs, expected)
            mf_versions[s] += len(evs)
        return time.perf_counter() - t0

    def run_es(batches: list[list[StoredEvent]]) -> float:
        t0 = time.perf_counter()
        for batch in batches:
            recorder.insert_events(batch)
        return time.perf_counter() - t0

    try:
        run_mf(mf_batches(p.batched_warmup_batches))
        run_es(es_batches(p.batched_warmup_batches))
        per_round = p.batched_batches_per_round * p.batch_size
        mf_times: list[float] = []
        es_times: list[float] = []
        for r in range(p.batched_rounds):
            mf_times.append(run_mf(mf_batches(p.batched_batches_per_round)))
            es_times.append(run_es(es_batches(p.batched_batches_per_round)))
            say(
                f"  round {r + 1}/{p.batched_rounds}: mailflow {per_round / mf_times[-1]:,.0f}/s, "
                f"eventsourcing {per_round / es_times[-1]:,.0f}/s"
            )
    finally:
        datastore.close()
    with store.pool.connection() as conn:
        es_state = scalar(conn, "SELECT avg(octet_length(state)) FROM es_stored_events")
        mf_data = scalar(conn, "SELECT avg(octet_length(data::text)) FROM events WHERE stream LIKE 'default/bench-b%'")
        mf_meta = scalar(
            conn, "SELECT avg(octet_length(metadata::text)) FROM events WHERE stream LIKE 'default/bench-b%'"
        )
    total = per_round * p.batched_rounds
    mf_rate = total / sum(mf_times)
    es_rate = total / sum(es_times)
    return {
        "append_batched_events_per_s": round(mf_rate),
        "eventsourcing_batched_events_per_s": round(es_rate),
        "ratio_vs_eventsourcing": round(mf_rate / es_rate, 3),
        # Noise check on a shared machine: the median of the per-round (paired) ratios.
        "ratio_vs_eventsourcing_median_round": round(
            statistics.median(e / m for m, e in zip(mf_times, es_times, strict=True)), 3
        ),
        "batched_rounds_events_per_s": {
            "mailflow": [round(per_round / t) for t in mf_times],
            "eventsourcing": [round(per_round / t) for t in es_times],
        },
        "batched_payload_bytes": {
            "mailflow_data": rnd(float(mf_data), 1),
            "mailflow_metadata": rnd(float(mf_meta), 1),
            "eventsourcing_state": rnd(float(es_state), 1),
        },
    }


# -- phase 2: concurrent writers -----------------------------------------------------------


def _concurrent_writer(
    db_url: str,
    wid: int,
    p: Params,
    go: multiprocessing.synchronize.Event,
    start_at: Any,
    results: Any,
) -> None:
    try:
        pool = open_pool(db_url, scope=TENANT, min_size=1, max_size=1)
        store = EventStore(pool, tenant=TENANT.tenant)
        versions = [0] * p.concurrent_streams_per_writer
        k = p.concurrent_events_per_append
        # Events are built before the clock starts (more than a writer gets through, on 2 cores).
        prebuilt = [new_events(k, i * k, p.data_bytes) for i in range(p.concurrent_prebuilt_appends)]
        n = 0

        def one_append() -> None:
            nonlocal n
            s = n % p.concurrent_streams_per_writer
            evs = prebuilt[n] if n < len(prebuilt) else new_events(k, n * k, p.data_bytes)
            store.append(f"bench-conc-{wid}-{s}", evs, versions[s] or NO_STREAM)
            versions[s] += len(evs)
            n += 1

        for _ in range(p.concurrent_warmup_appends):
            one_append()
        results.put(("ready", wid))
        go.wait()
        t_start = start_at.value
        while time.monotonic() < t_start:
            time.sleep(0.0005)
        n0 = n
        end = t_start + p.concurrent_seconds
        lat: list[float] = []
        t_last = time.monotonic()
        while t_last < end:
            t = t_last
            one_append()
            t_last = time.monotonic()
            lat.append(t_last - t)
        store.close()
        pool.close()
        results.put({"wid": wid, "appends": n - n0, "last": t_last, "latencies": lat})
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put(("error", traceback.format_exc()))


def bench_concurrent(ctx: Ctx, db_url: str, p: Params) -> dict[str, Any]:
    results = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_concurrent_writer, args=(db_url, w, p, go, start_at, results), daemon=True)
        for w in range(p.concurrent_writers)
    ]
    try:
        for proc in procs:
            proc.start()
        collect(results, len(procs), procs, 120, "concurrent writers (start)")
        start_at.value = time.monotonic() + 0.2
        go.set()
        t0 = start_at.value
        done = collect(results, len(procs), procs, p.concurrent_seconds + 120, "concurrent writers")
    finally:
        _stop_children(procs)
    appends = sum(d["appends"] for d in done)
    elapsed = max(d["last"] for d in done) - t0
    lat = sorted(x for d in done for x in d["latencies"])
    events = appends * p.concurrent_events_per_append
    return {
        "append_concurrent_events_per_s": round(events / elapsed),
        "append_concurrent_appends_per_s": round(appends / elapsed),
        "append_concurrent_latency_ms": {
            "p50": rnd((percentile(lat, 50) or 0) * 1000, 2),
            "p99": rnd((percentile(lat, 99) or 0) * 1000, 2),
            "max": rnd(lat[-1] * 1000 if lat else None, 2),
        },
        "append_concurrent_per_writer_events": sorted(d["appends"] * p.concurrent_events_per_append for d in done),
    }


# -- phase 3: relay lag --------------------------------------------------------------------


def _relay_writer(
    db_url: str,
    wid: int,
    p: Params,
    go: multiprocessing.synchronize.Event,
    start_at: Any,
    results: Any,
) -> None:
    try:
        pool = open_pool(db_url, scope=TENANT, min_size=1, max_size=1)
        store = EventStore(pool, tenant=TENANT.tenant)
        streams = 100
        versions = [0] * streams
        interval = p.relay_writers * p.relay_events_per_append / p.relay_rate_events_per_s
        # Warm the connection and prepared statements before the clock starts.
        for n in range(10):
            evs = new_events(p.relay_events_per_append, n * p.relay_events_per_append, p.data_bytes)
            store.append(f"bench-relay-warm-{wid}", evs, n * p.relay_events_per_append or NO_STREAM)
        results.put(("ready", wid))
        go.wait()
        t_start = start_at.value + interval * wid / p.relay_writers
        end = start_at.value + p.relay_warmup_s + p.relay_seconds
        commits: list[tuple[bytes, float]] = []
        behind = 0.0
        j = 0
        while True:
            due = t_start + j * interval
            if due >= end:
                break
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            else:
                behind = max(behind, now - due)
            s = j % streams
            evs = new_events(p.relay_events_per_append, j * p.relay_events_per_append, p.data_bytes)
            envs = store.append(f"bench-relay-{wid}-{s}", evs, versions[s] or NO_STREAM)
            t_commit = time.monotonic()
            versions[s] += len(envs)
            commits.extend((env.id.bytes, t_commit) for env in envs)
            j += 1
        store.close()
        pool.close()
        results.put({"wid": wid, "commits": commits, "max_behind_s": behind})
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put(("error", traceback.format_exc()))


def _relay_reader(
    redis_url: str,
    key: str,
    after_id: str,
    stop: multiprocessing.synchronize.Event,
    seen: Any,
    results: Any,
) -> None:
    try:
        r = redis_client(redis_url, socket_timeout=30)
        arrivals: dict[bytes, float] = {}
        last = after_id
        results.put(("ready", -1))
        while not stop.is_set():
            resp: Any = r.xread({key: last}, count=5000, block=200)
            if not resp:
                continue
            t = time.monotonic()
            entries = resp[0][1]
            for _entry_id, fields in entries:
                arrivals[uuid.UUID(orjson.loads(fields[b"event"])["id"]).bytes] = t
            last = entries[-1][0]
            with seen.get_lock():
                seen.value += len(entries)
        r.close()
        results.put({"arrivals": arrivals})
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put(("error", traceback.format_exc()))


def _stream_last(r: Any, key: str) -> int | None:
    """The stream's last generated ID as a position (None when the stream does not exist)."""
    if not r.exists(key):
        return None
    raw = r.xinfo_stream(key)["last-generated-id"]
    return int((raw.decode() if isinstance(raw, bytes) else raw).split("-")[0])


def _start_relay(db_url: str, redis_url: str, prefix: str, home: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        MAILFLOW_DATABASE_URL=db_url,
        MAILFLOW_REDIS_URL=redis_url,
        MAILFLOW_REDIS_PREFIX=prefix,
        MAILFLOW_HOME=str(home),
        MAILFLOW_LOG_LEVEL="warning",
        MAILFLOW_LOG_FORMAT="json",
    )
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "mailflow.cli", "relay"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def _stop_relay(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def bench_relay(
    ctx: Ctx,
    store: EventStore,
    db_url: str,
    redis_url: str,
    settings: Settings,
    p: Params,
    workdir: Path,
    elapsed: dict[str, float],
) -> dict[str, Any]:
    with phase(elapsed, "relay_prepare"):
        store.sync()
        if p.analyze:
            analyze(db_url)
        # The event_counts consumer catches up first, as in a running system, so the relay
        # resumes from its checkpoint instead of republishing a retention window.
        runner = ConsumerRunner(EventCounts(), store, redis_url, settings)
        try:
            runner.ensure_checkpoint()
            runner.catch_up()
        finally:
            runner.close()
    with phase(elapsed, "relay"):
        return _measure_relay(ctx, store, db_url, redis_url, settings, p, workdir)


def _measure_relay(
    ctx: Ctx, store: EventStore, db_url: str, redis_url: str, settings: Settings, p: Params, workdir: Path
) -> dict[str, Any]:
    keys = Keys(settings.redis_prefix)
    r = redis_client(redis_url)
    log_path = workdir / "relay.log"
    relay = _start_relay(db_url, redis_url, settings.redis_prefix, settings.home, log_path)
    results = ctx.Queue()
    go = ctx.Event()
    stop = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    seen = ctx.Value("q", 0)
    writers = [
        ctx.Process(target=_relay_writer, args=(db_url, w, p, go, start_at, results), daemon=True)
        for w in range(p.relay_writers)
    ]
    procs = list(writers)
    try:
        deadline = time.monotonic() + 120
        while r.get(keys.relay_epoch) is None:
            if relay.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-3000:]
                raise RuntimeError(f"the relay did not start (exit code {relay.poll()}); its log:\n{tail}")
            time.sleep(0.05)
        # Start the clock only once the relay follows new events: wait until a marker
        # appended now is in the stream.
        [marker] = store.append("bench-relay-marker", [NewEvent("BenchMarker", {})])
        while True:
            pos = store.get_by_id(marker.id).position
            if pos is not None and (_stream_last(r, keys.events) or 0) >= pos:
                break
            if relay.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the relay did not catch up; its log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        reader = ctx.Process(
            target=_relay_reader, args=(redis_url, keys.events, f"{pos}-0", stop, seen, results), daemon=True
        )
        procs.append(reader)
        for proc in procs:
            proc.start()
        collect(results, len(procs), procs, 120, "relay writers/reader (start)")
        start_at.value = time.monotonic() + 0.2
        go.set()
        measure_from = start_at.value + p.relay_warmup_s
        done = collect(results, len(writers), procs, p.relay_warmup_s + p.relay_seconds + 120, "relay writers")
        commits = {eid: t for d in done for eid, t in d["commits"]}
        # Wait (up to 10 s) for the stream to hold every event (plus the warm-up appends).
        expected = len(commits) + 10 * p.relay_events_per_append * p.relay_writers
        grace = time.monotonic() + 10
        while seen.value < expected and time.monotonic() < grace:
            time.sleep(0.05)
        stop.set()
        arrivals = collect(results, 1, procs, 30, "relay reader")[0]["arrivals"]
        if relay.poll() is not None:
            raise RuntimeError(f"the relay exited early; its log:\n{log_path.read_text()[-3000:]}")
    finally:
        stop.set()
        try:
            _stop_children(procs)
        finally:
            _stop_relay(relay)
            r.close()
    measured = {eid: t for eid, t in commits.items() if t >= measure_from}
    lags = sorted((arrivals[eid] - t) * 1000 for eid, t in measured.items() if eid in arrivals)
    missing = sum(1 for eid in measured if eid not in arrivals)
    span = max(measured.values()) - min(measured.values()) if measured else 0.0
    return {
        "relay_lag_p50_ms": rnd(percentile(lags, 50), 2),
        "relay_lag_p99_ms": rnd(percentile(lags, 99), 2),
        "relay_lag_max_ms": rnd(lags[-1] if lags else None, 2),
        "relay_events_measured": len(lags),
        "relay_events_missing": missing,
        "relay_achieved_events_per_s": round(len(measured) / span) if span else None,
        "relay_writer_max_behind_schedule_ms": rnd(max(d["max_behind_s"] for d in done) * 1000, 2),
    }


# -- phase 4: projection rebuild -----------------------------------------------------------


def bench_rebuild(
    store: EventStore, db_url: str, redis_url: str, settings: Settings, p: Params, elapsed: dict[str, float]
) -> dict[str, Any]:
    with phase(elapsed, "rebuild_load"):
        todo = max(p.rebuild_events - store.sync(), 0)
        loaded, n, streams = 0, 0, 64
        report = max(todo // 5, 1)
        while loaded < todo:
            k = min(p.rebuild_load_batch, todo - loaded)
            store.append(f"bench-rebuild-{n % streams}", new_events(k, loaded, p.data_bytes))
            loaded += k
            n += 1
            if loaded // report != (loaded - k) // report:
                say(f"  loaded {loaded:,} of {todo:,}")
    with phase(elapsed, "rebuild_sequence"):
        if p.analyze:
            analyze(db_url)
        t0 = time.perf_counter()
        head = store.sync()
        seq_seconds = time.perf_counter() - t0
    if p.analyze:
        with phase(elapsed, "rebuild_vacuum"):
            analyze(db_url, vacuum=True)
    runner = ConsumerRunner(EventCounts(), store, redis_url, settings)
    marks = [max(head // 4, 1)]

    def progress(pos: int, upto: int) -> None:
        if pos >= marks[0]:
            say(f"  rebuilt {pos:,} of {upto:,}")
            marks[0] += max(upto // 4, 1)

    try:
        with phase(elapsed, "rebuild"):
            t0 = time.perf_counter()
            applied = runner.rebuild(1, progress)
            seconds = time.perf_counter() - t0
        with runner.conn.transaction():
            counted = scalar(runner.conn, "SELECT coalesce(sum(count), 0) FROM event_counts")
    finally:
        runner.close()
    if int(counted) != head or applied != head:
        raise RuntimeError(f"rebuild applied {applied} and counted {counted} events, expected {head}")
    return {
        "rebuild_events_per_s": round(applied / seconds),
        "rebuild_events": applied,
        # store.sync() over the freshly loaded events: the sequencer's rate, which caps how
        # fast the relay can publish a sustained stream of appends.
        "sequencer_events_per_s": round(todo / seq_seconds) if todo >= 10_000 else None,
    }


# -- orchestration -------------------------------------------------------------------------


def analyze(db_url: str, *, vacuum: bool = False) -> None:
    """Give the planner statistics, as autovacuum does within a minute in a running system."""
    with connect(db_url) as conn:
        conn.execute("VACUUM (ANALYZE)" if vacuum else "ANALYZE")


def run(p: Params, keep: bool) -> dict[str, Any]:
    t_total = time.perf_counter()
    load_start = os.getloadavg()[0]
    mailflow_log.configure(level="warning", stream=sys.stderr)  # stdout is for the result
    elapsed: dict[str, float] = {}
    ctx = mp.get_context("spawn")
    with scratch("bench", keep, elapsed) as sc:
        settings = load_settings(redis_prefix=sc.prefix, database_url=None, redis_url=None)
        out: dict[str, Any] = dict(sc.info)
        pool = open_pool(sc.db_url, scope=TENANT, min_size=1, max_size=2)
        store = EventStore(pool, tenant=TENANT.tenant)
        try:
            if "batched" in p.phases:
                with phase(elapsed, "append_batched"):
                    out.update(bench_batched(store, sc.db_url, p))
            if "concurrent" in p.phases:
                with phase(elapsed, "append_concurrent"):
                    out.update(bench_concurrent(ctx, sc.db_url, p))
            if "relay" in p.phases:
                out.update(bench_relay(ctx, store, sc.db_url, sc.redis_url, settings, p, sc.workdir, elapsed))
            if "rebuild" in p.phases:
                out.update(bench_rebuild(store, sc.db_url, sc.redis_url, settings, p, elapsed))
        finally:
            store.close()
            pool.close()
    notes = {
        "relay_load": (
            f"{p.relay_writers} writer processes, each appending {p.relay_events_per_append} events on a "
            f"fixed schedule, {p.relay_rate_events_per_s} events/s offered in total, into a database "
            f"holding the earlier phases' events{' (ANALYZEd first)' if p.analyze else ''}; lag measured "
            f"on events committed after a {p.relay_warmup_s:g} s warm-up"
        ),
        "comparison": (
            "mailflow EventStore.append(expected_version) vs eventsourcing PostgresApplicationRecorder."
            "insert_events, same database, same batch size, same number of events, same 100-byte JSON "
            "data; alternating rounds after a warm-up; mailflow also stores id, type, schema and metadata"
        ),
        "rebuild": "events loaded, sequenced and (unless --no-analyze) VACUUM ANALYZEd before timing; "
        "every event in the database is rebuilt",
        "machine": "clients and servers share the machine's CPUs; loadavg shows other load during the run",
    }
    return finish(out, GOALS, p, notes, load_start, elapsed, t_total)


def print_table(res: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str]] = []
    for name in (
        "append_batched_events_per_s",
        "eventsourcing_batched_events_per_s",
        "ratio_vs_eventsourcing",
        "append_concurrent_events_per_s",
        "relay_lag_p50_ms",
        "relay_lag_p99_ms",
        "relay_lag_max_ms",
        "rebuild_events_per_s",
    ):
        if name not in res:
            continue
        value = res[name]
        shown = f"{value:,}" if isinstance(value, int) else f"{value}"
        goal = res["goals"].get(name)
        rows.append((name, shown, goal["goal"] if goal else "", "" if not goal else "ok" if goal["met"] else "MISSED"))
    width = [max(len(r[i]) for r in rows + [("metric", "value", "goal", "")]) for i in range(4)]
    print(
        f"mailflow event log benchmark ({res['services']} services: "
        f"PostgreSQL {res['postgres_version']}, Redis {res['redis_version']})"
    )
    print(f"{'metric':<{width[0]}}  {'value':>{width[1]}}  {'goal':<{width[2]}}")
    for r in rows:
        print(f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:<{width[2]}}  {r[3]}")
    print("elapsed: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["elapsed_s"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="small sizes and short phases (a smoke run)")
    ap.add_argument(
        "--rebuild-events",
        type=int,
        default=None,
        metavar="N",
        help="events in the rebuild (default 1,000,000; 50,000 with --quick)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the benchmark database and Redis keys")
    ap.add_argument(
        "--no-analyze",
        action="store_true",
        help="do not ANALYZE before the relay and rebuild phases (a fresh database, before autovacuum)",
    )
    ap.add_argument("--phases", default=None, help=f"comma-separated subset of {','.join(PHASES)} (run in that order)")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the relay, the database and the Redis keys are cleaned up.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    p = Params.quick() if args.quick else Params()
    if args.rebuild_events is not None:
        if args.rebuild_events < 1:
            ap.error("--rebuild-events must be at least 1")
        p.rebuild_events = args.rebuild_events
    p.analyze = not args.no_analyze
    if args.phases:
        chosen = [x.strip() for x in args.phases.split(",") if x.strip()]
        unknown = set(chosen) - set(PHASES)
        if unknown:
            ap.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
        p.phases = chosen
    res = run(p, args.keep)
    if args.json:
        sys.stdout.write(orjson.dumps(res).decode() + "\n")
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
