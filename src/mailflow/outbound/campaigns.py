"""Outbound room: campaigns - draft -> scheduled -> running -> paused -> completed | cancelled.

Starting a campaign snapshots its recipients: one job per active, unsuppressed contact of
the segment at that moment, all created in the transaction that records CampaignStarted.
Later sign-ups are not included; contacts who unsubscribe or get suppressed before their
job is sent are skipped at send time. Starting twice, or retrying a start, never creates
duplicate jobs (the campaign row is locked and its status checked in that transaction).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..errors import MailflowError, NotFoundError
from ..events.envelope import Metadata, uuid7
from ..events.store import EventStore
from ..projectors import catalog, inline
from ..projectors import jobs as jobs_projection
from . import queries as q
from . import segments, templates
from .events import (
    CampaignCancelled,
    CampaignCompleted,
    CampaignCreated,
    CampaignPaused,
    CampaignResent,
    CampaignResumed,
    CampaignScheduled,
    CampaignStarted,
    JobCreated,
)
from .jobs import Priority
from .sending import load_sender

STATUSES = ("draft", "scheduled", "running", "paused", "completed", "cancelled")


class CampaignError(MailflowError):
    exit_code = 2


@dataclass(frozen=True)
class Campaign:
    id: str
    name: str
    sender: str
    template: str
    segment: str
    status: str


def find(conn: psycopg.Connection, ref: str) -> str:
    """A campaign id from an id or a name (the newest campaign of that name)."""
    rows = conn.execute(q.FIND_CAMPAIGN, (ref, ref)).fetchall()
    if not rows:
        raise NotFoundError(f"no campaign {ref!r} (see `mailflow campaigns list`)")
    return str(rows[0][0])


def create(store: EventStore, *, name: str, sender: str, template: str, segment: str) -> str:
    with store.pool.connection() as conn:
        load_sender(conn, sender)
        templates.load(conn, template)
        segments.load(conn, segment)
    campaign_id = str(uuid7())
    event = CampaignCreated(campaign_id=campaign_id, name=name, sender=sender, template=template, segment=segment)
    catalog.record(store, [(f"campaign-{campaign_id}", event.to_new())])
    return campaign_id


def _locked(conn: psycopg.Connection, campaign_id: str) -> Campaign:
    row = conn.execute(q.LOCK_CAMPAIGN, (campaign_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no campaign {campaign_id}")
    return Campaign(str(row[0]), *row[1:])


def _transition(store: EventStore, campaign_id: str, allowed: tuple[str, ...], event_for, verb: str) -> Campaign:
    with inline.writing(store) as conn:
        c = _locked(conn, campaign_id)
        if c.status not in allowed:
            raise CampaignError(f"campaign {c.name!r} is {c.status}; it cannot be {verb}")
        envs = store.append_many([(f"campaign-{c.id}", event_for(c, conn).to_new())], conn=conn)
        catalog.apply(conn, envs)
    store.notify()
    return c


def schedule(store: EventStore, campaign_id: str, at: datetime) -> None:
    _transition(store, campaign_id, ("draft", "scheduled"), lambda c, _: CampaignScheduled(campaign_id=c.id, at=at.isoformat()), "scheduled")


def start(store: EventStore, campaign_id: str, batch: int = 2000) -> int:
    """Snapshot the recipients and create their jobs; returns how many (0 if already started)."""
    metadata = Metadata(correlation_id=f"campaign-{campaign_id}")
    with inline.writing(store) as conn:
        c = _locked(conn, campaign_id)
        if c.status in ("running", "paused", "completed"):
            return 0  # started before: starting again changes nothing
        if c.status == "cancelled":
            raise CampaignError(f"campaign {c.name!r} was cancelled; create a new one")
        doc = segments.load(conn, c.segment)
        compiled = segments.compile_filter(doc)
        emails = [e for (e,) in conn.execute(sql.SQL(q.SNAPSHOT_RECIPIENTS).format(where=compiled.where), compiled.params)]
        for i in range(0, len(emails), batch):
            created = [
                JobCreated(
                    job_id=str(uuid7()), idempotency_key=f"campaign:{c.id}:{email}", priority=str(Priority.NORMAL),
                    email=email, sender=c.sender, template=c.template, campaign_id=c.id,
                )
                for email in emails[i : i + batch]
            ]
            envs = store.append_many([(f"job-{j.job_id}", j.to_new(metadata)) for j in created], conn=conn)
            jobs_projection.apply(conn, envs)
        envs = store.append_many(
            [(f"campaign-{c.id}", CampaignStarted(campaign_id=c.id, recipients=len(emails)).to_new(metadata))], conn=conn
        )
        catalog.apply(conn, envs)
    store.notify()
    if len(emails) >= 10_000:
        # A big snapshot changes the jobs table's shape at once; without fresh statistics the
        # planner picks poor plans for the queuer and workers until autovacuum catches up.
        with store.pool.connection() as conn:
            conn.execute("ANALYZE jobs")
    return len(emails)


def pause(store: EventStore, campaign_id: str) -> None:
    _transition(store, campaign_id, ("running",), lambda c, _: CampaignPaused(campaign_id=c.id), "paused")


def resume(store: EventStore, campaign_id: str) -> None:
    _transition(store, campaign_id, ("paused",), lambda c, _: CampaignResumed(campaign_id=c.id), "resumed")


def cancel(store: EventStore, campaign_id: str) -> None:
    def event(c: Campaign, conn: psycopg.Connection) -> CampaignCancelled:
        counts = dict(conn.execute(q.CAMPAIGN_JOB_STATES, (c.id,)).fetchall())
        unsent = sum(n for s, n in counts.items() if s in ("pending", "retry"))
        return CampaignCancelled(campaign_id=c.id, unsent=unsent)

    _transition(store, campaign_id, ("draft", "scheduled", "running", "paused"), event, "cancelled")


def resend_failed(store: EventStore, campaign_id: str) -> int:
    """New jobs for recipients whose last job failed for a reason worth retrying."""
    with inline.writing(store) as conn:
        c = _locked(conn, campaign_id)
        if c.status not in ("running", "paused", "completed"):
            raise CampaignError(f"campaign {c.name!r} is {c.status}; only started campaigns can resend")
        emails = [e for e, _ in conn.execute(q.FAILED_TO_RESEND, (c.id,)).fetchall()]
        if not emails:
            return 0
        resend = uuid.uuid4().hex[:8]
        created = [
            JobCreated(
                job_id=str(uuid7()), idempotency_key=f"campaign:{c.id}:{email}:resend:{resend}",
                priority=str(Priority.NORMAL), email=email, sender=c.sender, template=c.template, campaign_id=c.id,
            )
            for email in emails
        ]
        envs = store.append_many([(f"job-{j.job_id}", j.to_new()) for j in created], conn=conn)
        jobs_projection.apply(conn, envs)
        envs = store.append_many([(f"campaign-{c.id}", CampaignResent(campaign_id=c.id, jobs=len(emails)).to_new())], conn=conn)
        catalog.apply(conn, envs)
    store.notify()
    return len(emails)


def complete_finished(store: EventStore) -> int:
    """Mark running campaigns whose every job has finished as completed (the queuer calls this)."""
    with inline.writing(store) as conn:
        rows = conn.execute(q.FINISHED_CAMPAIGNS).fetchall()
        if not rows:
            return 0
        events = [(f"campaign-{cid}", CampaignCompleted(campaign_id=str(cid), completed=done, failed=failed).to_new())
                  for cid, done, failed in rows]
        envs = store.append_many(events, conn=conn)
        catalog.apply(conn, envs)
    store.notify()
    return len(rows)


def start_due(store: EventStore) -> int:
    """Start scheduled campaigns whose time has come (the queuer calls this)."""
    with store.pool.connection() as conn:
        due = [str(r[0]) for r in conn.execute(q.DUE_SCHEDULED).fetchall()]
    for cid in due:
        start(store, cid)
    return len(due)


def status(conn: psycopg.Connection, campaign_id: str) -> dict[str, Any]:
    row = conn.execute(q.LOCK_CAMPAIGN.replace(" FOR UPDATE", ""), (campaign_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no campaign {campaign_id}")
    states = {s: 0 for s in ("pending", "queued", "active", "retry", "completed", "failed")}
    states.update({s: int(n) for s, n in conn.execute(q.CAMPAIGN_JOB_STATES, (campaign_id,)).fetchall()})
    failures = [
        {"kind": k or "unknown", "count": int(n), "example": reply}
        for k, n, reply in conn.execute(q.CAMPAIGN_FAILURES, (campaign_id,)).fetchall()
    ]
    retries = int(conn.execute(q.CAMPAIGN_RETRIES, (campaign_id,)).fetchone()[0])
    return {
        "id": str(row[0]), "name": row[1], "sender": row[2], "template": row[3], "segment": row[4],
        "status": row[5], "jobs": states, "total": sum(states.values()), "retries": retries, "failures": failures,
    }
