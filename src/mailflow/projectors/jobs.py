"""Projectors room: the jobs table - each job's current state, from its JobXxx events.

Timestamps come from the events (recorded_at), never from the clock at apply time, so a
replay gives the same table.

An inline projection: the queuer, workers and commands apply it in the transaction that
appends the events. Consecutive events of one type are applied with one set-based
statement, so moving a thousand jobs costs a handful of statements, not a thousand.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby

import orjson
import psycopg

from ..events.envelope import Envelope

CREATE = """
INSERT INTO jobs (id, idempotency_key, priority, email, domain, sender, template, variables, campaign_id, due_at,
                  created_at)
SELECT u.id, u.key, u.priority, u.email, split_part(u.email, '@', 2), u.sender, u.template, u.variables,
       u.campaign_id, coalesce(u.due_at, u.at), u.at
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[]::jsonb[],
            %s::uuid[], %s::timestamptz[], %s::timestamptz[])
     AS u(id, key, priority, email, sender, template, variables, campaign_id, due_at, at)
ON CONFLICT (id) DO NOTHING
"""

QUEUED = """
UPDATE jobs SET state = 'queued', queue_seq = u.seq, queued_at = u.at, lease_until = NULL, worker = NULL
FROM unnest(%s::uuid[], %s::bigint[], %s::timestamptz[]) AS u(id, seq, at)
WHERE jobs.id = u.id
"""

STARTED = """
UPDATE jobs SET state = 'active', attempts = u.attempt, worker = u.worker, lease_until = u.lease,
       started_at = u.at
FROM unnest(%s::uuid[], %s::int[], %s::text[], %s::timestamptz[], %s::timestamptz[])
     AS u(id, attempt, worker, lease, at)
WHERE jobs.id = u.id
"""

FINISHED = """
UPDATE jobs SET state = u.state, last_code = u.code, last_reply = u.reply, failure_kind = u.kind,
       due_at = coalesce(u.due_at, jobs.due_at), lease_until = NULL,
       accepted_at = CASE WHEN u.state = 'completed' THEN u.at ELSE jobs.accepted_at END,
       finished_at = CASE WHEN u.state IN ('completed', 'failed') THEN u.at ELSE NULL END
FROM unnest(%s::uuid[], %s::text[], %s::int[], %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])
     AS u(id, state, code, reply, kind, due_at, at)
WHERE jobs.id = u.id
"""


def _created(conn: psycopg.Connection, evs: list[Envelope]) -> None:
    d = [e.data for e in evs]
    conn.execute(
        CREATE,
        (
            [x["job_id"] for x in d],
            [x["idempotency_key"] for x in d],
            [x["priority"] for x in d],
            [x["email"] for x in d],
            [x["sender"] for x in d],
            [x["template"] for x in d],
            [orjson.dumps(x.get("variables") or {}).decode() for x in d],
            [x.get("campaign_id") for x in d],
            [x.get("due_at") for x in d],
            [e.recorded_at for e in evs],
        ),
    )


def _queued(conn: psycopg.Connection, evs: list[Envelope]) -> None:
    conn.execute(
        QUEUED, ([e.data["job_id"] for e in evs], [e.data["queue_seq"] for e in evs], [e.recorded_at for e in evs])
    )


def _started(conn: psycopg.Connection, evs: list[Envelope]) -> None:
    d = [e.data for e in evs]
    conn.execute(
        STARTED,
        (
            [x["job_id"] for x in d], [x["attempt"] for x in d], [x["worker"] for x in d],
            [x["lease_until"] for x in d], [e.recorded_at for e in evs],
        ),
    )


def _finisher(state: str) -> Callable[[psycopg.Connection, list[Envelope]], None]:
    def apply(conn: psycopg.Connection, evs: list[Envelope]) -> None:
        d = [e.data for e in evs]
        conn.execute(
            FINISHED,
            (
                [x["job_id"] for x in d],
                [state] * len(d),
                [x.get("code") for x in d],
                [x.get("reply") for x in d],
                [x.get("kind") if state == "failed" else x.get("reason") for x in d],
                [x.get("due_at") for x in d],
                [e.recorded_at for e in evs],
            ),
        )

    return apply


HANDLERS: dict[str, Callable[[psycopg.Connection, list[Envelope]], None]] = {
    "JobCreated": _created,
    "JobQueued": _queued,
    "JobStarted": _started,
    "JobCompleted": _finisher("completed"),
    "JobFailed": _finisher("failed"),
    "JobRetryScheduled": _finisher("retry"),
}


def apply(conn: psycopg.Connection, events: list[Envelope]) -> None:
    for etype, group in groupby(events, key=lambda e: e.type):
        handler = HANDLERS.get(etype)
        if handler is not None:
            handler(conn, list(group))
