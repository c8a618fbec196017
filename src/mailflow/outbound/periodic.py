"""Outbound room: periodic duties - the periodic table's due rows become jobs of their kind.

The seed's low priority ("analytics, cleanup") is real work in the same job table and queues
as mail: a duty is a JobCreated of kind `aggregate`, `cleanup`, `dns_check`, ... under the
`_system` tenant (no tenant id can be that: infra/tenancy.check_tenant_id), queued, leased,
retried and reported against its priority's SLA like any job. What runs it is the worker's
table of duties (runtime/duties.py).

When each duty is next due is kept in PostgreSQL (`periodic.next_due`), never in a process's
memory: the queuer's leader calls `schedule_due` about once a second; a due row becomes a job
with the idempotency key `periodic:<name>:<due>` and its next_due moves past now, in one
transaction (rows are locked, so two leaders in a split second still make one job). A duty
whose last job has not ended yet is not scheduled again: its next run waits for the next
period (a worker outage does not pile up a day of hourly jobs).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mailflow.consumers import inline
from mailflow.events.envelope import Metadata
from mailflow.events.store import EventStore
from mailflow.log import get_logger
from mailflow.outbound import queries as q
from mailflow.outbound import streams
from mailflow.outbound.events import JobCreated

SYSTEM_TENANT = "_system"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
log = get_logger("mailflow.periodic")


def next_due(now: datetime, every: timedelta, delay: timedelta = timedelta(0)) -> datetime:
    """The first time after `now` that is `delay` past the start of a period (periods are
    counted from the Unix epoch in UTC, so an hourly duty with a 2-minute delay runs at :02)."""
    if every <= timedelta(0):
        raise ValueError("a period must be positive")
    periods = (now - EPOCH - delay) // every + 1
    return EPOCH + periods * every + delay


@dataclass(frozen=True)
class Scheduled:
    name: str
    kind: str
    job_id: str | None  # None: skipped, its last job is still running
    due: datetime
    next_due: datetime


def schedule_due(store: EventStore, now: datetime | None = None) -> list[Scheduled]:
    """Turn every due duty into a job (an operator's store: duties belong to no tenant)."""
    now = now or datetime.now(UTC)
    out: list[Scheduled] = []
    with inline.writing(store) as w:
        rows = w.conn.execute(q.DUE_PERIODIC, (now,)).fetchall()
        if not rows:
            return out
        created = []
        for name, kind, priority, every, delay, args, due, running in rows:
            following = next_due(now, every, delay)
            job_id = None if running else str(uuid.uuid4())
            w.conn.execute(q.SET_PERIODIC_NEXT, (following, job_id, due, name))
            out.append(Scheduled(name, kind, job_id, due, following))
            if job_id is None:
                log.warning(
                    "periodic.still_running", duty=name, detail="its last job has not ended; not scheduled again"
                )
                continue
            created.append(
                (
                    streams.job(job_id),
                    JobCreated(
                        job_id=job_id,
                        idempotency_key=f"periodic:{name}:{due.isoformat()}",
                        priority=priority,
                        kind=kind,
                        args={**(args or {}), "duty": name, "due": due.isoformat()},
                    ).to_new(Metadata(correlation_id=f"periodic-{name}", tenant=SYSTEM_TENANT)),
                )
            )
        if created:
            w.record(created)
    return out
