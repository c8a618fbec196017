"""Outbound room: commands that create jobs - save or delete a sender, send one transactional message.

A job is created by a JobCreated event applied to the jobs table in the same transaction.
An idempotency key makes retried commands safe: the same key returns the same job.
"""

from __future__ import annotations

from typing import Any

import psycopg
from email_validator import EmailNotValidError
from psycopg import errors as pg_errors
from psycopg.rows import class_row, dict_row

from mailflow.consumers import inline
from mailflow.errors import NotFoundError, UsageError
from mailflow.events.envelope import Metadata, uuid7
from mailflow.events.store import EventStore
from mailflow.mail.addresses import normalize_email
from mailflow.outbound import queries as q
from mailflow.outbound import streams, templates
from mailflow.outbound.catalog import refuse_if_in_use
from mailflow.outbound.events import JobCreated, SenderDeleted, SenderSaved
from mailflow.outbound.jobs import Priority
from mailflow.outbound.senders import Sender, check_sender


def save_sender(store: EventStore, sender: Sender) -> Sender:
    s = check_sender(sender)
    event = SenderSaved(
        name=s.name,
        from_email=s.from_email,
        from_name=s.from_name,
        relay_url=s.relay_url,
        dkim_selector=s.dkim_selector,
        dkim_key_pem=s.dkim_key_pem,
    ).to_new()
    inline.record(store, [(streams.sender(s.name), event)])
    return s


def _no_sender(name: str) -> NotFoundError:
    return NotFoundError(f"no sender named {name!r} (see `mailflow senders list`)")


def load_sender(conn: psycopg.Connection, name: str, *, tenant: str | None = None) -> Sender:
    """The sender `name` of the connection's tenant (or of `tenant`, for an operator's connection)."""
    with conn.cursor(row_factory=class_row(Sender)) as cur:
        sender = cur.execute(q.GET_SENDER, {"tenant": tenant, "name": name}).fetchone()
    if sender is None:
        raise _no_sender(name)
    return sender


def delete_sender(store: EventStore, name: str) -> None:
    """Delete a sender (SenderDeleted), unless an unfinished campaign or unsent job uses it."""
    with inline.writing(store) as w:
        if w.conn.execute(q.LOCK_SENDER, (name,)).fetchone() is None:
            raise _no_sender(name)
        refuse_if_in_use(w.conn, "sender", name)
        w.record([(streams.sender(name), SenderDeleted(name=name).to_new())])


def create_jobs(w: inline.Writer, created: list[JobCreated], metadata: Metadata | None = None) -> None:
    """Record JobCreated events (which insert their jobs) in the caller's writing transaction."""
    w.record([(streams.job(c.job_id), c.to_new(metadata)) for c in created])


def _job_by_key(conn: psycopg.Connection, key: str) -> str | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.JOB_BY_KEY, (key,)).fetchone()
    return str(row["id"]) if row else None


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
    with inline.reading(store) as conn:
        existing = _job_by_key(conn, key)
        if existing:
            return existing, False
        load_sender(conn, sender)
        tpl = templates.load(conn, template)
    # Fail now, with the template's line and variable, rather than at send time.
    templates.render(tpl, {"email": email, **variables})
    created = JobCreated(
        job_id=job_id,
        idempotency_key=key,
        priority=str(priority),
        email=email,
        sender=sender,
        template=template,
        variables=variables,
    )
    try:
        with inline.writing(store) as w:
            create_jobs(w, [created])
    except pg_errors.UniqueViolation:
        with inline.reading(store) as conn:
            existing = _job_by_key(conn, key)
        if existing:
            return existing, False
        raise
    return job_id, True
