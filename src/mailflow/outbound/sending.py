"""Outbound room: commands that create jobs - save or delete a sender, send one transactional message.

A job is created by a JobCreated event applied to the jobs table in the same transaction.
An idempotency key makes retried commands safe: the same key returns the same job.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import psycopg
from email_validator import EmailNotValidError
from psycopg import errors as pg_errors
from psycopg.rows import class_row, dict_row

from mailflow.config import split_password
from mailflow.consumers import inline
from mailflow.errors import ConfigurationError, NotFoundError, UsageError
from mailflow.events.envelope import Metadata, uuid7
from mailflow.events.store import EventStore
from mailflow.infra import personal
from mailflow.infra.tenancy import DEFAULT_TENANT
from mailflow.infra.vault import SecretRef, Vault, dkim_fingerprint
from mailflow.mail.addresses import domain_of, normalize_email
from mailflow.outbound import domains, streams, templates
from mailflow.outbound import queries as q
from mailflow.outbound.catalog import refuse_if_in_use
from mailflow.outbound.consent import LINK_VARIABLES
from mailflow.outbound.events import JobCreated, SenderDeleted, SenderSaved
from mailflow.outbound.jobs import Priority
from mailflow.outbound.senders import Sender, check_sender, dkim_public_der


def _owner(name: str) -> str:
    return f"sender:{name}"


def seal_sender_secrets(
    conn: psycopg.Connection, vault: Vault | None, tenant: str, data: dict[str, Any]
) -> dict[str, Any]:
    """SenderSaved data with its secrets moved into the vault: the relay URL without its
    password and a reference to it; a reference to the DKIM private key, and its public key.

    Takes the sender as given (relay_url with a password, dkim_key_pem: the shape of schema 1,
    which migration 0009 sealed the same way with its own copy of this)."""
    sealed = {k: v for k, v in data.items() if k != "dkim_key_pem"}
    relay_url, password = split_password(data["relay_url"])
    pem = data.get("dkim_key_pem")
    if (password or pem) and vault is None:
        raise ConfigurationError("a sender with a relay password or a DKIM key needs the secret keyring")
    sealed["relay_url"] = relay_url
    sealed["relay_password"] = None
    sealed["dkim_key"] = None
    sealed["dkim_public_key"] = None
    if password:
        assert vault is not None
        ref = vault.put(conn, tenant=tenant, kind="relay_password", owner=_owner(data["name"]), plaintext=password)
        sealed["relay_password"] = ref.to_dict()
    if pem:
        assert vault is not None
        public = dkim_public_der(
            Sender(data["name"], data["from_email"], "", relay_url, data.get("dkim_selector"), pem)
        )
        ref = SecretRef(
            vault.put(conn, tenant=tenant, kind="dkim_key", owner=_owner(data["name"]), plaintext=pem).id,
            dkim_fingerprint(public),
        )
        sealed["dkim_key"] = ref.to_dict()
        sealed["dkim_public_key"] = base64.b64encode(public).decode()
    return sealed


def save_sender(store: EventStore, sender: Sender, vault: Vault | None = None) -> Sender:
    """Save a sender (SenderSaved). Its relay password and DKIM key go into the vault, never
    into the event; the secrets of the version it replaces are deleted in the same commit."""
    s = check_sender(sender)
    with inline.writing(store) as w:
        tenant = store.tenant or DEFAULT_TENANT
        data = {
            "name": s.name,
            "from_email": s.from_email,
            "from_name": s.from_name,
            "relay_url": s.relay_url,
            "dkim_selector": s.dkim_selector,
            "dkim_key_pem": s.dkim_key_pem,
        }
        sealed = seal_sender_secrets(w.conn, vault, tenant, data)
        w.record([(streams.sender(s.name), SenderSaved.model_validate(sealed).to_new())])
        if vault is not None:
            kept = [ref["id"] for ref in (sealed["relay_password"], sealed["dkim_key"]) if ref]
            vault.keep_only(w.conn, tenant, _owner(s.name), kept)
    return s


def _no_sender(name: str) -> NotFoundError:
    return NotFoundError(f"no sender named {name!r} (see `mailflow senders list`)")


def load_sender(
    conn: psycopg.Connection, name: str, *, tenant: str | None = None, vault: Vault | None = None
) -> Sender:
    """The sender `name` of the connection's tenant (or of `tenant`, for an operator's connection).

    With `vault`, its relay password and DKIM key are read from the vault (for sending); a
    sender without a DKIM key of its own then signs with its From domain's, when that is a
    sending domain of the tenant (domains.py). Without, the sender has only its own references."""
    with conn.cursor(row_factory=class_row(Sender)) as cur:
        sender = cur.execute(q.GET_SENDER, {"tenant": tenant, "name": name}).fetchone()
    if sender is None:
        raise _no_sender(name)
    if vault is not None and sender.dkim_secret is None:
        sender = _with_domain_key(conn, sender, tenant)
    if vault is not None and (sender.relay_secret or sender.dkim_secret):
        sender = replace(
            sender,
            relay_password=vault.get(conn, sender.relay_secret) if sender.relay_secret else None,
            dkim_key_pem=vault.get(conn, sender.dkim_secret) if sender.dkim_secret else None,
        )
    return sender


def _with_domain_key(conn: psycopg.Connection, sender: Sender, tenant: str | None) -> Sender:
    """The sender signing with its sending domain's DKIM key (selector, key reference), if it has one."""
    try:
        domain = domains.domain_name(sender.domain)
    except UsageError:
        return sender
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.SENDING_DOMAIN_KEY, {"tenant": tenant, "domain": domain}).fetchone()
    if row is None:
        return sender
    return replace(
        sender,
        dkim_selector=row["dkim_selector"],
        dkim_secret=row["dkim_secret"],
        dkim_public_key=row["dkim_public_key"],
    )


def delete_sender(store: EventStore, name: str) -> None:
    """Delete a sender (SenderDeleted) and its secrets, unless an unfinished campaign or unsent job uses it."""
    with inline.writing(store) as w:
        if w.conn.execute(q.LOCK_SENDER, (name,)).fetchone() is None:
            raise _no_sender(name)
        refuse_if_in_use(w.conn, "sender", name)
        w.record([(streams.sender(name), SenderDeleted(name=name).to_new())])
        w.conn.execute(q.DELETE_SENDER_SECRETS, (_owner(name),))


def create_jobs(w: inline.Writer, created: list[JobCreated], metadata: Metadata | None = None) -> None:
    """Record JobCreated events (which insert their jobs) in the caller's writing transaction."""
    w.record([(streams.job(c.job_id), c.to_new(metadata)) for c in created])


def job_to(w: inline.Writer, email: str, variables: dict[str, Any], **fields: Any) -> JobCreated:
    """A JobCreated to the address, named by its subject, the address and variables sealed
    (personal.Erased if the person was erased)."""
    subject = w.store.subject(w.conn, email)
    (sealed,) = personal.seal_many(w.conn, str(w.store.tenant), [(subject, {"email": email, "variables": variables})])
    return JobCreated(subject=subject, domain=domain_of(email), sealed=sealed, **fields)


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
    try:
        # One transaction: the key's job, the sender and the template are read where the job is written.
        with inline.writing(store) as w:
            existing = _job_by_key(w.conn, key)
            if existing:
                return existing, False
            load_sender(w.conn, sender)
            tpl = templates.load(w.conn, template)
            # Fail now, with the template's line and variable, rather than at send time.
            templates.render(tpl, {"email": email, **dict.fromkeys(LINK_VARIABLES, ""), **variables})
            created = job_to(
                w,
                email,
                variables,
                job_id=job_id,
                idempotency_key=key,
                priority=str(priority),
                sender=sender,
                template=template,
            )
            create_jobs(w, [created])
    except pg_errors.UniqueViolation:
        with inline.reading(store) as conn:
            existing = _job_by_key(conn, key)
        if existing:
            return existing, False
        raise
    return job_id, True
