"""Projectors room: the `facts` projection - one narrow row per delivery-relevant event.

A fact is (time, tenant, campaign, sender, sending domain, recipient domain, priority, kind)
with its measures: `delivered` carries the latency from pending to accepted and the size sent.
What a later event of a job is counted under comes from its JobCreated (kept in fact_jobs), so
a fact never needs the jobs table, and a rebuild gives the same facts whatever the jobs table
holds now. Kinds (`KINDS`): sent (an attempt started; `first` on attempt 1), delivered,
deferred, failed, refused (not sent: suppressed, cancelled, stopped), bounced_hard,
bounced_soft, delayed, complained, replied, auto_replied, unsubscribed, opened, clicked.

`first` is the one definition of "unique" used everywhere: the first human fact of its kind for
its message (and link, for clicks), in log order; for kinds a message has at most once (sent on
attempt 1, delivered, failed) it needs no lookup. `human` is false for a flagged machine open
or click. Unique counts are human firsts; totals count every human fact.

Each batch also marks the hours it touched dirty (facts_dirty), in the same transaction: the
aggregation (analytics.py) re-aggregates an hour whose facts changed, late events included.
Facts older than the retention (MAILFLOW_ANALYTICS_RETENTION_DAYS) are not recorded, as their
partitions are gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from mailflow.consumers.projection import Projection, Publish
from mailflow.events.envelope import Envelope
from mailflow.projectors import queries as q
from mailflow.projectors.counters import cards, counters
from mailflow.projectors.metrics import MetricsPublisher

KINDS = (
    "sent",
    "delivered",
    "deferred",
    "failed",
    "refused",
    "bounced_hard",
    "bounced_soft",
    "delayed",
    "complained",
    "replied",
    "auto_replied",
    "unsubscribed",
    "opened",
    "clicked",
)
REFUSALS = frozenset({"suppressed", "cancelled", "stopped"})  # JobFailed kinds of jobs never handed to SMTP
FEEDBACK_KINDS = {
    "delayed": "delayed",
    "complaint": "complained",
    "reply": "replied",
    "auto_reply": "auto_replied",
}
REPEATABLE = frozenset(
    {"bounced_hard", "bounced_soft", "delayed", "complained", "replied", "auto_replied", "opened", "clicked"}
)
DEFAULT_RETENTION_DAYS = 180


@dataclass(frozen=True)
class Dims:
    """What a job's facts are counted under (from its JobCreated)."""

    tenant: str
    campaign: str
    sender: str
    sending_domain: str
    domain: str
    priority: str
    created_at: datetime


@dataclass(slots=True)
class Fact:
    at: datetime
    position: int
    kind: str
    job_id: str | None
    tenant: str
    dims: Dims | None
    link: int | None = None
    human: bool = True
    first: bool = True
    latency_ms: int | None = None
    size_bytes: int | None = None


def fact_of(e: Envelope, dims: Dims | None) -> Fact | None:
    """The fact an event is, or None (not delivery-relevant). `dims`: its job's, if it has one.

    A pure decision: `first` of a repeatable kind is settled later against fact_firsts."""
    d, t = e.data, e.type
    job_id = d.get("job_id")
    tenant = e.metadata.tenant or ""
    assert e.position is not None
    human, first, link, latency, size = True, True, None, None, None
    if t in ("JobStarted", "JobCompleted", "JobFailed", "JobRetryScheduled") and dims is None:
        return None  # a duty, or a job whose JobCreated predates what was kept
    if t == "JobStarted":
        kind, first = "sent", d.get("attempt") == 1
    elif t == "JobCompleted":
        assert dims is not None
        kind, size = "delivered", d.get("size")
        latency = max(int((e.recorded_at - dims.created_at).total_seconds() * 1000), 0)
    elif t == "JobFailed":
        kind = "refused" if d.get("kind") in REFUSALS else "failed"
    elif t == "JobRetryScheduled":
        if d.get("reason") == "lease_expired":
            return None
        kind, first = "deferred", d.get("attempt") == 1
    elif t == "FeedbackReceived":
        k = d.get("kind")
        if k == "bounce":
            kind = "bounced_hard" if d.get("hard") else "bounced_soft"
        elif k in FEEDBACK_KINDS:
            kind = FEEDBACK_KINDS[k]
        else:
            return None  # unsubscribes are counted from ContactStatusChanged, whatever the channel
        if dims is None and d.get("campaign_id"):  # about a message whose job was not kept: its campaign is known
            dims = Dims(tenant, d["campaign_id"], "", "", "", "", e.recorded_at)
    elif t == "ContactStatusChanged" and d.get("status") == "unsubscribed":
        kind, job_id, dims = "unsubscribed", None, None
    elif t == "MessageOpened":
        kind, human = "opened", not d.get("machine")
    elif t == "LinkClicked":
        kind, human, link = "clicked", not d.get("machine"), int(d.get("link", 0))
    else:
        return None
    return Fact(e.recorded_at, e.position, kind, job_id, tenant, dims, link, human, first, latency, size)


def hour_of(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _job_dims(e: Envelope, sending_domain: str) -> Dims:
    d = e.data
    return Dims(
        e.metadata.tenant or "",
        d.get("campaign_id") or "",
        d["sender"],
        sending_domain,
        d.get("domain", ""),
        d["priority"],
        e.recorded_at,
    )


class Facts(Projection):
    name = "facts"
    description = "one row per delivery event, hourly/daily/monthly aggregates (mailflow stats)"

    def __init__(self, retention_days: int = DEFAULT_RETENTION_DAYS) -> None:
        self.retention_days = retention_days
        self._partitions: set[date] = set()
        self._sending_domains: dict[tuple[str, str], str] = {}
        self._staged: tuple[int, int] | None = None  # (connection, server pid) with facts_incoming
        self._batch: list[Fact] = []  # the facts of the batch being applied, for committed()
        self.live: MetricsPublisher | None = None

    def bind(self, store: Any, settings: Any = None) -> None:
        if settings is not None:
            self.retention_days = settings.analytics_retention_days

    def committed(self, publish: Publish) -> None:
        """The batch's facts are committed: their deltas go out on `<prefix>:metrics` (metrics.py)."""
        batch, self._batch = self._batch, []
        if not batch:
            return
        if self.live is None:
            self.live = MetricsPublisher(lambda message: publish("metrics", message))
        self.live.add(batch, lambda rows: cards(counters(rows)))

    def apply(self, conn: psycopg.Connection, events: list[Envelope]) -> None:
        self._batch = []
        if not events:
            return
        created = [e for e in events if e.type == "JobCreated" and e.data.get("kind", "send") == "send"]
        dims: dict[str, Dims] = {}
        if created:
            for e in created:
                dims[e.data["job_id"]] = _job_dims(e, self._sending_domain(conn, e))
            conn.execute(q.INSERT_FACT_JOBS, _columns(dims, {e.data["job_id"]: e.position for e in created}))
        wanted = {job for e in events if (job := e.data.get("job_id")) and e.type != "JobCreated"}
        missing = [j for j in wanted if j not in dims]
        if missing:
            for row in conn.execute(q.FACT_JOBS, (missing,)).fetchall():
                dims[str(row[0])] = Dims(*row[1:])
        # In the events' own zone: comparing datetimes of one tzinfo needs no utcoffset() calls.
        floor = (datetime.now(UTC) - timedelta(days=self.retention_days)).astimezone(events[0].recorded_at.tzinfo)
        facts = []
        for e in events:
            if e.type == "JobCreated":
                continue
            job = e.data.get("job_id")
            f = fact_of(e, dims.get(job) if job else None)
            if f is not None and f.at >= floor:
                facts.append(f)
        if facts:
            self._settle_firsts(conn, facts)
            ats = [f.at for f in facts]
            self._ensure_partitions(conn, min(ats), max(ats))
            self._stage(conn)
            with conn.cursor().copy(q.COPY_FACTS) as copy:
                for f in facts:
                    copy.write_row(_row(f))
            conn.execute(q.INSERT_STAGED_FACTS)  # and marks their hours dirty
        self._batch = facts

    def _stage(self, conn: psycopg.Connection) -> None:
        """The connection's staging table (made once per server session)."""
        session = (id(conn), conn.info.backend_pid)
        if self._staged != session:
            conn.execute(q.STAGE_FACTS)
            self._staged = session

    def _sending_domain(self, conn: psycopg.Connection, e: Envelope) -> str:
        key = (e.metadata.tenant or "", e.data["sender"])
        if key not in self._sending_domains:
            row = conn.execute(q.SENDER_EMAIL, key).fetchone()
            self._sending_domains[key] = row[0].rpartition("@")[2].lower() if row else ""
            if len(self._sending_domains) > 10_000:
                self._sending_domains.clear()
        return self._sending_domains[key]

    @staticmethod
    def _settle_firsts(conn: psycopg.Connection, facts: list[Fact]) -> None:
        """A repeatable kind's fact is first if no earlier one of its message (and link) was."""
        for f in facts:
            if not f.human:
                f.first = False  # a machine's open is nobody's first: the person's may come later
        repeat = [f for f in facts if f.kind in REPEATABLE and f.job_id and f.human]
        if not repeat:
            return
        keys = [(f.job_id, f.kind, -1 if f.link is None else f.link) for f in repeat]
        # Within a batch, only the first of a key can be the first of all.
        seen: set[tuple[Any, ...]] = set()
        for f, k in zip(repeat, keys, strict=True):
            f.first = k not in seen
            seen.add(k)
        fresh = set(
            conn.execute(
                q.INSERT_FIRSTS,
                (
                    [str(k[0]) for k in keys],
                    [k[1] for k in keys],
                    [k[2] for k in keys],
                    [f.at for f in repeat],
                ),
            ).fetchall()
        )
        for f, k in zip(repeat, keys, strict=True):
            f.first = f.first and (str(k[0]), k[1], k[2]) in fresh

    def _ensure_partitions(self, conn: psycopg.Connection, first: datetime, last: datetime) -> None:
        """The day partitions from `first`'s to `last`'s (a day between without facts costs an
        empty partition, which was made ahead anyway or goes with the retention)."""
        day, end = first.astimezone(UTC).date(), last.astimezone(UTC).date()
        days = []
        while day <= end:
            days.append(day)
            day += timedelta(days=1)
        for day in sorted(set(days) - self._partitions):
            conn.execute(q.MAKE_PARTITION, (day,))
            self._partitions.add(day)

    def reset(self, conn: psycopg.Connection, from_position: int, applied_upto: int) -> None:
        """Forget the facts of events from `from_position` on; their hours become dirty, so the
        aggregation takes them out of the aggregates too."""
        if from_position <= 1:
            conn.execute(q.MARK_AGGREGATED_DIRTY)
            conn.execute(q.MARK_DIRTY_FROM_FACTS, (0,))
            for stmt in q.FORGET_ALL_FACTS:
                conn.execute(stmt)
            return
        if from_position > applied_upto:
            return
        conn.execute(q.MARK_DIRTY_FROM_FACTS, (from_position,))
        conn.execute(q.FORGET_FIRSTS_FROM, (from_position,))
        conn.execute(q.FORGET_FACTS_FROM, (from_position,))
        conn.execute(q.FORGET_FACT_JOBS_FROM, (from_position,))


def _columns(dims: dict[str, Dims], positions: dict[str, int | None]) -> tuple[list[Any], ...]:
    ids = list(dims)
    return (
        ids,
        [dims[j].tenant for j in ids],
        [dims[j].campaign for j in ids],
        [dims[j].sender for j in ids],
        [dims[j].sending_domain for j in ids],
        [dims[j].domain for j in ids],
        [dims[j].priority for j in ids],
        [dims[j].created_at for j in ids],
        [positions[j] for j in ids],
    )


def _row(f: Fact) -> tuple[Any, ...]:
    """The fact as COPY_FACTS's row (text COPY: the job id goes as its text)."""
    d = f.dims
    head = (f.at, f.position)
    if d is None:
        dims: tuple[str, ...] = (f.tenant, "", "", "", "", "")
    else:
        dims = (d.tenant, d.campaign, d.sender, d.sending_domain, d.domain, d.priority)
    tail = (f.kind, f.job_id, f.link, f.human, f.first, f.latency_ms, f.size_bytes)
    return head + dims + tail
