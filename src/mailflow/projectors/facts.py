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

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from mailflow.consumers.projection import Projection, Publish
from mailflow.events.envelope import Envelope
from mailflow.events.registry import EventRegistry, registry
from mailflow.projectors import queries as q
from mailflow.projectors.counters import cards, counters
from mailflow.projectors.metrics import LIVE_S, MetricsPublisher

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
# The event types a fact is made of, besides JobCreated (which says what a job's facts are
# counted under); their shapes are read in SQL (queries.FACTS_OF_BATCH).
TYPES = (
    "JobStarted",
    "JobCompleted",
    "JobFailed",
    "JobRetryScheduled",
    "FeedbackReceived",
    "ContactStatusChanged",
    "MessageOpened",
    "LinkClicked",
)
REFUSALS = ("suppressed", "cancelled", "stopped")  # JobFailed kinds of jobs never handed to SMTP
REPEATABLE = ("bounced_hard", "bounced_soft", "delayed", "complained", "replied", "auto_replied", "opened", "clicked")
DEFAULT_RETENTION_DAYS = 180
MINUTES_KEPT = timedelta(days=1)  # facts_minutes: the last day's facts per minute


def hour_of(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def check_shapes(reg: EventRegistry) -> None:
    """The SQL reads the events' JSON as it was written: an upcaster (an old shape read as a new
    one) for a type it reads would be bypassed, so one stops the projection instead."""
    upcast = [t for t in ("JobCreated", *TYPES) if reg.has_upcasters(t)]
    if upcast:
        raise RuntimeError(
            f"facts: {', '.join(upcast)} have upcasters; queries.FACTS_OF_BATCH reads the new shape only"
        )


class Facts(Projection):
    name = "facts"
    description = "one row per delivery event, hourly/daily/monthly aggregates (mailflow stats)"
    batch_size = 20_000  # a catch-up's batch: one statement does the work, so bigger is cheaper

    def __init__(self, retention_days: int = DEFAULT_RETENTION_DAYS) -> None:
        self.retention_days = retention_days
        self._partitions: set[date] = set()
        self._live: list[tuple[Any, ...]] = []  # the applied batch's live deltas, for committed()
        self.live: MetricsPublisher | None = None

    def bind(self, store: Any, settings: Any = None) -> None:
        check_shapes(registry)
        if settings is not None:
            self.retention_days = settings.analytics_retention_days

    def committed(self, publish: Publish) -> None:
        """The batch's facts are committed: their deltas go out on `<prefix>:metrics` (metrics.py)."""
        rows, self._live = self._live, []
        if not rows:
            return
        if self.live is None:
            self.live = MetricsPublisher(lambda message: publish("metrics", message))
        self.live.add(rows, lambda found: cards(counters(found)))

    def apply(self, conn: psycopg.Connection, events: list[Envelope]) -> None:
        """The facts of exactly these events (read again from the log, by position)."""
        self._live = []
        positions = [e.position for e in events if e.position is not None]
        if positions:
            self._apply(conn, min(positions) - 1, max(positions), positions)

    def apply_range(self, conn: psycopg.Connection, after: int, upto: int) -> None:
        """The facts of the events with positions in (after, upto]: no envelope is decoded."""
        self._live = []
        if upto > after:
            self._apply(conn, after, upto, None)

    def _apply(self, conn: psycopg.Connection, after: int, upto: int, positions: Sequence[int] | None) -> None:
        now = datetime.now(UTC)
        batch = {
            "after": after,
            "upto": upto,
            "positions": list(positions) if positions is not None else None,
            "types": list(TYPES),
            "floor": now - timedelta(days=self.retention_days),
        }
        first, last = conn.execute(q.FACT_JOBS_OF_BATCH, batch).fetchone() or (None, None)
        if first is None:
            return  # nothing in the batch becomes a fact
        self._ensure_partitions(conn, first, last)
        extra = {
            "refusals": list(REFUSALS),
            "repeatable": list(REPEATABLE),
            "live": now - timedelta(seconds=LIVE_S),
            "minutes_since": now - MINUTES_KEPT,
        }
        self._live = conn.execute(q.FACTS_OF_BATCH, batch | extra).fetchall()

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
        conn.execute(q.FORGET_MINUTES_FROM, {"from": from_position, "minutes_since": datetime.now(UTC) - MINUTES_KEPT})
        conn.execute(q.FORGET_FIRSTS_FROM, (from_position,))
        conn.execute(q.FORGET_FACTS_FROM, (from_position,))
        conn.execute(q.FORGET_FACT_JOBS_FROM, (from_position,))
