"""Outbound room: jobs - the state graph, and the jobs table that enforces it as it is written.

pending -> queued -> active -> completed | failed | retry, and retry -> queued when due;
a job that never started (pending, or waiting to retry) may also end as failed when its
campaign is cancelled. Each transition is an event, applied to the jobs table by the
transaction that appends it (an inline projection, see consumers/inline.py). The table's
UPDATE statements only touch a job in a state the graph allows to make that move, at the
attempt the event names; any job left untouched raises IllegalTransition, which rolls the
whole write back. So the graph is enforced where the write happens, for every writer.

Timestamps come from the events (recorded_at), never from the clock at apply time, so a
rebuild gives the same table. Consecutive events of one type are applied with one
set-based statement: moving a thousand jobs costs a handful of statements.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

import orjson
import psycopg

from mailflow.consumers.inline import InlineProjection, register
from mailflow.errors import ConflictError
from mailflow.events.envelope import Envelope
from mailflow.infra import personal


class JobState(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    RETRY = "retry"


class Priority(StrEnum):
    """high = transactional (SLA 30 s), normal = campaign (5 min), low = analytics/cleanup (1 h)."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


SLA_SECONDS: dict[Priority, float] = {Priority.HIGH: 30.0, Priority.NORMAL: 300.0, Priority.LOW: 3600.0}

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.QUEUED, JobState.FAILED}),  # failed: cancelled before it started
    JobState.QUEUED: frozenset({JobState.ACTIVE}),
    JobState.ACTIVE: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.RETRY}),
    JobState.RETRY: frozenset({JobState.QUEUED, JobState.FAILED}),  # failed: cancelled while waiting
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
}

TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED})


def sources(target: JobState) -> list[str]:
    """The states from which a job may move to `target`."""
    return sorted(str(s) for s, targets in ALLOWED.items() if target in targets)


class IllegalTransition(ConflictError):
    def __init__(self, job_id: str, current: str | None, target: JobState, count: int = 1) -> None:
        more = f" (and {count - 1} more)" if count > 1 else ""
        where = "does not exist" if current is None else f"cannot go from {current} to {target}"
        super().__init__(f"job {job_id} {where}{more}")
        self.job_id = job_id
        self.current = current
        self.target = target


# -- the jobs table --------------------------------------------------------------------------

CREATE = """
INSERT INTO jobs (id, tenant, idempotency_key, priority, subject, email, domain, sender, template, variables,
                  campaign_id, due_at, created_at, correlation_id, kind, args)
SELECT u.id, u.tenant, u.key, u.priority, u.subject, u.email, u.domain, u.sender, u.template, u.variables,
       u.campaign_id, coalesce(u.due_at, u.at), u.at, u.correlation, u.kind, u.args
FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
            %b::text[], %b::text[]::jsonb[], %b::uuid[], %b::timestamptz[], %b::timestamptz[], %b::text[],
            %b::text[], %b::text[]::jsonb[])
     AS u(id, tenant, key, priority, subject, email, domain, sender, template, variables, campaign_id, due_at, at,
          correlation, kind, args)
ON CONFLICT (id) DO NOTHING
"""

QUEUED = """
UPDATE jobs SET state = 'queued', queue_seq = u.seq, queued_at = u.at, lease_until = NULL, worker = NULL
FROM unnest(%(ids)s::uuid[], %(seqs)s::bigint[], %(ats)s::timestamptz[]) AS u(id, seq, at)
WHERE jobs.id = u.id AND jobs.state = ANY(%(from)s::text[])
RETURNING jobs.id
"""

STARTED = """
UPDATE jobs SET state = 'active', attempts = u.attempt, worker = u.worker, lease_until = u.lease,
       started_at = u.at
FROM unnest(%(ids)s::uuid[], %(attempts)s::int[], %(workers)s::text[], %(leases)s::timestamptz[],
            %(ats)s::timestamptz[]) AS u(id, attempt, worker, lease, at)
WHERE jobs.id = u.id AND jobs.state = ANY(%(from)s::text[]) AND u.attempt = jobs.attempts + 1
RETURNING jobs.id
"""

FINISHED = """
UPDATE jobs SET state = %(state)s, last_code = u.code, last_reply = u.reply, failure_kind = u.kind,
       due_at = coalesce(u.due_at, jobs.due_at), lease_until = NULL,
       accepted_at = CASE WHEN %(state)s = 'completed' THEN u.at ELSE jobs.accepted_at END,
       finished_at = CASE WHEN %(state)s IN ('completed', 'failed') THEN u.at ELSE NULL END
FROM unnest(%(ids)s::uuid[], %(attempts)s::int[], %(codes)s::int[], %(replies)s::text[], %(kinds)s::text[],
            %(dues)s::timestamptz[], %(ats)s::timestamptz[]) AS u(id, attempt, code, reply, kind, due_at, at)
WHERE jobs.id = u.id AND jobs.state = ANY(%(from)s::text[]) AND jobs.attempts = u.attempt
RETURNING jobs.id
"""

CURRENT_STATES = "SELECT id, state FROM jobs WHERE id = ANY(%s::uuid[])"

# Messages released per tenant and UTC hour (the queuer's hourly and daily limits).
COUNT_USAGE = """
INSERT INTO tenant_usage AS t (tenant, hour, messages)
SELECT j.tenant, date_trunc('hour', u.at, 'UTC'), count(*)
FROM unnest(%(ids)s::uuid[], %(ats)s::timestamptz[]) AS u(id, at) JOIN jobs j ON j.id = u.id
WHERE j.kind = 'send'
GROUP BY 1, 2
ON CONFLICT (tenant, hour) DO UPDATE SET messages = t.messages + excluded.messages
"""


def _refuse_untouched(conn: psycopg.Connection, wanted: list[str], done: list[tuple], target: JobState) -> None:
    if len(done) == len(wanted):
        return
    touched = {str(r[0]) for r in done}
    missed = [j for j in wanted if j not in touched]
    states = {str(i): s for i, s in conn.execute(CURRENT_STATES, (missed,)).fetchall()}
    raise IllegalTransition(missed[0], states.get(missed[0]), target, count=len(missed))


def _created(conn: psycopg.Connection, evs: list[Envelope]) -> None:
    """The address and variables are opened from the sealed value; a job of a person erased
    since keeps its row (and so its campaign's counts) without them."""
    d = [e.data for e in evs]
    sends = [i for i, x in enumerate(d) if x.get("kind", "send") == "send"]
    opened: list[dict[str, Any] | None] = [None] * len(d)  # a duty has no recipient
    for i, v in zip(
        sends, personal.open_each(conn, [(str(evs[i].metadata.tenant), d[i]["subject"], d[i]["sealed"]) for i in sends])
    ):
        opened[i] = v
    conn.execute(
        CREATE,
        (
            [x["job_id"] for x in d],
            [e.metadata.tenant for e in evs],
            [x["idempotency_key"] for x in d],
            [x["priority"] for x in d],
            [x["subject"] for x in d],
            [v["email"] if v else None for v in opened],
            [x["domain"] for x in d],
            [x["sender"] for x in d],
            [x["template"] for x in d],
            [orjson.dumps((v or {}).get("variables") or {}).decode() for v in opened],
            [x.get("campaign_id") for x in d],
            [x.get("due_at") for x in d],
            [e.recorded_at for e in evs],
            [e.metadata.correlation_id for e in evs],
            [x.get("kind", "send") for x in d],
            [orjson.dumps(x.get("args") or {}).decode() for x in d],
        ),
    )


def _queued(conn: psycopg.Connection, evs: list[Envelope]) -> None:
    ids = [e.data["job_id"] for e in evs]
    done = conn.execute(
        QUEUED,
        {
            "ids": ids,
            "seqs": [e.data["queue_seq"] for e in evs],
            "ats": [e.recorded_at for e in evs],
            "from": sources(JobState.QUEUED),
        },
    ).fetchall()
    _refuse_untouched(conn, ids, done, JobState.QUEUED)
    conn.execute(COUNT_USAGE, {"ids": ids, "ats": [e.recorded_at for e in evs]})


def _started(conn: psycopg.Connection, evs: list[Envelope]) -> None:
    d = [e.data for e in evs]
    ids = [x["job_id"] for x in d]
    done = conn.execute(
        STARTED,
        {
            "ids": ids,
            "attempts": [x["attempt"] for x in d],
            "workers": [x["worker"] for x in d],
            "leases": [x["lease_until"] for x in d],
            "ats": [e.recorded_at for e in evs],
            "from": sources(JobState.ACTIVE),
        },
    ).fetchall()
    _refuse_untouched(conn, ids, done, JobState.ACTIVE)


def _finisher(state: JobState) -> Callable[[psycopg.Connection, list[Envelope]], None]:
    def apply(conn: psycopg.Connection, evs: list[Envelope]) -> None:
        d = [e.data for e in evs]
        ids = [x["job_id"] for x in d]
        done = conn.execute(
            FINISHED,
            {
                "state": str(state),
                "ids": ids,
                "attempts": [x["attempt"] for x in d],
                "codes": [x.get("code") for x in d],
                "replies": [x.get("reply") for x in d],
                "kinds": [x.get("kind") if state is JobState.FAILED else x.get("reason") for x in d],
                "dues": [x.get("due_at") for x in d],
                "ats": [e.recorded_at for e in evs],
                "from": sources(state),
            },
        ).fetchall()
        _refuse_untouched(conn, ids, done, state)

    return apply


HANDLERS: dict[str, Callable[[psycopg.Connection, list[Envelope]], None]] = {
    "JobCreated": _created,
    "JobQueued": _queued,
    "JobStarted": _started,
    "JobCompleted": _finisher(JobState.COMPLETED),
    "JobFailed": _finisher(JobState.FAILED),
    "JobRetryScheduled": _finisher(JobState.RETRY),
}

PROJECTION = register(
    InlineProjection(
        "jobs",
        "one row per job with its current state, messages per tenant and hour (inline)",
        ("jobs", "tenant_usage"),
        HANDLERS,
    )
)
