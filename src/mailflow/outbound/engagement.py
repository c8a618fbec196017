"""Outbound room: opens and clicks of sent messages - judged (mail/tracking.py) and recorded on the job's stream.

The thin shell behind the tracking URLs (web/tracking.py): it records MessageOpened or
LinkClicked, with the verdict of mail/tracking.py, for the tenant the signed token names, on
that tenant's job only (row-level security: another tenant's job is not found, and nothing is
recorded). A message's clicks are judged one at a time under the job row's lock, each seeing
the ones before it, so a scanner following every link at once is recognised. No address, no
IP address, no user agent and no URL is recorded: only the job, the link index and the verdict.
"""

from __future__ import annotations

from psycopg.rows import dict_row

from mailflow.consumers import inline
from mailflow.events.envelope import Metadata
from mailflow.events.store import EventStore
from mailflow.mail.tracking import SentToken, Verdict, classify_click
from mailflow.outbound import queries as q
from mailflow.outbound import streams
from mailflow.outbound.events import LinkClicked, MessageOpened

ACTOR = "tracking"


def record_open(store: EventStore, sent: SentToken, verdict: Verdict) -> bool:
    """Record the pixel fetch; False if the token's tenant has no such job."""
    tok = store.for_tenant(sent.token.tenant)
    with inline.writing(tok) as w, w.conn.cursor(row_factory=dict_row) as cur:
        job = cur.execute(q.LOCK_TRACKED_JOB, (sent.token.job_id,)).fetchone()
        if job is None:
            return False
        event = MessageOpened(job_id=str(sent.token.job_id), machine=verdict.machine, reason=verdict.reason)
        md = Metadata(correlation_id=job["correlation_id"], actor=ACTOR)
        w.record([(streams.job(sent.token.job_id), event.to_new(md))])
    return True


def record_click(
    store: EventStore, sent: SentToken, *, user_agent: str | None, ip: str | None, now: float
) -> Verdict | None:
    """Judge the click against the message's earlier clicks and record it; None if the token's
    tenant has no such job. `ip` and `user_agent` decide the verdict and are not kept."""
    assert sent.token.link is not None, "a click names its link"
    tok = store.for_tenant(sent.token.tenant)
    stream = streams.job(sent.token.job_id)
    with inline.writing(tok) as w, w.conn.cursor(row_factory=dict_row) as cur:
        job = cur.execute(q.LOCK_TRACKED_JOB, (sent.token.job_id,)).fetchone()
        if job is None:
            return None
        # Read after taking the lock: every earlier click of the message has committed.
        earlier = [
            (int(env.data["link"]), env.recorded_at.timestamp() - sent.sent_at)
            for env in tok.read_stream(stream)
            if env.type == "LinkClicked"
        ]
        verdict = classify_click(
            user_agent, ip, sent.seconds_since_sent(now), earlier, sent.links, link=sent.token.link
        )
        event = LinkClicked(
            job_id=str(sent.token.job_id), link=sent.token.link, machine=verdict.machine, reason=verdict.reason
        )
        w.record([(stream, event.to_new(Metadata(correlation_id=job["correlation_id"], actor=ACTOR)))])
    return verdict
