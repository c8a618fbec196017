"""Analytics on real PostgreSQL: facts from events, hourly aggregates equal to a from-scratch
recomputation whatever the order, duplication and lateness of the events, roll-ups, reads that
are never stale, partitions and retention, tenants apart."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mailflow.consumers.runtime import ConsumerRunner
from mailflow.events.envelope import Envelope, Metadata
from mailflow.infra.services import connect, pool_conninfo
from mailflow.infra.tenancy import Scope
from mailflow.projectors import analytics
from mailflow.projectors.facts import Facts

from .history import by_position, recorded

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
FILLING = (NOW - timedelta(hours=24)).replace(minute=0, second=0, microsecond=0)  # hours from here on: not over
DIMS = {
    "tenant": ["acme", "rival"],
    "campaign": [None, str(uuid.UUID(int=1)), str(uuid.UUID(int=2))],
    "sender": ["news", "billing"],
    "domain": ["example.com", "example.net"],
}
# Kinds by event, as docs/events.md defines them: what the reference below counts.
KIND_OF = {
    "JobStarted": "sent",
    "JobCompleted": "delivered",
    "JobRetryScheduled": "deferred",
    "MessageOpened": "opened",
    "LinkClicked": "clicked",
}


def envelope(position: int, etype: str, data: dict[str, Any], tenant: str, at: datetime) -> Envelope:
    return Envelope(uuid.uuid4(), position, f"{tenant}/job-x", 1, etype, 1, data, Metadata(tenant=tenant), at)


@st.composite
def histories(draw: st.DrawFn) -> list[Envelope]:
    """Jobs created in log order, each followed by events of random kinds whose times are in
    any order (a DSN recorded days after the message, opens before a retry's delivery ...)."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    jobs = draw(st.integers(1, 6))
    pending: list[tuple[str, dict[str, Any], str]] = []
    events: list[Envelope] = []
    position = 0
    for _ in range(jobs):
        job = str(uuid.uuid4())
        tenant = rnd.choice(DIMS["tenant"])
        data = {
            "job_id": job,
            "idempotency_key": job,
            "priority": "normal",
            "subject": "s",
            "sealed": "x",
            "sender": rnd.choice(DIMS["sender"]),
            "template": "t",
            "domain": rnd.choice(DIMS["domain"]),
            "campaign_id": rnd.choice(DIMS["campaign"]),
        }
        position += 1
        events.append(envelope(position, "JobCreated", data, tenant, NOW - timedelta(hours=80)))
        for _ in range(draw(st.integers(0, 8))):
            etype = rnd.choice(
                ["JobStarted", "JobCompleted", "JobRetryScheduled", "FeedbackReceived", "MessageOpened", "LinkClicked"]
            )
            data: dict[str, Any] = {"job_id": job}
            if etype in ("JobStarted", "JobRetryScheduled"):
                data["attempt"] = rnd.choice([1, 1, 2])
            if etype == "JobCompleted":
                data.update(attempt=1, code=250, reply="ok", size=rnd.choice([None, 1200]))
            if etype == "FeedbackReceived":
                data.update(kind=rnd.choice(["bounce", "complaint", "reply", "auto_reply"]), hard=rnd.random() < 0.5)
            if etype in ("MessageOpened", "LinkClicked"):
                data["machine"] = rnd.random() < 0.3
            if etype == "LinkClicked":
                data["link"] = rnd.choice([0, 1])
            pending.append((etype, data, tenant))
    rnd.shuffle(pending)  # jobs' later events interleave in the log
    for etype, data, tenant in pending:
        position += 1
        at = NOW - timedelta(minutes=rnd.randrange(0, 72 * 60))  # the current hour included
        events.append(envelope(position, etype, data, tenant, at))
    return events


def reference(events: list[Envelope], per_minute: bool = False) -> Counter:
    """(hour, tenant, campaign, sender, domain, kind, measure) -> count, from the events alone
    (per minute: the minute instead of the hour)."""
    jobs = {e.data["job_id"]: e for e in events if e.type == "JobCreated"}
    out: Counter = Counter()
    firsts: set[tuple[str, str, int]] = set()
    for e in sorted(events, key=lambda e: e.position):
        if e.type == "JobCreated":
            continue
        d, j = e.data, jobs[e.data["job_id"]].data
        kind = KIND_OF.get(e.type)
        if e.type == "FeedbackReceived":
            kind = {"bounce": "bounced_hard" if d["hard"] else "bounced_soft", "complaint": "complained"}.get(
                d["kind"], {"reply": "replied", "auto_reply": "auto_replied"}.get(d["kind"])
            )
        assert kind is not None
        key = (
            e.recorded_at.replace(second=0, microsecond=0)
            if per_minute
            else e.recorded_at.replace(minute=0, second=0, microsecond=0),
            e.metadata.tenant,
            j["campaign_id"] or "",
            j["sender"],
            j["domain"],
            kind,
        )
        human = not d.get("machine", False)
        out[(*key, "n")] += 1
        out[(*key, "human")] += human
        if e.type in ("JobStarted", "JobRetryScheduled"):
            unique = d["attempt"] == 1
        elif e.type in ("JobCompleted",):
            unique = True
        else:
            once = (d["job_id"], kind, d.get("link", -1))
            unique = human and once not in firsts
            if human:
                firsts.add(once)
        out[(*key, "uniq")] += unique
    return +out


def minutes(conn, since: datetime) -> Counter:
    """What facts_minutes holds from `since` on: (minute, tenant, kind, measure) -> count."""
    out: Counter = Counter()
    for minute, tenant, kind, n, human, uniq in conn.execute(
        "SELECT minute, tenant, kind, n, n_human, n_unique FROM facts_minutes WHERE minute >= %s", (since,)
    ):
        out.update({(minute, tenant, kind, "n"): n, (minute, tenant, kind, "human"): human})
        out[(minute, tenant, kind, "uniq")] += uniq
    return +out


def stored(conn, table: str = "facts_hourly", bucket: str = "hour") -> Counter:
    out: Counter = Counter()
    rows = conn.execute(
        f"SELECT {bucket}, tenant, campaign, sender, domain, kind, n, n_human, n_unique FROM {table}"
    ).fetchall()
    for b, *key, n, human, uniq in rows:
        out[(b, *key, "n")] += n
        out[(b, *key, "human")] += human
        out[(b, *key, "uniq")] += uniq
    return +out


def read(conn, by: str = "hour", group: str = "", **only: str) -> Counter:
    """What a reader gets: the narrow roll-ups for one dimension, the fine tables for two filters."""
    window = analytics.Filter(NOW - timedelta(days=5), NOW + timedelta(hours=1), **only)  # type: ignore[arg-type]
    rows = analytics.series(conn, window, by=by, group=group)  # type: ignore[arg-type]
    # A dashboard snapshot's reads share the dirty hours' raw facts: the same rows.
    shared = analytics.dirty_facts(conn, window.since, window.until)
    for per_bucket in (True, False):
        alone = analytics.series(conn, window, by=by, group=group, per_bucket=per_bucket)  # type: ignore[arg-type]
        with_shared = analytics.series(conn, window, by=by, group=group, per_bucket=per_bucket, dirty=shared)  # type: ignore[arg-type]
        assert measures(with_shared) == measures(alone)
    out: Counter = Counter()
    for r in rows:
        key = r["key"] if group else ""  # a filter's rows may carry its value as their key
        out[(r["bucket"], key, r["kind"], "n")] += r["n"]
        out[(r["bucket"], key, r["kind"], "uniq")] += r["uniq"]
    return +out


def measures(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("bucket", "key", "kind", "n", "human", "uniq", "latency_ms_sum", "latency_n")
    return sorted((tuple(r[k] for k in keys) for r in rows), key=lambda t: (t[0] is not None, t[0] or 0, t[1:]))


DIM = {"campaign": 2, "sender": 3, "domain": 4}


def coarsen(c: Counter, unit: str, group: str = "", **only: str) -> Counter:
    """Reference counts summed per bucket, group key (or '') and kind, for the facts of `only`."""
    out: Counter = Counter()
    for key, n in c.items():
        hour, kind, measure = key[0], key[5], key[6]
        if measure == "human" or any(key[DIM[d]] != v for d, v in only.items()):
            continue
        b = hour if unit == "hour" else hour.replace(hour=0)
        out[(b, key[DIM[group]] if group else "", kind, measure)] += n
    return +out


@pytest.fixture
def op(operator_rt):
    """An operator's connection, as the consumer and the aggregation duty have."""
    with connect(pool_conninfo(operator_rt.store.pool), scope=Scope.operator()) as conn:
        yield conn


def created(job: str, sender: str = "news", domain: str = "example.org") -> dict[str, Any]:
    """A JobCreated's data: what the job's facts are counted under."""
    return {
        "job_id": job,
        "idempotency_key": job,
        "priority": "high",
        "subject": "s",
        "sealed": "x",
        "sender": sender,
        "template": "t",
        "domain": domain,
    }


def wipe(conn) -> None:
    for t in (
        "facts",
        "fact_jobs",
        "fact_firsts",
        "facts_dirty",
        "facts_hourly",
        "facts_daily",
        "facts_monthly",
        "facts_hourly_cube",
        "facts_daily_cube",
        "facts_minutes",
        "facts_monthly_cube",
    ):
        conn.execute(f"DELETE FROM {t}")


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=histories(), plan=st.randoms(use_true_random=False))
def test_aggregates_equal_a_from_scratch_recomputation_for_late_duplicated_and_out_of_order_events(
    db, op, operator_store, events, plan
):
    wipe(db)
    facts = Facts()
    connect_op = _connector(op)
    order = recorded(operator_store, sorted(events, key=lambda e: e.position))
    applied: list[list[Envelope]] = []
    i = 0
    while i < len(order):
        n = plan.randint(1, 5)
        batch = order[i : i + n]
        with op.transaction():
            facts.apply(op, batch)
        applied.append(batch)
        i += n
        if plan.random() < 0.3:  # the consumer is handed a batch it had applied already
            with op.transaction():
                facts.apply(op, plan.choice(applied))
        if plan.random() < 0.4:  # the job runs between events: later ones are late for it, and
            # the last day's hours are still filling (roll-ups up to a watermark, then raw facts)
            analytics.aggregate(connect_op, before=NOW + timedelta(days=1), ended_before=FILLING)
    expected = reference(order)
    # Readers are right before the last aggregation (dirty hours come from the raw facts) ...
    assert read(op) == coarsen(expected, "hour")
    assert read(op, "day") == coarsen(expected, "day")
    analytics.aggregate(connect_op, before=NOW + timedelta(days=1), ended_before=FILLING)
    # ... and after it, when every hour is clean or still filling with a watermark at its last
    # fact, and the aggregates are the whole truth.
    left = db.execute("SELECT hour, upto, high FROM facts_dirty").fetchall()
    assert all(hour >= FILLING and upto == high for hour, upto, high in left), left
    assert stored(db) == expected
    # The per-minute counts of the last day (a margin from its edge, which moves with the clock).
    recent = NOW - timedelta(hours=23)
    by_minute: Counter = Counter()
    for (minute, tenant, _campaign, _sender, _domain, kind, measure), n in reference(order, per_minute=True).items():
        if minute >= recent:
            by_minute[(minute, tenant, kind, measure)] += n
    assert minutes(db, recent) == by_minute
    assert read(op) == coarsen(expected, "hour")
    for group in DIM:  # the narrow roll-ups, per dimension, and the fine tables for two filters
        assert read(op, "day", group) == coarsen(expected, "day", group)
    assert read(op, "hour", sender="news") == coarsen(expected, "hour", sender="news")
    both = {"sender": "news", "domain": "example.com"}
    assert read(op, "day", "campaign", **both) == coarsen(expected, "day", "campaign", **both)
    daily = Counter()
    for (hour, *key), n in expected.items():
        daily[(hour.replace(hour=0), *key)] += n
    assert stored(db, "facts_daily", "day") == daily
    monthly = Counter()
    for (hour, *key), n in expected.items():
        monthly[(hour.replace(day=1, hour=0), *key)] += n
    assert stored(db, "facts_monthly", "month") == monthly


def _connector(conn):
    from contextlib import contextmanager

    @contextmanager
    def same():
        yield conn

    return same


def test_rerunning_an_hour_gives_the_same_rows_and_a_late_fact_makes_it_dirty_again(db, op, operator_store):
    facts, connect_op = Facts(), _connector(op)
    hour = (NOW - timedelta(hours=30)).replace(minute=0, second=0, microsecond=0)
    job = str(uuid.uuid4())
    late = hour + timedelta(minutes=5)
    log = by_position(
        operator_store,
        [
            envelope(1, "JobCreated", created(job), "acme", hour),
            envelope(2, "JobStarted", {"job_id": job, "attempt": 1}, "acme", hour + timedelta(minutes=1)),
            envelope(
                3,
                "JobCompleted",
                {"job_id": job, "attempt": 1, "code": 250, "size": 900},
                "acme",
                hour + timedelta(minutes=1, seconds=3),
            ),
            envelope(4, "FeedbackReceived", {"job_id": job, "kind": "bounce", "hard": True}, "acme", late),
        ],
    )
    with op.transaction():
        facts.apply(op, [log[1], log[2], log[3]])
    first = analytics.aggregate(connect_op)
    rows = db.execute("SELECT * FROM facts_hourly ORDER BY kind").fetchall()
    assert first.hours == 1 and [r[5] for r in rows] == ["delivered", "sent"]
    delivered = db.execute("SELECT latency_ms_sum, latency_n, size_sum FROM facts_hourly WHERE kind = 'delivered'")
    assert delivered.fetchone() == (63_000, 1, 900)  # pending (created) -> accepted, and the bytes sent
    db.execute("INSERT INTO facts_dirty (hour) VALUES (%s)", (hour,))
    assert analytics.aggregate(connect_op).hours == 1
    assert db.execute("SELECT * FROM facts_hourly ORDER BY kind").fetchall() == rows  # the same rows
    # A bounce recorded two days later, about the message: its own hour is dirty, not the old one.
    with op.transaction():
        facts.apply(op, [log[4]])
    assert db.execute("SELECT hour FROM facts_dirty").fetchall() == [(hour,)]
    assert analytics.aggregate(connect_op).hours == 1
    kinds = [k for (k,) in db.execute("SELECT kind FROM facts_hourly ORDER BY kind")]
    assert kinds == ["bounced_hard", "delivered", "sent"]
    assert db.execute("SELECT n FROM facts_daily WHERE kind = 'bounced_hard'").fetchone() == (1,)


def test_the_current_hour_is_not_aggregated_but_is_read_from_the_raw_facts(db, op, operator_store):
    facts, connect_op = Facts(), _connector(op)
    job, now = str(uuid.uuid4()), datetime.now(UTC)
    events = [
        envelope(1, "JobCreated", created(job), "acme", now),
        envelope(2, "JobStarted", {"job_id": job, "attempt": 1}, "acme", now),
    ]
    with op.transaction():
        facts.apply(op, recorded(operator_store, events))
    this_hour = now.replace(minute=0, second=0, microsecond=0)  # what aggregate() takes "now" to be
    assert analytics.aggregate(connect_op, before=this_hour).hours == 0
    assert db.execute("SELECT count(*) FROM facts_hourly").fetchone() == (0,)
    window = analytics.Filter(now - timedelta(hours=1), now + timedelta(hours=1))
    assert analytics.counters(analytics.series(op, window)) == {"sent": 1, "sent_unique": 1}


def test_a_tenant_reads_only_its_own_numbers(db, op, db_url, operator_store):
    facts, connect_op = Facts(), _connector(op)
    at = NOW - timedelta(hours=3)
    batch = []
    for position, tenant in enumerate(["acme", "rival", "rival"], start=1):
        job = str(uuid.uuid4())
        batch += [
            envelope(position * 2, "JobCreated", created(job), tenant, at),
            envelope(position * 2 + 1, "JobStarted", {"job_id": job, "attempt": 1}, tenant, at),
        ]
    with op.transaction():
        facts.apply(op, recorded(operator_store, batch))
    window = analytics.Filter(NOW - timedelta(days=1), NOW)
    for aggregated in (False, True):
        if aggregated:
            analytics.aggregate(connect_op)
        for tenant, sent in (("acme", 1), ("rival", 2)):
            with connect(db_url, scope=Scope.of(tenant)) as conn:
                assert analytics.counters(analytics.series(conn, window))["sent"] == sent
        with connect(db_url, scope=Scope.of("nobody")) as conn:
            assert analytics.series(conn, window) == []


def test_partitions_are_made_ahead_and_dropped_past_retention(db, op):
    today = NOW.date()
    kept = analytics.maintain(op, retention_days=3, today=today)
    names = {n for (n,) in db.execute("SELECT relname FROM pg_class WHERE relname ~ '^facts_[0-9]{8}$'")}
    assert {f"facts_{(today + timedelta(days=i)):%Y%m%d}" for i in range(-1, 8)} <= names
    assert kept.partitions_made >= 8
    # Ten days later, the partitions older than three days are gone, with their facts' bookkeeping.
    later = analytics.maintain(op, retention_days=3, today=today + timedelta(days=10))
    names = {n for (n,) in db.execute("SELECT relname FROM pg_class WHERE relname ~ '^facts_[0-9]{8}$'")}
    assert min(names) == f"facts_{(today + timedelta(days=7)):%Y%m%d}"
    assert later.partitions_dropped == kept.partitions_made - 1  # yesterday's went too
    assert later.partitions_made >= 9


def test_a_fact_older_than_retention_is_not_recorded(db, op, operator_store):
    facts = Facts(retention_days=2)
    job = str(uuid.uuid4())
    old = NOW - timedelta(days=3)
    events = [
        envelope(1, "JobCreated", created(job), "acme", old),
        envelope(2, "JobStarted", {"job_id": job, "attempt": 1}, "acme", old),
        envelope(3, "JobCompleted", {"job_id": job, "attempt": 1, "code": 250}, "acme", NOW),
    ]
    with op.transaction():
        facts.apply(op, recorded(operator_store, events))
    assert db.execute("SELECT kind FROM facts").fetchall() == [("delivered",)]


def test_a_filling_hour_is_read_up_to_its_watermark_and_an_older_fact_or_a_rewind_drops_the_watermark(
    db, op, operator_store
):
    wipe(db)
    facts, connect_op = Facts(), _connector(op)
    job, now = str(uuid.uuid4()), datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    window = analytics.Filter(hour, now + timedelta(minutes=5))

    log = by_position(
        operator_store,
        [
            envelope(1, "JobCreated", created(job), "acme", now),
            envelope(2, "JobStarted", {"job_id": job, "attempt": 1}, "acme", now),
            envelope(3, "JobCompleted", {"job_id": job, "attempt": 1, "code": 250, "size": 10}, "acme", now),
            envelope(4, "MessageOpened", {"job_id": job}, "acme", now),
            envelope(5, "LinkClicked", {"job_id": job, "link": 0}, "acme", now),
        ],
    )
    at = {n: e.position for n, e in log.items()}  # the positions the log gave them

    def apply(*numbers: int) -> None:
        with op.transaction():
            facts.apply(op, [log[n] for n in numbers])

    def state() -> tuple[Any, ...]:
        return db.execute("SELECT upto, high, resets FROM facts_dirty WHERE hour = %s", (hour,)).fetchone()

    def seen() -> dict[str, int]:
        c = analytics.counters(analytics.series(op, window))
        return {k: c.get(k, 0) for k in ("sent", "delivered", "opened")}

    apply(1, 2, 4)  # 3 was dead-lettered
    filling = {"ended_before": hour}  # the hour is not over (whatever the clock says now)
    analytics.aggregate(connect_op, **filling)  # the hour so far: it stays dirty, with its watermark
    assert state() == (at[4], at[4], 0)
    assert db.execute("SELECT sum(n) FROM facts_hourly WHERE hour = %s", (hour,)).fetchone() == (2,)
    apply(5)  # after it: kept
    assert state() == (at[4], at[5], 0)
    assert seen() == {"sent": 1, "delivered": 0, "opened": 1}
    # The dead letter replayed: older than what the hour's roll-ups may hold, so they are set aside.
    apply(3)
    assert state() == (None, at[5], 1)
    assert seen() == {"sent": 1, "delivered": 1, "opened": 1}
    analytics.aggregate(connect_op, **filling)
    assert state() == (at[5], at[5], 1)
    assert seen() == {"sent": 1, "delivered": 1, "opened": 1}
    # A rewind forgets facts the roll-ups hold: the hour is read from its raw facts again.
    with op.transaction():
        facts.reset(op, at[4], at[5])
    assert state()[0] is None and state()[2] == 2
    assert seen() == {"sent": 1, "delivered": 1, "opened": 0}
    per_kind = dict(db.execute("SELECT kind, sum(n) FROM facts_minutes GROUP BY 1 HAVING sum(n) > 0").fetchall())
    assert per_kind == {"sent": 1, "delivered": 1}  # the forgotten open and click are out of the minutes too


def test_a_catch_up_hands_the_projection_ranges_and_a_malformed_event_among_them_is_dead_lettered_alone(
    db, operator_rt, operator_store, settings
):
    """Catching up, the facts projection is handed ranges of positions, not envelopes; a range
    holding an event the SQL cannot read (a job id that is not one) fails as a whole, is applied
    again as envelopes, and only that event is dead-lettered."""
    wipe(db)
    events, at = [], NOW - timedelta(hours=2)
    for n in range(12):
        job = str(uuid.uuid4())
        events += [
            envelope(0, "JobCreated", created(job), "acme", at),
            envelope(0, "JobStarted", {"job_id": job, "attempt": 1}, "acme", at),
            envelope(0, "JobCompleted", {"job_id": job, "attempt": 1, "code": 250, "size": n}, "acme", at),
        ]
        if n == 5:
            events.append(envelope(0, "MessageOpened", {"job_id": "not-a-job-id"}, "acme", at))
    log = recorded(operator_store, events)
    poison = next(e.position for e in log if e.type == "MessageOpened")
    facts = Facts()
    facts.batch_size = 7  # several ranges, one of them holding the poison
    runner = ConsumerRunner(facts, operator_store, operator_rt.services.redis_url, settings)
    try:
        runner.ensure_checkpoint()
        runner.catch_up()
        assert runner.checkpoint() == max(e.position for e in log)
    finally:
        runner.close()
    dead = db.execute("SELECT position, event_type FROM dead_letters WHERE consumer = 'facts'").fetchall()
    assert dead == [(poison, "MessageOpened")]
    got = db.execute("SELECT position, kind, size_bytes FROM facts ORDER BY position").fetchall()
    want = [
        (e.position, {"JobStarted": "sent", "JobCompleted": "delivered"}[e.type], e.data.get("size"))
        for e in log
        if e.type in ("JobStarted", "JobCompleted")
    ]
    assert got == want  # every event once: no range lost, none applied twice


TOTALS_FROM_FACTS = """
SELECT domain, kind, count(*), count(*) FILTER (WHERE human AND first) FROM facts
WHERE at >= %s AND at < %s GROUP BY 1, 2
"""


def test_totals_over_months_read_whole_months_from_the_monthly_roll_up_and_equal_the_raw_facts(db, op, operator_store):
    wipe(db)
    facts, connect_op = Facts(), _connector(op)
    events = []
    for days_ago, domain in (
        (100, "a.example"),
        (70, "b.example"),
        (45, "a.example"),
        (20, "b.example"),
        (3, "c.example"),
    ):
        for _ in range(2):
            job, at = str(uuid.uuid4()), NOW - timedelta(days=days_ago)
            events += [
                envelope(0, "JobCreated", created(job, domain=domain), "acme", at),
                envelope(0, "JobStarted", {"job_id": job, "attempt": 1}, "acme", at),
                envelope(0, "JobCompleted", {"job_id": job, "attempt": 1, "code": 250}, "acme", at),
            ]
    late_job = str(uuid.uuid4())
    late = [  # its bounce comes later, in an hour of a whole month that was aggregated already
        envelope(0, "JobCreated", created(late_job, domain="a.example"), "acme", NOW - timedelta(days=45)),
        envelope(
            0,
            "FeedbackReceived",
            {"job_id": late_job, "kind": "bounce", "hard": True},
            "acme",
            NOW - timedelta(days=45),
        ),
    ]
    log = recorded(operator_store, events + late)
    with op.transaction():
        facts.apply(op, log[: len(events) + 1])
    analytics.aggregate(connect_op)
    window = analytics.Filter(NOW - timedelta(days=110), NOW + timedelta(hours=1))
    since = window.since.replace(hour=0, minute=0, second=0, microsecond=0)

    def totals() -> dict[tuple[str, str], tuple[int, int]]:
        rows = analytics.series(op, window, by="day", group="domain", per_bucket=False)
        return {(r["key"], r["kind"]): (r["n"], r["uniq"]) for r in rows if r["n"]}

    def truth() -> dict[tuple[str, str], tuple[int, int]]:
        return {(d, k): (n, u) for d, k, n, u in db.execute(TOTALS_FROM_FACTS, (since, window.until))}

    months = analytics._whole_months(since, window.until)
    assert len(months) >= 2  # 110 days hold at least two whole months
    assert (
        totals()
        == truth()
        == {
            ("a.example", "sent"): (4, 4),
            ("a.example", "delivered"): (4, 4),
            ("b.example", "sent"): (4, 4),
            ("b.example", "delivered"): (4, 4),
            ("c.example", "sent"): (2, 2),
            ("c.example", "delivered"): (2, 2),
        }
    )
    # The whole months are read from the monthly roll-up (a wrong row there shows) ...
    shift = "UPDATE facts_monthly_cube SET n = n + %s WHERE month = ANY(%s) AND dim = 'domain'"
    db.execute(shift, (100, months))
    assert totals() != truth()
    db.execute(shift, (-100, months))
    # ... unless one of their days is dirty: then that month is read by the day, its dirty day raw.
    with op.transaction():
        facts.apply(op, log[len(events) + 1 :])
    assert totals() == truth()
    assert totals()[("a.example", "bounced_hard")] == (1, 1)
    analytics.aggregate(connect_op)
    assert totals() == truth()
    cube = db.execute(
        "SELECT month, key, kind, n FROM facts_monthly_cube WHERE dim = 'domain' AND n > 0 ORDER BY 1, 2, 3"
    ).fetchall()
    by_month = db.execute(
        "SELECT date_trunc('month', at, 'UTC'), domain, kind, count(*) FROM facts GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ).fetchall()
    assert cube == by_month  # the monthly roll-up is the facts' own, late bounce included
