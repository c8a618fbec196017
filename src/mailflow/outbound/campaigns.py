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
from psycopg.rows import class_row, dict_row

from mailflow.consumers import inline
from mailflow.errors import ConflictError, NotFoundError, UserError
from mailflow.events.envelope import Metadata, uuid7
from mailflow.events.store import EventStore
from mailflow.infra import personal
from mailflow.infra.services import scalar
from mailflow.mail.addresses import domain_of
from mailflow.outbound import queries as q
from mailflow.outbound import segments, streams, templates
from mailflow.outbound.events import (
    CampaignCancelled,
    CampaignCompleted,
    CampaignCreated,
    CampaignPaused,
    CampaignResent,
    CampaignResumed,
    CampaignScheduled,
    CampaignStarted,
    JobCreated,
    JobFailed,
)
from mailflow.outbound.jobs import Priority
from mailflow.outbound.sending import load_sender

STATUSES = ("draft", "scheduled", "running", "paused", "completed", "cancelled")


class CampaignError(ConflictError):
    """The campaign's status refuses the request (started twice, cancelled, not started)."""


class EmptySegment(UserError):
    """A campaign cannot start: its segment matches no one who may be sent to."""


@dataclass(frozen=True)
class Campaign:
    id: str
    name: str
    sender: str
    template: str
    segment: str
    status: str


def correlation(campaign_id: str, tenant: str | None = None) -> Metadata:
    """Every event a campaign causes, its jobs' included, shares this correlation id."""
    return Metadata(correlation_id=streams.campaign(campaign_id), tenant=tenant)


def find(conn: psycopg.Connection, ref: str) -> str:
    """A campaign id from its name, its id, or a unique prefix of its id (as git takes commits)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.FIND_CAMPAIGN, {"ref": ref, "prefix": ref.lower() + "%"}).fetchall()
    exact = [r for r in rows if r["name"] == ref or str(r["id"]) == ref.lower()]
    if exact:
        return str(exact[0]["id"])
    if len(rows) == 1 and len(ref) >= 4:
        return str(rows[0]["id"])
    if len(rows) > 1 and len(ref) >= 4:
        raise UserError(f"{ref!r} is the start of {len(rows)} campaign ids; give more of it")
    raise NotFoundError(f"no campaign {ref!r} (see `mailflow campaigns list`)")


def create(
    store: EventStore,
    *,
    name: str,
    sender: str,
    template: str,
    segment: str,
    stop_on_reply: bool = True,
    tracking: bool | None = None,
) -> str:
    """A draft campaign. With `stop_on_reply` (the default) a contact who replies gets nothing
    more from it (outbound/feedback.py). `tracking`: open and click tracking on or off, None
    for the tenant's default when each message is sent (docs/tracking.md)."""
    if not name.strip():
        raise UserError("a campaign needs a name")
    campaign_id = str(uuid7())
    event = CampaignCreated(
        campaign_id=campaign_id,
        name=name,
        sender=sender,
        template=template,
        segment=segment,
        stop_on_reply=stop_on_reply,
        tracking=tracking,
    )
    with inline.writing(store) as w:
        w.conn.execute(q.LOCK_CAMPAIGN_NAME, (name,))
        w.conn.execute(q.SHARE_CAMPAIGN_PARTS, {"sender": sender, "template": template, "segment": segment})
        load_sender(w.conn, sender)
        templates.load(w.conn, template)
        segments.load(w.conn, segment)
        if w.conn.execute(q.CAMPAIGN_NAMED, (name,)).fetchone() is not None:
            raise ConflictError(f"a campaign named {name!r} exists already; campaign names are unique")
        w.record([(streams.campaign(campaign_id), event.to_new(correlation(campaign_id)))])
    return campaign_id


def _jobs(c: Campaign, tenant: str, recipients: list[tuple[str, str, bytes]], *, key_suffix: str) -> list[JobCreated]:
    """One campaign job per (subject, address, subject key); the idempotency key makes a
    retried start create none twice."""
    return [
        JobCreated(
            job_id=str(uuid7()),
            idempotency_key=f"campaign:{c.id}:{subject}{key_suffix}",
            priority=str(Priority.NORMAL),
            subject=subject,
            domain=domain_of(email),
            sealed=personal.seal(bytes(key), tenant, subject, {"email": email, "variables": {}}),
            sender=c.sender,
            template=c.template,
            campaign_id=c.id,
        )
        for subject, email, key in recipients
    ]


def _tenant_of(store: EventStore, conn: psycopg.Connection, campaign_id: str) -> str:
    if store.tenant is not None:
        return store.tenant
    row = conn.execute(q.CAMPAIGN_TENANT, (campaign_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no campaign {campaign_id}")
    return str(row[0])


def _locked(conn: psycopg.Connection, campaign_id: str) -> Campaign:
    with conn.cursor(row_factory=class_row(Campaign)) as cur:
        c = cur.execute(q.LOCK_CAMPAIGN, (campaign_id,)).fetchone()
    if c is None:
        raise NotFoundError(f"no campaign {campaign_id}")
    return c


def _transition(store: EventStore, campaign_id: str, allowed: tuple[str, ...], events_for, verb: str) -> Campaign:
    with inline.writing(store) as w:
        c = _locked(w.conn, campaign_id)
        if c.status not in allowed:
            raise CampaignError(f"campaign {c.name!r} is {c.status}; it cannot be {verb}")
        w.record(events_for(c, w.conn))
    return c


def _campaign_event(event):
    return lambda c, _conn: [(streams.campaign(c.id), event(c).to_new(correlation(c.id)))]


def schedule(store: EventStore, campaign_id: str, at: datetime) -> None:
    _transition(
        store,
        campaign_id,
        ("draft", "scheduled"),
        _campaign_event(lambda c: CampaignScheduled(campaign_id=c.id, at=at.isoformat())),
        "scheduled",
    )


def start(store: EventStore, campaign_id: str, batch: int = 2000) -> int:
    """Snapshot the recipients and create their jobs; returns how many (0 if already started).

    A segment that matches no one who may be sent to raises EmptySegment and records nothing:
    the campaign stays as it was, to be started once the segment has members."""
    metadata = correlation(campaign_id)
    with inline.writing(store) as w:
        conn = w.conn
        c = _locked(conn, campaign_id)
        if c.status in ("running", "paused", "completed"):
            return 0  # started before: starting again changes nothing
        if c.status == "cancelled":
            raise CampaignError(f"campaign {c.name!r} was cancelled; create a new one")
        doc = segments.load(conn, c.segment)
        compiled = segments.compile_filter(doc)
        emails = conn.execute(sql.SQL(q.SNAPSHOT_RECIPIENTS).format(where=compiled.where), compiled.params).fetchall()
        if not emails:
            raise EmptySegment(
                f"segment {c.segment!r} has no active, unsuppressed contact; campaign {c.name!r} was not started"
            )
        for i in range(0, len(emails), batch):
            created = _jobs(c, _tenant_of(store, conn, c.id), emails[i : i + batch], key_suffix="")
            w.record([(streams.job(j.job_id), j.to_new(metadata)) for j in created])
        w.record([(streams.campaign(c.id), CampaignStarted(campaign_id=c.id, recipients=len(emails)).to_new(metadata))])
    if len(emails) >= 10_000:
        # A big snapshot changes the jobs table's shape at once; without fresh statistics the
        # planner picks poor plans for the queuer and workers until autovacuum catches up.
        with store.pool.connection() as conn:
            conn.execute("ANALYZE jobs")
    return len(emails)


def pause(store: EventStore, campaign_id: str) -> None:
    """Stop queuing the campaign's jobs (those waiting to retry included) until it is resumed."""
    _transition(store, campaign_id, ("running",), _campaign_event(lambda c: CampaignPaused(campaign_id=c.id)), "paused")


def resume(store: EventStore, campaign_id: str) -> None:
    _transition(
        store, campaign_id, ("paused",), _campaign_event(lambda c: CampaignResumed(campaign_id=c.id)), "resumed"
    )


def cancel(store: EventStore, campaign_id: str) -> int:
    """Cancel the campaign; every job of it that has not started (pending, or waiting to
    retry) ends as failed with kind `cancelled`. Returns how many. Jobs already queued or
    being sent finish as they would (a worker refuses a queued job of a cancelled campaign)."""

    ended_count = 0

    def events(c: Campaign, conn: psycopg.Connection) -> list:
        nonlocal ended_count
        md = correlation(c.id)
        unsent = conn.execute(q.UNSENT_CAMPAIGN_JOBS, (c.id,)).fetchall()
        ended_count = len(unsent)
        ended = [
            (
                streams.job(job_id),
                JobFailed(job_id=str(job_id), attempt=attempts, reply="campaign cancelled", kind="cancelled").to_new(
                    md
                ),
            )
            for job_id, attempts in unsent
        ]
        return [*ended, (streams.campaign(c.id), CampaignCancelled(campaign_id=c.id, unsent=len(unsent)).to_new(md))]

    _transition(store, campaign_id, ("draft", "scheduled", "running", "paused"), events, "cancelled")
    return ended_count


def resend_failed(store: EventStore, campaign_id: str) -> int:
    """New jobs for recipients whose last job failed for a reason worth retrying."""
    metadata = correlation(campaign_id)
    with inline.writing(store) as w:
        c = _locked(w.conn, campaign_id)
        if c.status not in ("running", "paused", "completed"):
            raise CampaignError(f"campaign {c.name!r} is {c.status}; only started campaigns can resend")
        emails = w.conn.execute(q.FAILED_TO_RESEND, (c.id,)).fetchall()
        if not emails:
            return 0
        resend = uuid.uuid4().hex[:8]
        created = _jobs(c, _tenant_of(store, w.conn, c.id), emails, key_suffix=f":resend:{resend}")
        w.record([(streams.job(j.job_id), j.to_new(metadata)) for j in created])
        w.record([(streams.campaign(c.id), CampaignResent(campaign_id=c.id, jobs=len(emails)).to_new(metadata))])
    return len(emails)


def complete_finished(store: EventStore) -> int:
    """Mark running campaigns whose every job has finished as completed (the queuer calls this)."""
    with inline.writing(store) as w:
        rows = w.conn.execute(q.FINISHED_CAMPAIGNS).fetchall()
        if rows:
            w.record(
                [
                    (
                        streams.campaign(cid),
                        CampaignCompleted(campaign_id=str(cid), completed=done, failed=failed).to_new(
                            correlation(str(cid), tenant)
                        ),
                    )
                    for cid, tenant, done, failed in rows
                ]
            )
    return len(rows)


def start_due(store: EventStore) -> int:
    """Start scheduled campaigns whose time has come (the queuer calls this)."""
    with store.pool.connection() as conn:
        due = [(str(cid), tenant) for cid, tenant in conn.execute(q.DUE_SCHEDULED).fetchall()]
    started = 0
    for cid, tenant in due:
        try:
            start(store.for_tenant(tenant), cid)
            started += 1
        except EmptySegment:
            continue  # stays scheduled; `campaigns status` says why when asked
    return started


def status(conn: psycopg.Connection, campaign_id: str) -> dict[str, Any]:
    with conn.cursor(row_factory=class_row(Campaign)) as cur:
        c = cur.execute(q.GET_CAMPAIGN, (campaign_id,)).fetchone()
    if c is None:
        raise NotFoundError(f"no campaign {campaign_id}")
    states = dict.fromkeys(("pending", "queued", "active", "retry", "completed", "failed"), 0)
    states.update({s: int(n) for s, n in conn.execute(q.CAMPAIGN_JOB_STATES, (campaign_id,)).fetchall()})
    failures = [
        {"kind": k or "unknown", "count": int(n), "example": reply}
        for k, n, reply in conn.execute(q.CAMPAIGN_FAILURES, (campaign_id,)).fetchall()
    ]
    retries = int(scalar(conn, q.CAMPAIGN_RETRIES, (campaign_id,)))
    return {
        "id": c.id,
        "name": c.name,
        "sender": c.sender,
        "template": c.template,
        "segment": c.segment,
        "status": c.status,
        "jobs": states,
        "total": sum(states.values()),
        "retries": retries,
        "failures": failures,
    }
