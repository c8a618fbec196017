"""Projectors room: analytics - the hourly aggregation of facts, its daily and monthly roll-ups,
retention, and the one way numbers are read (`mailflow stats`, the dashboard).

An hour is aggregated as a whole: its facts_hourly rows are replaced by a GROUP BY of its facts
(and its narrow roll-ups, facts_hourly_cube, from those), then its day is rolled up again from
the hourly rows and its month moves by the day's difference, and
its dirty mark is removed only if no fact arrived meanwhile (the mark's version is unchanged),
all in one transaction. So re-running an hour gives the same rows, and a late fact makes its
hour dirty again, to be aggregated by the next run. Only hours that have ended are aggregated.

Readers never see a stale aggregate: a bucket that holds a dirty hour is read from the finer
level (daily -> hourly -> raw facts) for that part, in one statement and so one snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

from mailflow.errors import UsageError
from mailflow.projectors import queries as q
from mailflow.projectors.counters import cards, counters
from mailflow.projectors.facts import MINUTES_KEPT, hour_of

__all__ = ["Aggregated", "Filter", "aggregate", "cards", "counters", "rebuild", "series", "summary"]

Connect = Callable[[], AbstractContextManager[psycopg.Connection]]
Bucket = Literal["hour", "day", "month"]
Group = Literal["campaign", "sender", "domain", ""]
PARTITIONS_AHEAD_DAYS = 7
ProgressFn = Callable[[int, int], None]


@dataclass
class Aggregated:
    hours: int = 0
    rows: int = 0
    seconds: float = 0.0
    left_dirty: int = 0  # hours still filling, or that got new facts meanwhile (the next run takes them)


def day_of(hour: datetime) -> date:
    return hour.astimezone(UTC).date()


def month_of(d: date) -> date:
    return d.replace(day=1)


def _midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def aggregate_hours(conn: psycopg.Connection, hours: list[tuple[datetime, int]], ended_before: datetime) -> Aggregated:
    """Aggregate these dirty hours (with the versions read), all of one day, in one transaction.

    An hour at or after `ended_before` is still filling: it stays dirty, with the watermark of
    what its roll-ups now hold. So does an hour that got new facts meanwhile (in log order: a
    rewind or an older fact since leaves it without one)."""
    done = Aggregated()
    if not hours:
        return done
    days = {day_of(h) for h, _ in hours}
    assert len(days) == 1, "one day per transaction"
    day = days.pop()
    which = [h for h, _ in hours]
    with conn.transaction():
        conn.execute(q.DELETE_HOURLY, (which,))
        found = conn.execute(
            q.AGGREGATE_HOURS, {"lo": min(which), "hi": max(which) + timedelta(hours=1), "hours": which}
        ).fetchall()
        marks = {hour: {"hour": hour, "upto": upto, "resets": resets} for hour, upto, _, resets in found}
        done.rows += sum(int(rows) for _, _, rows, _ in found)
        done.hours = len(which)
        conn.execute(q.DELETE_HOURLY_CUBE, (which,))
        conn.execute(q.CUBE_HOURS, (which,))
        for hour, version in hours:
            if hour < ended_before and conn.execute(q.CLEAN, (hour, version)).rowcount == 1:
                continue
            done.left_dirty += 1
            if hour in marks:  # an hour whose facts were all forgotten has no watermark to keep
                conn.execute(q.MARK_PARTIAL, marks[hour])
        at = {"day": _midnight(day), "month": _midnight(month_of(day))}
        conn.execute(q.MONTH_LESS_DAY, at)
        conn.execute(q.DELETE_DAILY, (at["day"],))
        conn.execute(q.ROLL_UP_DAY, at)
        conn.execute(q.MONTH_PLUS_DAY, at)
        conn.execute(q.DROP_EMPTY_MONTH_ROWS, (at["month"],))
        conn.execute(q.MONTH_CUBE_LESS_DAY, at)
        conn.execute(q.DELETE_DAILY_CUBE, (at["day"],))
        conn.execute(q.ROLL_UP_DAY_CUBE, at)
        conn.execute(q.MONTH_CUBE_PLUS_DAY, at)
        conn.execute(q.DROP_EMPTY_MONTH_CUBE_ROWS, (at["month"],))
    return done


def aggregate(
    connect: Connect,
    *,
    before: datetime | None = None,
    since: datetime | None = None,
    progress: ProgressFn | None = None,
    batch_hours: int = 500,
    ended_before: datetime | None = None,
) -> Aggregated:
    """Aggregate every dirty hour before `before` (default: the end of this hour, so the current
    hour so far too), from `since` on if given, oldest first, a day per transaction. Hours from
    `ended_before` on (default: this hour) are still filling (aggregate_hours)."""
    started = time.monotonic()
    this_hour = hour_of(datetime.now(UTC))
    ended_before = ended_before or this_hour
    before = before or this_hour + timedelta(hours=1)
    total = Aggregated()
    with connect() as conn:
        dirty = _dirty(conn, before, since, batch_hours)
        todo = len(dirty)
        while dirty:
            for day_hours in _by_day(dirty):
                got = aggregate_hours(conn, day_hours, ended_before)
                total.hours += got.hours
                total.rows += got.rows
                total.left_dirty += got.left_dirty
                if progress is not None:
                    progress(total.hours, max(todo, total.hours))
            if len(dirty) < batch_hours:
                break
            dirty = _dirty(conn, before, since, batch_hours, after=dirty[-1][0])
            todo = total.hours + len(dirty)
    total.seconds = time.monotonic() - started
    return total


def _dirty(
    conn: psycopg.Connection, before: datetime, since: datetime | None, limit: int, after: datetime | None = None
) -> list[tuple[datetime, int]]:
    lower = after + timedelta(microseconds=1) if after is not None else since  # `after` is past `since`
    rows = conn.execute(q.DIRTY_HOURS, {"before": before, "since": lower, "limit": limit}).fetchall()
    return [(h, int(v)) for h, v in rows]


def _by_day(hours: list[tuple[datetime, int]]) -> Iterator[list[tuple[datetime, int]]]:
    current: list[tuple[datetime, int]] = []
    for h, v in hours:
        if current and day_of(current[0][0]) != day_of(h):
            yield current
            current = []
        current.append((h, v))
    if current:
        yield current


def rebuild(connect: Connect, *, since: datetime | None = None, progress: ProgressFn | None = None) -> Aggregated:
    """Re-aggregate from the raw facts: every hour from `since` on (every hour with facts or
    aggregates when None) is marked dirty, then aggregated as the hourly job would."""
    since = hour_of(since) if since is not None else None
    with connect() as conn, conn.transaction():
        conn.execute(q.FACT_HOURS_SINCE, {"since": since or datetime(1970, 1, 1, tzinfo=UTC)})
    return aggregate(connect, since=since, progress=progress)


# -- retention and partitions -------------------------------------------------------------------


@dataclass
class Retained:
    partitions_made: int = 0
    partitions_dropped: int = 0
    rows_deleted: dict[str, int] = field(default_factory=dict)


def maintain(conn: psycopg.Connection, *, retention_days: int, today: date | None = None) -> Retained:
    """Make the next days' partitions, drop those past retention (and the facts' bookkeeping)."""
    # The per-minute counts are kept a day (a given day: from its midnight; tests move the clock).
    kept_since = (datetime.now(UTC) if today is None else _midnight(today)) - MINUTES_KEPT
    today = today or datetime.now(UTC).date()
    out = Retained()
    for i in range(-1, PARTITIONS_AHEAD_DAYS + 1):
        if conn.execute(q.MAKE_PARTITION, (today + timedelta(days=i),)).fetchone()[0]:  # type: ignore[index]
            out.partitions_made += 1
    cutoff = today - timedelta(days=retention_days)
    out.partitions_dropped = int(conn.execute(q.DROP_PARTITIONS_BEFORE, (cutoff,)).fetchone()[0])  # type: ignore[index]
    floor = _midnight(cutoff)
    for name, stmt in q.RETENTION.items():
        out.rows_deleted[name] = conn.execute(stmt, (floor,)).rowcount
    out.rows_deleted["facts_minutes"] = conn.execute(q.FORGET_OLD_MINUTES, (kept_since,)).rowcount
    return out


# -- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    since: datetime
    until: datetime
    campaign: str | None = None
    sender: str | None = None
    domain: str | None = None

    def params(self, by: Bucket, group: Group = "") -> dict[str, Any]:
        if self.until <= self.since:
            raise UsageError("--until must be after --since")
        return {
            "since": _floor(self.since, by),
            "until": self.until,
            "campaign": self.campaign,
            "sender": self.sender,
            "domain": self.domain,
            "grp": group,
        }


def _floor(ts: datetime, by: Bucket) -> datetime:
    ts = ts.astimezone(UTC)
    if by == "hour":
        return ts.replace(minute=0, second=0, microsecond=0)
    if by == "day":
        return ts.replace(hour=0, minute=0, second=0, microsecond=0)
    return ts.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


SERIES = {"hour": q.SERIES_BY_HOUR, "day": q.SERIES_BY_DAY, "month": q.SERIES_BY_MONTH}


@dataclass(frozen=True)
class Measures:
    n: int = 0
    human: int = 0
    unique: int = 0
    latency_ms_sum: int = 0
    latency_n: int = 0


CUBES = {"hour": q.CUBE_BY_HOUR, "day": q.CUBE_BY_DAY}


@dataclass(frozen=True)
class DirtyFacts:
    """The dirty hours' raw facts from `since` to `until`, grouped once per hour, dimension, key
    and kind (dirty_facts()): the reads of one dashboard snapshot share them instead of each
    scanning a busy current hour. For reads from `since` on (by hour or day) that end at `until`."""

    since: datetime
    until: datetime
    rows: list[dict[str, Any]]


def dirty_facts(conn: psycopg.Connection, since: datetime, until: datetime) -> DirtyFacts:
    params = _raw_range(conn, {"since": _floor(since, "day"), "until": until})
    with conn.cursor(row_factory=dict_row) as cur:
        found = cur.execute(q.DIRTY_FACTS_CUBE, params).fetchall()
    return DirtyFacts(params["since"], until, list(found))


def _raw_range(conn: psycopg.Connection, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the raw part's range: the dirty hours' within [since, until)."""
    with conn.cursor(row_factory=dict_row) as cur:
        dirty = cur.execute(q.DIRTY_RANGE, params).fetchone() or {}
    if dirty.get("lo") is None:  # nothing dirty: an empty range for the raw part
        return params | {"raw_since": params["since"], "raw_until": params["since"]}
    return params | {"raw_since": max(dirty["lo"], params["since"]), "raw_until": min(dirty["hi"], params["until"])}


def _with_dirty(
    found: list[dict[str, Any]], shared: DirtyFacts, f: Filter, by: Bucket, dim: str, key: str | None, per_bucket: bool
) -> list[dict[str, Any]]:
    """A cube read's rows with the shared dirty facts of its range added in."""
    since = _floor(f.since, by)
    merged = {(r["bucket"], r["key"], r["kind"]): dict(r) for r in found}
    for r in shared.rows:
        if r["dim"] != dim or (key is not None and r["key"] != key) or not since <= r["hour"] < f.until:
            continue
        bucket = _floor(r["hour"], by) if per_bucket else None
        m = merged.setdefault((bucket, r["key"], r["kind"]), {"bucket": bucket, "key": r["key"], "kind": r["kind"]})
        for k in _MEASURES:
            m[k] = m.get(k, 0) + r[k]
    return [merged[k] for k in sorted(merged, key=lambda k: (k[0] or since, k[1], k[2]))]


def series(
    conn: psycopg.Connection,
    f: Filter,
    *,
    by: Bucket = "hour",
    group: Group = "",
    per_bucket: bool = True,
    dirty: DirtyFacts | None = None,
) -> list[dict[str, Any]]:
    """Per bucket (and group key: campaign, sender or recipient domain), per kind: the measures;
    with `per_bucket` false, per group key and kind over the whole range (bucket None).

    One dimension at most (a group, or one filter) is read from the narrow roll-ups; more
    from the fine tables. The connection's scope decides whose facts: a tenant's sees its own.
    `dirty`: the dirty hours' facts already read (dirty_facts()), for a read from the roll-ups
    within its range."""
    filters = {d: v for d, v in (("campaign", f.campaign), ("sender", f.sender), ("domain", f.domain)) if v is not None}
    params = _raw_range(conn, f.params(by, group))
    with conn.cursor(row_factory=dict_row) as cur:
        # The finer levels are read only over the days (months) of the dirty hours: nothing
        # dirty, nothing read (an open range let the planner scan a month of hourly rows).
        lo, hi = params["raw_since"], params["raw_until"]
        params |= {"raw_day": _floor(lo, "day"), "raw_month": _floor(lo, "month")}
        if hi > lo:
            last = hi - timedelta(microseconds=1)
            params |= {
                "raw_day_until": min(_next(_floor(last, "day"), "day"), params["until"]),
                "raw_month_until": min(_next(_floor(last, "month"), "month"), params["until"]),
            }
        else:
            params |= {"raw_day_until": params["raw_day"], "raw_month_until": params["raw_month"]}
        if by in CUBES and ((group and not filters) or (not group and len(filters) <= 1)):
            dim, key = (group, None) if group else next(iter(filters.items()), ("all", None))
            shared = dirty is not None and dirty.since <= params["since"] and f.until == dirty.until
            # The raw facts' part is read here unless the shared one stands in for it.
            params |= {"dim": dim, "key": key, "per_bucket": per_bucket}
            whole = [] if per_bucket else _whole_months(params["since"], params["until"])
            if whole and (hi <= whole[0] or lo >= _next(whole[-1], "month")):  # no dirty hour in them
                params |= {"whole_since": whole[0], "whole_until": _next(whole[-1], "month")}
            else:
                params |= {"whole_since": params["since"], "whole_until": params["since"]}
            params["fact_until"] = params["raw_since"] if shared else params["raw_until"]
            found = list(cur.execute(CUBES[by], params).fetchall())
            if shared:
                assert dirty is not None
                return _with_dirty(found, dirty, f, by, dim, key, per_bucket)
            return found
        rows = list(cur.execute(SERIES[by], params).fetchall())
    if per_bucket:
        return rows
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        m = merged.setdefault((r["key"], r["kind"]), {**r, "bucket": None, **dict.fromkeys(_MEASURES, 0)})
        for k in _MEASURES:
            m[k] += r[k]
    return list(merged.values())


_MEASURES = ("n", "human", "uniq", "latency_ms_sum", "latency_n")


def _whole_months(since: datetime, until: datetime) -> list[datetime]:
    """The starts of the months that lie wholly in [since, until)."""
    month = _floor(since, "month")
    if month < since:
        month = _next(month, "month")
    out = []
    while _next(month, "month") <= until:
        out.append(month)
        month = _next(month, "month")
    return out


# What people read: the kinds of the counters, in the order tables show them.
HEADLINE = ("sent", "delivered", "deferred", "failed", "bounced", "complained", "replied", "opened", "clicked")


def headline(c: dict[str, int]) -> dict[str, int]:
    """The columns of `mailflow stats`: the dashboard's cards (counters.cards), opens and clicks
    as their unique human counts."""
    k = cards(c)
    return {**{name: k[name] for name in HEADLINE[:-2]}, "opened": k["opened_unique"], "clicked": k["clicked_unique"]}


@dataclass(frozen=True)
class Summary:
    by: Bucket
    since: datetime
    until: datetime
    totals: dict[str, int]
    buckets: list[tuple[datetime, dict[str, int]]]

    @property
    def latency_ms_avg(self) -> float | None:
        n = self.totals.get("latency_n", 0)
        return self.totals.get("latency_ms_sum", 0) / n if n else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "totals": {**headline(self.totals), "counters": self.totals},
            "delivered_latency_ms_avg": self.latency_ms_avg,
            "buckets": [{"start": b.isoformat(), **headline(c)} for b, c in self.buckets],
        }


def summary(conn: psycopg.Connection, f: Filter, by: Bucket = "hour", dirty: DirtyFacts | None = None) -> Summary:
    """Totals and per-bucket counters over the filter (every bucket of the range, empty ones too)."""
    rows = series(conn, f, by=by, dirty=dirty)
    per: dict[datetime, list[dict[str, Any]]] = {}
    for r in rows:
        per.setdefault(r["bucket"], []).append(r)
    start = _floor(f.since, by)
    buckets: list[tuple[datetime, dict[str, int]]] = []
    b = start
    while b < f.until and len(buckets) < 10_000:
        buckets.append((b, counters(per.get(b, []))))
        b = _next(b, by)
    return Summary(by, start, f.until, counters(rows), buckets)


def _next(b: datetime, by: Bucket) -> datetime:
    if by == "hour":
        return b + timedelta(hours=1)
    if by == "day":
        return b + timedelta(days=1)
    return (b.replace(day=28) + timedelta(days=4)).replace(day=1)
