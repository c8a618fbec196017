"""Consumer runtime and relay, in process: exactly-once application, gaps, poison, rebuild."""

from __future__ import annotations

import threading

import pytest

from mailflow.consumers import ConsumerRunner, Projection
from mailflow.events import EventStore, NewEvent
from mailflow.events.relay import Relay
from mailflow.infra.services import connect, redis_client
from mailflow.projectors.event_counts import EventCounts

from .conftest import wait_until

pytestmark = pytest.mark.integration

TRUTH = """
SELECT type, date_trunc('hour', recorded_at, 'UTC') AS hour, count(*)
FROM events e JOIN event_positions p USING (seq)
WHERE p.position <= %s {extra}
GROUP BY 1, 2 ORDER BY 1, 2
"""


def counts(db_url: str) -> list[tuple]:
    with connect(db_url) as c:
        return c.execute("SELECT type, hour, count FROM event_counts WHERE count > 0 ORDER BY 1, 2").fetchall()


def truth(db_url: str, upto: int = 2**62, exclude_types: tuple[str, ...] = ()) -> list[tuple]:
    extra = "AND type <> ALL(%s)" if exclude_types else ""
    params = (upto, list(exclude_types)) if exclude_types else (upto,)
    with connect(db_url) as c:
        return c.execute(TRUTH.format(extra=extra), params).fetchall()


def fill(store: EventStore, n: int, types=("Sent", "Opened", "Bounced")) -> None:
    for i in range(0, n, 50):
        store.append(f"s-{i}", [NewEvent(types[(i + k) % len(types)], {"i": i + k}) for k in range(min(50, n - i))])
    store.sync()


def entries_for(store: EventStore, after: int, limit: int):
    return [(f"{e.position}-0".encode(), {b"event": e.to_json()}) for e in store.read_all(after, limit)]


def test_catch_up_from_postgres_applies_every_event_once(rt, store, settings, db_url):
    fill(store, 730)
    runner = ConsumerRunner(EventCounts(), store, rt.services.redis_url, settings)
    runner.ensure_checkpoint()
    assert runner.catch_up() == 730
    assert runner.catch_up() == 0
    assert counts(db_url) == truth(db_url)
    assert runner.checkpoint() == 730
    runner.close()


def test_entries_at_or_below_the_checkpoint_are_skipped_and_holes_are_filled_from_postgres(rt, store, settings, db_url):
    fill(store, 100)
    runner = ConsumerRunner(EventCounts(), store, rt.services.redis_url, settings)
    runner.ensure_checkpoint()
    runner._ensure_group()
    # Redis delivers 41..60 first: 1..40 must come from PostgreSQL, in the same transaction.
    runner.handle_entries(entries_for(store, 40, 20))
    assert runner.checkpoint() == 60
    assert counts(db_url) == truth(db_url, upto=60)
    # The same entries again (a redelivery) change nothing.
    runner.handle_entries(entries_for(store, 0, 60))
    assert counts(db_url) == truth(db_url, upto=60)
    runner.close()


class FailsOn(Projection):
    """event_counts, but a given type raises - a stand-in for a projection bug."""

    name = "event_counts"

    def __init__(self, bad_type: str, fail_times: int = 10**9) -> None:
        self.inner = EventCounts()
        self.bad_type = bad_type
        self.fail_times = fail_times
        self.calls = 0

    def apply(self, conn, events):
        if any(e.type == self.bad_type for e in events) and self.calls < self.fail_times:
            self.calls += 1
            raise ValueError(f"cannot count {self.bad_type}")
        self.inner.apply(conn, events)

    def reset(self, conn, from_position, applied_upto):
        self.inner.reset(conn, from_position, applied_upto)


def test_a_poison_event_is_dead_lettered_after_max_attempts_and_the_rest_is_applied(rt, store, settings, db_url):
    fill(store, 40)
    store.append("p", [NewEvent("Poison", {"x": 1})])
    fill(store, 40)
    runner = ConsumerRunner(FailsOn("Poison"), store, rt.services.redis_url, settings)
    runner.ensure_checkpoint()
    runner.catch_up()
    assert runner.checkpoint() == 81
    assert counts(db_url) == truth(db_url, exclude_types=("Poison",))
    with connect(db_url) as c:
        dl = c.execute("SELECT position, event_type, attempts, error, status FROM dead_letters").fetchall()
        assert c.execute("SELECT count(*) FROM consumer_failures").fetchone()[0] == 0
    assert dl == [(41, "Poison", settings.consumer_max_attempts, "ValueError: cannot count Poison", "open")]
    r = redis_client(rt.services.redis_url)
    [(_, fields)] = r.xrange(rt.keys.dlq("event_counts"))
    assert fields[b"position"] == b"41" and b"cannot count Poison" in fields[b"error"]
    runner.close()


def test_a_transient_failure_is_retried_and_not_dead_lettered(rt, store, settings, db_url):
    fill(store, 10)
    store.append("p", [NewEvent("Flaky", {})])
    store.sync()
    runner = ConsumerRunner(FailsOn("Flaky", fail_times=2), store, rt.services.redis_url, settings)
    runner.ensure_checkpoint()
    runner.catch_up()
    assert counts(db_url) == truth(db_url)
    with connect(db_url) as c:
        assert c.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM consumer_failures").fetchone()[0] == 0
    runner.close()


def test_rebuild_from_a_position_gives_the_same_result_as_from_scratch(rt, store, settings, db_url):
    fill(store, 300, types=("A", "B"))
    runner = ConsumerRunner(EventCounts(), store, rt.services.redis_url, settings)
    runner.ensure_checkpoint()
    runner.catch_up()
    before = counts(db_url)
    assert runner.rebuild(from_position=151) == 150
    assert counts(db_url) == before == truth(db_url)
    assert runner.rebuild() == 300
    assert counts(db_url) == before
    runner.close()


def test_two_runners_of_one_projection_never_apply_an_event_twice(rt, store, settings, db_url):
    fill(store, 1200)
    runners = [
        ConsumerRunner(EventCounts(), store, rt.services.redis_url, settings, consumer_id=f"c{i}") for i in range(2)
    ]
    for r in runners:
        r.ensure_checkpoint()
    ts = [threading.Thread(target=r.catch_up) for r in runners]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert counts(db_url) == truth(db_url)
    for r in runners:
        r.close()


def test_relay_publishes_every_event_with_its_position_as_entry_id(rt, store, settings):
    stop = threading.Event()
    relay = Relay(store, rt.services.redis_url, settings)
    t = threading.Thread(target=relay.run, args=(stop,))
    t.start()
    try:
        wait_until(relay.is_leader.is_set, what="relay leadership")
        fill(store, 500)
        r = redis_client(rt.services.redis_url)
        wait_until(lambda: r.xlen(rt.keys.events) == 500, what="500 entries in Redis")
        entries = r.xrange(rt.keys.events)
        assert [e[0] for e in entries] == [f"{i}-0".encode() for i in range(1, 501)]
        assert all(f[b"position"] == eid.split(b"-")[0] for eid, f in entries)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def test_a_restarted_relay_continues_after_the_last_entry_without_duplicates(rt, store, settings):
    r = redis_client(rt.services.redis_url)
    fill(store, 100)
    for round_ in range(2):
        stop = threading.Event()
        relay = Relay(store, rt.services.redis_url, settings)
        t = threading.Thread(target=relay.run, args=(stop,))
        t.start()
        try:
            wait_until(lambda: r.xlen(rt.keys.events) == 100 * (round_ + 1), what="entries")
        finally:
            stop.set()
            t.join(10)
        fill(store, 100)
    relay = Relay(store, rt.services.redis_url, settings)
    stop = threading.Event()
    t = threading.Thread(target=relay.run, args=(stop,))
    t.start()
    try:
        wait_until(lambda: r.xlen(rt.keys.events) == 300, what="entries")
    finally:
        stop.set()
        t.join(10)
    ids = [int(e[0].split(b"-")[0]) for e in r.xrange(rt.keys.events)]
    assert ids == list(range(1, 301))


def test_republishing_a_batch_after_a_crash_is_rejected_by_redis_and_duplicates_nothing(rt, store, settings):
    fill(store, 50)
    r = redis_client(rt.services.redis_url)
    relay = Relay(store, rt.services.redis_url, settings)
    batch = store.read_all(0, 50)
    relay._publish(r, batch[:30])  # the crash: only part of the batch got out
    relay._publish(r, batch)  # the restarted leader publishes the whole batch again
    ids = [int(e[0].split(b"-")[0]) for e in r.xrange(rt.keys.events)]
    assert ids == list(range(1, 51))


def test_consumer_log_lines_are_json_with_position_and_correlation_id(rt, store, settings):
    import io
    import json

    from mailflow import log as mflog
    from mailflow.events import Metadata

    buf = io.StringIO()
    mflog.configure("info", "auto", stream=buf)  # not a terminal -> JSON lines
    try:
        store.append("p", [NewEvent("Poison", {}, metadata=Metadata(correlation_id="corr-42"))])
        store.sync()
        runner = ConsumerRunner(FailsOn("Poison"), store, rt.services.redis_url, settings)
        runner.ensure_checkpoint()
        runner.catch_up()
        runner.close()
    finally:
        mflog.configure("warning", "console")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    working = [x for x in lines if x["event"] in ("consumer.apply_failed", "consumer.dead_lettered")]
    assert len(working) == settings.consumer_max_attempts + 1
    assert all(x["position"] == 1 and x["correlation_id"] == "corr-42" for x in working)
    assert all(x["consumer"] == "event_counts" for x in working)


def test_a_malformed_stream_entry_is_recorded_acknowledged_and_cannot_be_retried(rt, store, settings, db_url):
    from mailflow.consumers.dlq import DeadLetters
    from mailflow.errors import MailflowError
    from mailflow.projectors import get as get_projection

    fill(store, 5)
    runner = ConsumerRunner(EventCounts(), store, rt.services.redis_url, settings)
    runner.ensure_checkpoint()
    runner._ensure_group()
    good = entries_for(store, 0, 5)
    runner.handle_entries([good[0], (b"2-0", {b"event": b"{not json"}), *good[1:]])
    assert counts(db_url) == truth(db_url)  # position 2 came from PostgreSQL instead
    with connect(db_url) as conn:
        dl = DeadLetters(conn, store, redis_client(rt.services.redis_url), rt.keys)
        [letter] = dl.list()
        assert (letter.entry_id, letter.position) == ("2-0", None)
        assert "malformed event envelope JSON" in letter.error
        with pytest.raises(MailflowError, match="drop it"):
            dl.retry(letter, get_projection)
        dl.drop(letter)
        assert dl.list() == []
    assert redis_client(rt.services.redis_url).xlen(rt.keys.dlq("event_counts")) == 0


def test_envelopes_read_from_redis_are_upcast_like_those_read_from_postgres(rt, settings):
    from mailflow.events import Event, EventRegistry

    reg = EventRegistry()

    class Renamed(Event):
        schema_version = 2
        new_name: str

    reg.register(Renamed)
    reg.upcaster("Renamed", 1)(lambda d: {"new_name": d["old_name"]})
    old_store = EventStore(rt.pool, registry=EventRegistry(), tenant="default")
    old_store.append("r", [NewEvent("Renamed", {"old_name": "x"}, schema=1)])
    old_store.sync()
    raw = old_store.read_all(0, 1)[0]
    assert raw.schema == 1
    seen = []

    class Spy(EventCounts):
        def apply(self, conn, events):
            seen.extend((e.schema, e.data) for e in events)
            super().apply(conn, events)

    store = EventStore(rt.pool, registry=reg, tenant="default")
    runner = ConsumerRunner(Spy(), store, rt.services.redis_url, settings)
    runner.ensure_checkpoint()
    runner.handle_entries([(b"1-0", {b"event": raw.to_json()})])
    assert seen == [(2, {"new_name": "x"})]
    runner.close()
    store.close()
    old_store.close()


def test_a_relay_that_lost_its_stream_republishes_from_the_oldest_checkpoint_a_consumer_needs(rt, store, settings, db):
    from mailflow.consumers.runtime import retention_floor

    fill(store, 100)
    assert retention_floor(db) is None  # no consumer yet
    for name, position in (("slow", 60), ("fast", 90)):
        db.execute("INSERT INTO consumer_checkpoints (consumer, position) VALUES (%s, %s)", (name, position))
    assert retention_floor(db) == 60
    stop = threading.Event()
    relay = Relay(store, rt.services.redis_url, settings, retention_floor=retention_floor)
    t = threading.Thread(target=relay.run, args=(stop,))
    t.start()
    try:
        r = redis_client(rt.services.redis_url)
        wait_until(lambda: r.xlen(rt.keys.events) == 40, what="positions 61..100 in Redis")
        assert [int(e[0].split(b"-")[0]) for e in r.xrange(rt.keys.events)] == list(range(61, 101))
        assert relay.stats.republished_from == 60
    finally:
        stop.set()
        t.join(10)


def test_dead_letters_are_read_by_column_name_whatever_order_the_query_lists_them_in(rt, store, db, monkeypatch):
    from mailflow.consumers import dlq
    from mailflow.consumers import queries as q

    event_id = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    db.execute(
        "INSERT INTO dead_letters (consumer, position, event_id, event_type, attempts, error) "
        "VALUES ('event_counts', 7, %s, 'Sent', 3, 'boom')",
        (event_id,),
    )
    reordered = q.LIST_DEAD_LETTERS.replace(
        "SELECT id, consumer, position, event_id, event_type, attempts, error, status, created_at, resolved_at,\n       entry_id",
        "SELECT entry_id, error, resolved_at, status, attempts, created_at, event_type, event_id, position, consumer, id",
    )
    assert reordered != q.LIST_DEAD_LETTERS
    monkeypatch.setattr(q, "LIST_DEAD_LETTERS", reordered)
    [letter] = dlq.DeadLetters(db, store, redis_client(rt.services.redis_url), rt.keys).list()
    assert (letter.consumer, letter.position, letter.event_id, letter.event_type) == (
        "event_counts",
        7,
        event_id,
        "Sent",
    )
    assert (letter.attempts, letter.error, letter.status, letter.entry_id, letter.resolved_at) == (
        3,
        "boom",
        "open",
        None,
        None,
    )
    assert letter.to_dict()["created_at"].startswith(str(letter.created_at.year))
