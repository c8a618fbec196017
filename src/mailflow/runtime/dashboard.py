"""Runtime room: the dashboard's numbers - one snapshot of a tenant's counters, charts, queues and
deliverability warnings, read in one go (the page's first paint, each WebSocket catch-up, and
bench/analytics.py's `dashboard_p99_ms`).

Everything is read on the caller's connection, whose scope decides whose numbers they are: a
tenant's connection sees only its own facts, aggregates, jobs and domains (row-level security).
Counters are the one definition of projectors/analytics.counters: a message is sent once
however many attempts it took, opens and clicks are human ones with their unique counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg

from mailflow.outbound.jobs import SLA_SECONDS, Priority
from mailflow.projectors import analytics
from mailflow.projectors.counters import cards
from mailflow.runtime import queries as q
from mailflow.runtime.queries import rows

Range = Literal["24h", "7d", "30d", "90d"]
RANGES: dict[str, timedelta] = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}
SERIES_KINDS = ("sent", "delivered", "bounced", "complained", "replied", "opened_unique", "clicked_unique")
BREAKDOWN_ROWS = 200  # per dimension, most sent first (the page shows 20)


@dataclass(frozen=True)
class Thresholds:
    """Deliverability warnings over the last 24 h, per sender, once it sent `min_sent` messages.
    Complaints: mailbox providers ask senders to stay under 0.1% and act from 0.3% (Gmail's and
    Yahoo's 2024 bulk-sender rules); bounces: over 5% a list needs cleaning, over 10% it hurts."""

    min_sent: int = 20
    bounce_warning: float = 0.05
    bounce_critical: float = 0.10
    complaint_warning: float = 0.001
    complaint_critical: float = 0.003


def by_of(window: analytics.Filter) -> analytics.Bucket:
    """Breakdowns over up to two days are read by the hour (exact edges), longer ones by the day."""
    return "hour" if window.until - window.since <= timedelta(days=2) else "day"


def _epoch(t: datetime) -> int:
    return int(t.timestamp())


def snapshot(
    conn: psycopg.Connection,
    tenant: str,
    *,
    by: analytics.Bucket = "hour",
    range_: str = "24h",
    now: datetime | None = None,
    thresholds: Thresholds = Thresholds(),
) -> dict[str, Any]:
    """The page's data (the contract is in docs/analytics.md): on the tenant's connection."""
    if range_ not in RANGES:
        raise ValueError(f"range {range_!r}: use one of {', '.join(RANGES)}")
    now = now or datetime.now(UTC)
    until = now + timedelta(seconds=1)
    window = analytics.Filter(now - RANGES[range_], until)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    day = analytics.Filter(now - timedelta(hours=24), until)
    # The dirty hours' raw facts (the current hour at least, busy or not) are read once for
    # every read below, not scanned by each.
    dirty = analytics.dirty_facts(conn, min(window.since, midnight, day.since), until)
    got = analytics.summary(conn, window, by, dirty)
    today = cards(analytics.counters(analytics.series(conn, analytics.Filter(midnight, until), dirty=dirty)))
    breakdowns = {g: breakdown(conn, window, g, dirty) for g in ("campaign", "sender", "domain")}
    # The warnings look at the last 24 h by sender: the 24h view's own breakdown, read once.
    senders = breakdowns["sender"] if window == day else None
    return {
        "type": "snapshot",
        "tenant": tenant,
        "generated_at": _epoch(now),
        "by": by,
        "range": range_,
        "counters": cards(got.totals),
        "today": today,
        "per_minute": per_minute(conn, now),
        "queues": queues(conn),
        "series": {
            "t": [_epoch(b) for b, _ in got.buckets],
            **{k: [cards(c)[k] for _, c in got.buckets] for k in SERIES_KINDS},
        },
        "breakdowns": breakdowns,
        "warnings": warnings(conn, day, thresholds, senders=senders, dirty=dirty),
    }


def per_minute(conn: psycopg.Connection, now: datetime) -> dict[str, list[int]]:
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=59)
    found = {r["minute"]: r for r in rows(conn, q.DASHBOARD_MINUTES, {"since": start})}
    minutes = [start + timedelta(minutes=i) for i in range(60)]
    out: dict[str, list[int]] = {"t": [_epoch(m) for m in minutes]}
    for k in ("sent", "delivered", "bounced"):
        out[k] = [int(found[m][k]) if m in found else 0 for m in minutes]
    return out


def queues(conn: psycopg.Connection) -> list[dict[str, Any]]:
    found = {r["priority"]: r for r in rows(conn, q.DASHBOARD_QUEUES)}
    out = []
    for p in Priority:
        r = found.get(str(p), {})
        oldest = float(r["oldest_s"]) if r.get("oldest_s") is not None else 0.0
        sla = SLA_SECONDS[p]
        out.append(
            {
                "priority": str(p),
                "depth": int(r.get("depth", 0)),
                "oldest_s": round(oldest, 1),
                "sla_s": sla,
                "breached": oldest > sla,
            }
        )
    return out


def breakdown(
    conn: psycopg.Connection,
    window: analytics.Filter,
    group: analytics.Group,
    dirty: analytics.DirtyFacts | None = None,
) -> list[dict[str, Any]]:
    per: dict[str, list[dict[str, Any]]] = {}
    for r in analytics.series(conn, window, by=by_of(window), group=group, per_bucket=False, dirty=dirty):
        per.setdefault(r["key"], []).append(r)
    names: dict[str, str] = {}
    if group == "campaign":
        ids = [k for k in per if k]
        names = {r["id"]: r["name"] for r in rows(conn, q.DASHBOARD_CAMPAIGN_NAMES, {"ids": ids})} if ids else {}
    out: list[dict[str, Any]] = []
    for key, found in per.items():
        c = cards(analytics.counters(found))
        label = names.get(key, key) if group == "campaign" else key
        if not key:
            label = {"campaign": "(transactional)", "sender": "(none)", "domain": "(none)"}[group]
        out.append(
            {
                "key": key,
                "label": label,
                **{
                    k: c[k]
                    for k in (
                        "sent",
                        "delivered",
                        "bounced",
                        "complained",
                        "replied",
                        "opened_unique",
                        "clicked_unique",
                    )
                },
            }
        )
    out.sort(key=lambda r: (-r["sent"], r["label"]))
    return out[:BREAKDOWN_ROWS]


def warnings(
    conn: psycopg.Connection,
    day: analytics.Filter,
    t: Thresholds = Thresholds(),
    *,
    senders: list[dict[str, Any]] | None = None,
    dirty: analytics.DirtyFacts | None = None,
) -> list[dict[str, str]]:
    """Senders over the bounce or complaint thresholds in the last 24 h; sending domains whose DNS
    records do not pass. Critical first."""
    out = []
    for s in senders if senders is not None else breakdown(conn, day, "sender", dirty):
        if not s["key"] or s["sent"] < t.min_sent:
            continue
        bounce = s["bounced"] / s["sent"]
        complaint = s["complained"] / max(s["delivered"], 1)
        for kind, rate, warn, crit in (
            ("bounce_rate", bounce, t.bounce_warning, t.bounce_critical),
            ("complaint_rate", complaint, t.complaint_warning, t.complaint_critical),
        ):
            if rate >= warn:
                level = "critical" if rate >= crit else "warning"
                limit = crit if level == "critical" else warn
                what = kind.replace("_", " ")
                out.append(
                    {
                        "level": level,
                        "kind": kind,
                        "subject": f"sender {s['key']}",
                        "message": f"{what} {rate:.2%} over the last 24 h (threshold {limit:.2%})",
                    }
                )
    for r in rows(conn, q.DASHBOARD_DOMAIN_TROUBLE):
        failing = r["status"] == "failing"
        out.append(
            {
                "level": "critical" if failing else "warning",
                "kind": "dns",
                "subject": r["domain"],
                "message": "a required DNS record is missing or wrong (mailflow sending-domains check)"
                if failing
                else "DNS records not verified yet (publish them, then mailflow sending-domains check)",
            }
        )
    out.sort(key=lambda w: w["level"] != "critical")
    return out
