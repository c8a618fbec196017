"""Projectors room: event_counts, the number of events per type per UTC hour.

Read by `mailflow events stats`. Counts of a batch are summed in memory and written with
one upsert, which is what lets a rebuild run at tens of thousands of events a second.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import psycopg

from mailflow.consumers.projection import Projection
from mailflow.events.envelope import Envelope

UPSERT = """
INSERT INTO event_counts (tenant, type, hour, count)
SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::bigint[])
ON CONFLICT (tenant, type, hour) DO UPDATE SET count = event_counts.count + excluded.count
"""

# Subtract what events in [from, upto] added, except those still open in the DLQ
# (they were never applied).
UNDO = """
UPDATE event_counts c SET count = c.count - d.n
FROM (
    SELECT e.tenant, e.type, date_trunc('hour', e.recorded_at, 'UTC') AS hour, count(*) AS n
    FROM event_positions p JOIN events e ON e.seq = p.seq
    WHERE p.position BETWEEN %(from)s AND %(upto)s
      AND NOT EXISTS (
          SELECT 1 FROM dead_letters dl
          WHERE dl.consumer = %(name)s AND dl.position = p.position AND dl.status = 'open')
    GROUP BY 1, 2, 3
) d
WHERE c.tenant = d.tenant AND c.type = d.type AND c.hour = d.hour
"""

STATS = """
SELECT type, sum(count)::bigint AS total,
       sum(count) FILTER (WHERE hour >= date_trunc('hour', now(), 'UTC') - interval '23 hours')::bigint,
       max(hour)
FROM event_counts
WHERE count > 0
GROUP BY type
ORDER BY total DESC, type
"""

HOURLY = """
SELECT hour, type, count FROM event_counts
WHERE count > 0 AND hour >= %s
ORDER BY hour, type
"""


def hour_of(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


class EventCounts(Projection):
    name = "event_counts"
    description = "events per type per hour (mailflow events stats)"

    def apply(self, conn: psycopg.Connection, events: list[Envelope]) -> None:
        counts = Counter((e.metadata.tenant or "", e.type, hour_of(e.recorded_at)) for e in events)
        tenants, types, hours, ns = [], [], [], []
        for (tenant, etype, hour), n in counts.items():
            tenants.append(tenant)
            types.append(etype)
            hours.append(hour)
            ns.append(n)
        conn.execute(UPSERT, (tenants, types, hours, ns))

    def reset(self, conn: psycopg.Connection, from_position: int, applied_upto: int) -> None:
        if from_position <= 1:
            conn.execute("DELETE FROM event_counts")
        elif from_position <= applied_upto:
            conn.execute(UNDO, {"from": from_position, "upto": applied_upto, "name": self.name})
            conn.execute("DELETE FROM event_counts WHERE count = 0")


def stats(conn: psycopg.Connection) -> list[dict[str, object]]:
    rows = conn.execute(STATS).fetchall()
    return [
        {"type": t, "total": int(total), "last_24h": int(day or 0), "last_hour": last.isoformat()}
        for t, total, day, last in rows
    ]


def hourly(conn: psycopg.Connection, since: datetime) -> list[dict[str, object]]:
    return [
        {"hour": h.isoformat(), "type": t, "count": int(n)} for h, t, n in conn.execute(HOURLY, (since,)).fetchall()
    ]
