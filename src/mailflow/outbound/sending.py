"""Outbound room: commands that create jobs - save a sender, send one transactional message.

A job is created by a JobCreated event applied to the jobs table in the same transaction.
An idempotency key makes retried commands safe: the same key returns the same job.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from email_validator import EmailNotValidError
from psycopg import errors as pg_errors

from mailflow.errors import NotFoundError, UsageError
from mailflow.events.envelope import Metadata, uuid7
from mailflow.events.store import EventStore
from mailflow.consumers import inline
from mailflow.outbound import queries as q
from mailflow.outbound import templates
from mailflow.outbound.contacts import normalize_email
from mailflow.outbound.events import JobCreated, SenderSaved
from mailflow.outbound.jobs import Priority
from mailflow.outbound.senders import Sender, check_sender


def save_sender(store: EventStore, sender: Sender) -> Sender:
    s = check_sender(sender)
    event = SenderSaved(
        name=s.name, from_email=s.from_email, from_name=s.from_name, relay_url=s.relay_url,
        dkim_selector=s.dkim_selector, dkim_key_pem=s.dkim_key_pem,
    ).to_new()
    inline.record(store, [(f"sender-{s.name}", event)])
    return s


def load_sender(conn: psycopg.Connection, name: str) -> Sender:
    row = conn.execute(q.GET_SENDER, (name,)).fetchone()
    if row is None:
        raise NotFoundError(f"no sender named {name!r} (see `mailflow senders list`)")
    return Sender(*row)


def create_jobs(w: inline.Writer, created: list[JobCreated], metadata: Metadata | None = None) -> None:
    """Record JobCreated events (which insert their jobs) in the caller's writing transaction."""
    w.record([(f"job-{c.job_id}", c.to_new(metadata)) for c in created])


def send_transactional(
    store: EventStore,
    *,
    sender: str,
    template: str,
    to: str,
    variables: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    priority: Priority = Priority.HIGH,
) -> tuple[str, bool]:
    """Create a high-priority job; returns (job id, created). The same key returns the same job."""
    try:
        email = normalize_email(to)
    except EmailNotValidError as exc:
        raise UsageError(f"{to!r} is not a valid email address: {exc}") from exc
    variables = dict(variables or {})
    job_id = str(uuid7())
    key = idempotency_key or f"send:{job_id}"
    with store.pool.connection() as conn:
        existing = conn.execute(q.JOB_BY_KEY, (key,)).fetchone()
        if existing:
            return str(existing[0]), False
        load_sender(conn, sender)
        tpl = templates.load(conn, template)
    # Fail now, with the template's line and variable, rather than at send time.
    templates.render(tpl, {"email": email, **variables})
    created = JobCreated(
        job_id=job_id, idempotency_key=key, priority=str(priority), email=email,
        sender=sender, template=template, variables=variables,
    )
    try:
        with inline.writing(store) as w:
            create_jobs(w, [created])
    except pg_errors.UniqueViolation:
        with store.pool.connection() as conn:
            row = conn.execute(q.JOB_BY_KEY, (key,)).fetchone()
        if row:
            return str(row[0]), False
        raise
    return job_id, True


def job_uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise UsageError(f"{value!r} is not a job id") from exc
