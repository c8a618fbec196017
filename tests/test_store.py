"""Event store: optimistic concurrency, idempotency, reads, and global order without skips."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from mailflow.errors import ConcurrencyError, DuplicateEventError, InvalidEventError, NotFoundError
from mailflow.events import ANY, NO_STREAM, EventStore, Metadata, NewEvent
from mailflow.infra.services import connect, open_pool
from mailflow.infra.tenancy import Scope

pytestmark = pytest.mark.integration


def ev(t: str = "ThingHappened", **data) -> NewEvent:
    return NewEvent(t, data or {"n": 1})


def test_append_assigns_consecutive_versions_and_reads_back_the_stream(store: EventStore):
    out = store.append("order-1", [ev(n=1), ev(n=2)], expected_version=NO_STREAM)
    assert [e.version for e in out] == [1, 2]
    out2 = store.append("order-1", [ev(n=3)], expected_version=2)
    assert out2[0].version == 3
    read = store.read_stream("order-1")
    assert [e.data["n"] for e in read] == [1, 2, 3]
    assert store.stream_version("order-1") == 3


def test_stale_expected_version_is_rejected_and_writes_nothing(store: EventStore, db_url: str):
    store.append("acct-7", [ev(n=1), ev(n=2)])
    with pytest.raises(ConcurrencyError) as info:
        store.append("acct-7", [ev(n=10), ev(n=11), ev(n=12)], expected_version=1)
    msg = str(info.value)
    assert "acct-7" in msg and "expected version 1" in msg and "version 2" in msg
    assert (info.value.expected, info.value.actual) == (1, 2)
    with connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 2
        assert conn.execute("SELECT version FROM streams WHERE stream='default/acct-7'").fetchone()[0] == 2


def test_no_stream_expectation_fails_when_the_stream_exists(store: EventStore):
    store.append("s", [ev()])
    with pytest.raises(ConcurrencyError):
        store.append("s", [ev()], expected_version=NO_STREAM)


def test_expected_version_on_a_missing_stream_is_a_conflict(store: EventStore):
    with pytest.raises(ConcurrencyError) as info:
        store.append("ghost", [ev()], expected_version=3)
    assert info.value.actual == 0


def test_retrying_an_append_with_the_same_event_ids_writes_nothing_twice(store: EventStore, db_url: str):
    batch = [ev(n=1), ev(n=2)]
    first = store.append("idem", batch, expected_version=NO_STREAM)
    again = store.append("idem", batch, expected_version=NO_STREAM)
    assert [e.id for e in again] == [e.id for e in first]
    assert [e.version for e in again] == [1, 2]
    store.append("idem", batch)  # ANY: also a no-op
    with connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 2


def test_reusing_an_event_id_for_different_events_is_refused(store: EventStore):
    e = ev()
    store.append("a", [e])
    with pytest.raises(DuplicateEventError):
        store.append("b", [NewEvent("Other", {}, id=e.id)])
    with pytest.raises(DuplicateEventError):
        store.append("a", [NewEvent("Other", {}, id=e.id), ev()])


def test_positions_are_dense_and_follow_commit_order(store: EventStore):
    for i in range(5):
        store.append(f"s-{i}", [ev(n=i), ev(n=i)])
    assert store.sync() == 10
    envs = store.read_all(0, 100)
    assert [e.position for e in envs] == list(range(1, 11))
    assert store.get(4).position == 4
    with pytest.raises(NotFoundError):
        store.get(11)


def test_envelope_carries_metadata_and_defaults(store: EventStore):
    md = Metadata(correlation_id="c-1", causation_id="x-9", tenant="default", actor="ops@test")
    [env] = store.append("m", [NewEvent("T", {"k": "v"}, metadata=md)])
    assert env.stream == "default/m"  # a stream is named under its tenant
    [read] = store.read_stream("m")
    assert read.metadata == md
    [env2] = store.append("m", [NewEvent("T", {})])
    assert env2.metadata.correlation_id == str(env2.id)  # a new conversation starts at itself
    assert env2.metadata.actor  # who did it is always recorded
    assert env2.metadata.tenant == "default"  # the store's tenant, when the event names none
    d = read.to_dict()
    assert set(d) == {"id", "position", "stream", "version", "type", "schema", "data", "metadata", "recorded_at"}
    assert d["recorded_at"].endswith("Z")


@pytest.mark.parametrize(
    "stream,events,match",
    [
        ("", [NewEvent("T", {})], "stream name"),
        ("s", [NewEvent("", {})], "event type"),
        ("s", [NewEvent("T", [1, 2])], "JSON object"),  # type: ignore[arg-type]
        ("s", [NewEvent("T", {"when": object()})], "JSON-serialisable"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error_and_writes_nothing(store, db_url, stream, events, match):
    with pytest.raises(InvalidEventError, match=match):
        store.append(stream, events)
    with connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_an_open_transaction_holds_back_positions_until_it_commits(store: EventStore, db_url: str):
    """Invariant 2: a late commit never lands behind a position a reader has passed."""
    slow = connect(db_url, autocommit=False)
    try:
        slow.execute(
            "INSERT INTO events (id, stream, version, type, schema, data, metadata) "
            "VALUES (%s, 'default/slow', 1, 'Late', 1, '{}', '{\"tenant\": \"default\"}')",
            (uuid.uuid4(),),
        )
        store.append("fast", [ev(), ev()])  # commits after slow began, before it commits
        store.sequence(wait=True)
        assert store.head() == 0  # the horizon is held back by the open transaction
        assert store.has_unsequenced()
        slow.commit()
        store.sync()
        types = [e.type for e in store.read_all(0, 10)]
        assert types == ["Late", "ThingHappened", "ThingHappened"]
    finally:
        slow.close()


def test_sixteen_writers_and_a_tailing_reader_see_every_event_once_in_order(store: EventStore, db_url: str):
    writers, appends_each = 16, 40
    stop = threading.Event()
    seen: list[int] = []
    seen_ids: list[uuid.UUID] = []
    written: list[uuid.UUID] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        pool = open_pool(db_url, scope=Scope.of("default"), max_size=1)
        w = EventStore(pool, tenant="default")
        try:
            for j in range(appends_each):
                batch = [ev(k=k, j=j, i=i) for i in range(3)]
                w.append(f"w{k}-{j % 5}", batch)
                with lock:
                    written.extend(e.id for e in batch)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            w.close()
            pool.close()

    def reader() -> None:
        after = 0
        while True:
            store.sequence()
            batch = store.read_all(after, 500)
            for e in batch:
                seen.append(e.position or 0)
                seen_ids.append(e.id)
            if batch:
                after = batch[-1].position or after
            elif stop.is_set():
                store.sync()
                if store.head() == after:
                    return
            else:
                time.sleep(0.001)

    r = threading.Thread(target=reader)
    r.start()
    ts = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    r.join(60)
    assert not errors
    total = writers * appends_each * 3
    assert seen == list(range(1, total + 1)), "positions seen out of order, skipped or twice"
    assert sorted(seen_ids) == sorted(written)


def test_concurrent_appends_to_one_stream_with_any_version_never_collide(store: EventStore):
    def w(k: int):
        for j in range(20):
            store.append("shared", [ev(k=k, j=j)], expected_version=ANY)

    ts = [threading.Thread(target=w, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert [e.version for e in store.read_stream("shared")] == list(range(1, 161))


def test_only_one_of_two_racing_writers_with_the_same_expectation_wins(store: EventStore):
    store.append("race", [ev()])
    barrier = threading.Barrier(8)
    results: list[str] = []

    def w():
        barrier.wait()
        try:
            store.append("race", [ev()], expected_version=1)
            results.append("ok")
        except ConcurrencyError:
            results.append("conflict")

    ts = [threading.Thread(target=w) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results.count("ok") == 1 and results.count("conflict") == 7
    assert store.stream_version("race") == 2


def test_retrying_with_the_same_id_but_different_content_is_refused(store: EventStore):
    e = NewEvent("Priced", {"amount": 10})
    store.append("p", [e])
    with pytest.raises(DuplicateEventError, match="other content"):
        store.append("p", [NewEvent("Priced", {"amount": 99}, id=e.id)])
    assert [x.data for x in store.read_stream("p")] == [{"amount": 10}]


def test_append_many_writes_many_streams_in_one_commit_with_per_stream_versions(store: EventStore, db_url: str):
    store.append("job-1", [ev(n=0)])
    out = store.append_many([("job-1", ev(n=1)), ("job-2", ev(n=2)), ("job-1", ev(n=3)), ("job-3", ev(n=4))])
    assert [(e.stream, e.version) for e in out] == [
        ("default/job-1", 2),
        ("default/job-2", 1),
        ("default/job-1", 3),
        ("default/job-3", 1),
    ]
    assert [e.data["n"] for e in store.read_stream("job-1")] == [0, 1, 3]
    store.sync()
    assert [e.data["n"] for e in store.read_all(0, 10)] == [0, 1, 2, 3, 4]


def test_append_many_inside_a_caller_transaction_rolls_back_with_it(store: EventStore, db_url: str):
    conn = connect(db_url)
    try:
        with pytest.raises(RuntimeError), conn.transaction():
            store.append_many([("a", ev()), ("b", ev())], conn=conn)
            raise RuntimeError("the caller's work failed")
        with conn.transaction():
            store.append_many([("a", ev())], conn=conn)
        store.notify()
    finally:
        conn.close()
    assert store.sync() == 1
    assert [e.version for e in store.read_stream("a")] == [1]


def test_large_appends_keep_every_guarantee_of_small_ones(store: EventStore, db_url: str):
    """Appends of >= COPY_THRESHOLD events take the COPY path: same versions, checks and idempotency."""
    from mailflow.events.store import COPY_THRESHOLD

    n = COPY_THRESHOLD + 50
    batch = [ev(i=i) for i in range(n)]
    out = store.append("big", batch, expected_version=NO_STREAM)
    assert [e.version for e in out] == list(range(1, n + 1))
    assert [e.id for e in store.append("big", batch, expected_version=NO_STREAM)] == [e.id for e in batch]
    assert [e.id for e in store.append("big", batch)] == [e.id for e in batch]
    with pytest.raises(ConcurrencyError):
        store.append("big", [ev() for _ in range(n)], expected_version=3)
    with pytest.raises(DuplicateEventError):
        store.append("other", [*[ev() for _ in range(n)], NewEvent("X", {}, id=batch[0].id)])
    more = store.append("big", [ev() for _ in range(n)], expected_version=n)
    assert more[0].version == n + 1
    with connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 2 * n
    assert store.sync() == 2 * n
    assert [e.version for e in store.read_stream("big")] == list(range(1, 2 * n + 1))
