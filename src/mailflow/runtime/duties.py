"""Runtime room: the duties a worker runs for jobs that are not emails, by kind.

Scheduled from the periodic table (outbound/periodic.py) and run by `mailflow worker` from the
low queue with the same states, leases and retries as mail; each returns one line saying what
it did, which becomes its JobCompleted's reply (`mailflow jobs show`). A duty that raises is
retried on the retry schedule. Every duty is safe to run twice or at the same time as itself:

- aggregate: every dirty hour is aggregated, the current one so far too (projectors/analytics.py);
- cleanup: retention - the facts' day partitions made ahead and dropped past
  MAILFLOW_ANALYTICS_RETENTION_DAYS, their bookkeeping, browser sessions ended a week ago
  (the API deletes its own expired Idempotency-Keys; the relay trims the Redis stream as it
  writes, and workers delete the job entries they acknowledge);
- dns_check: the sending domains whose DNS records are due a re-check (outbound/domains.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailflow.config import Settings
from mailflow.events.store import EventStore
from mailflow.outbound import domains
from mailflow.projectors import analytics
from mailflow.tenants import users

Duty = Callable[[dict[str, Any]], str]


def duties(store: EventStore, settings: Settings) -> dict[str, Duty]:
    """The duty table of a worker whose store is an operator's (duties belong to no tenant)."""

    def aggregate(args: dict[str, Any]) -> str:
        done = analytics.aggregate(store.pool.connection)
        left = f", {done.left_dirty} still filling or changed meanwhile (next run)" if done.left_dirty else ""
        return f"aggregated {done.hours} hour(s) into {done.rows} row(s) in {done.seconds:.1f} s{left}"

    def cleanup(args: dict[str, Any]) -> str:
        with store.pool.connection() as conn, conn.transaction():
            kept = analytics.maintain(conn, retention_days=settings.analytics_retention_days)
            sessions = users.forget_ended_sessions(conn)
        deleted = ", ".join(f"{n} {name}" for name, n in kept.rows_deleted.items() if n)
        return (
            f"partitions: {kept.partitions_made} made, {kept.partitions_dropped} dropped; "
            f"deleted {deleted or 'no old rows'}; {sessions} ended session(s) forgotten"
        )

    def dns_check(args: dict[str, Any]) -> str:
        checked = domains.recheck_due(
            store,
            domains.Resolver.from_settings(settings),
            interval_s=settings.domain_check_interval_s,
            settings=settings,
        )
        return f"checked {checked} sending domain(s)"

    return {"aggregate": aggregate, "cleanup": cleanup, "dns_check": dns_check}
