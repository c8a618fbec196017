"""Inbound room: the domains and mailboxes a tenant receives mail for.

A domain belongs to one tenant (its MX points at mailflow); a mailbox is an address at one of
the tenant's domains. Both are inline projections of their events, like the outbound
catalogue, and `load()` reads every tenant's into the snapshot the SMTP server decides
RCPT TO from (policy.py).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from mailflow.consumers import inline
from mailflow.consumers.inline import InlineProjection, register
from mailflow.errors import ConflictError, NotFoundError, UsageError
from mailflow.events.envelope import Envelope
from mailflow.events.store import EventStore
from mailflow.inbound import queries as q
from mailflow.inbound.events import InboundDomainAdded, InboundDomainRemoved, MailboxAdded, MailboxRemoved
from mailflow.inbound.policy import Directory, canonical


def _domain(raw: str) -> str:
    address = canonical(f"postmaster@{raw.strip()}")
    if address is None:
        raise UsageError(f"{raw!r} is not a domain name (like mail.example.org)")
    return address.partition("@")[2]


def _tenant(store: EventStore) -> str:
    if store.tenant is None:
        raise UsageError("domains and mailboxes belong to a tenant: act for one (--tenant)")
    return store.tenant


def add_domain(store: EventStore, raw: str) -> tuple[str, bool]:
    """Receive mail for a domain; (domain, False) if the tenant had it already. A domain of
    another tenant is a ConflictError: one tenant receives for a domain."""
    domain = _domain(raw)
    _tenant(store)
    try:
        with inline.writing(store) as w:
            if w.conn.execute(q.DOMAIN_OWNER, (domain,)).fetchone() is not None:
                return domain, False  # the tenant's own (another's is not visible: see below)
            w.record([(f"inbound-domain-{domain}", InboundDomainAdded(domain=domain).to_new())])
    except pg_errors.UniqueViolation as exc:
        raise ConflictError(f"{domain} is received for by another tenant") from exc
    return domain, True


def remove_domain(store: EventStore, raw: str) -> None:
    domain = _domain(raw)
    with inline.writing(store) as w:
        if w.conn.execute(q.DOMAIN_OWNER, (domain,)).fetchone() is None:
            raise NotFoundError(f"no inbound domain {domain} (see `mailflow domains list`)")
        w.record([(f"inbound-domain-{domain}", InboundDomainRemoved(domain=domain).to_new())])


def add_mailbox(store: EventStore, raw: str, name: str = "") -> str:
    address = (canonical(raw) or "").lower()
    if not address or "+" in address.partition("@")[0]:
        raise UsageError(f"{raw!r} is not a mailbox address (local@domain, without a +tag)")
    domain = address.partition("@")[2]
    with inline.writing(store) as w:
        if w.conn.execute(q.DOMAIN_OWNER, (domain,)).fetchone() is None:
            raise UsageError(f"{domain} is not one of this tenant's inbound domains: `mailflow domains add {domain}`")
        w.record([(f"mailbox-{address}", MailboxAdded(address=address, name=name).to_new())])
    return address


def remove_mailbox(store: EventStore, raw: str) -> None:
    address = (canonical(raw) or raw).lower()
    with inline.writing(store) as w:
        if w.conn.execute(q.MAILBOX_OWNER, (address,)).fetchone() is None:
            raise NotFoundError(f"no mailbox {address} (see `mailflow mailboxes list`)")
        w.record([(f"mailbox-{address}", MailboxRemoved(address=address).to_new())])


def domains(conn: psycopg.Connection) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(q.LIST_DOMAINS).fetchall()


def mailboxes(conn: psycopg.Connection) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(q.LIST_MAILBOXES).fetchall()


def load(conn: psycopg.Connection) -> Directory:
    """Every tenant's domains, mailboxes and sender addresses (an operator's connection)."""
    senders: dict[str, set[str]] = {}
    for address, tenant in conn.execute(q.DIRECTORY_SENDERS).fetchall():
        senders.setdefault(address, set()).add(tenant)
    return Directory(
        domains=dict(conn.execute(q.DIRECTORY_DOMAINS).fetchall()),
        mailboxes=dict(conn.execute(q.DIRECTORY_MAILBOXES).fetchall()),
        senders={a: frozenset(t) for a, t in senders.items()},
        sender_domains=frozenset(a.rpartition("@")[2] for a in senders),
    )


# -- the inline projection --------------------------------------------------------------------


def _per_event(apply: Callable[[psycopg.Connection, dict, datetime, str], object]):
    def run(conn: psycopg.Connection, events: list[Envelope]) -> None:
        for env in events:
            apply(conn, env.data, env.recorded_at, str(env.metadata.tenant))

    return run


def _received(conn: psycopg.Connection, events: list[Envelope]) -> None:
    d = [e.data for e in events]
    conn.execute(
        q.INSERT_MESSAGES,
        (
            [x["message_id"] for x in d],
            [str(e.metadata.tenant) for e in events],
            [e.recorded_at for e in events],
            [x["sha256"] for x in d],
            [x["size"] for x in d],
            [" ".join(x["recipients"]) for x in d],
            [x.get("sender_subject") for x in d],
            [x.get("helo", "") for x in d],
            [bool(x.get("tls")) for x in d],
        ),
    )


PROJECTION = register(
    InlineProjection(
        "inbound",
        "inbound domains, mailboxes and received messages (inline)",
        ("inbound_domains", "mailboxes", "inbound_messages"),
        {
            "InboundDomainAdded": _per_event(lambda c, d, at, t: c.execute(q.ADD_DOMAIN, (d["domain"], t, at))),
            "InboundDomainRemoved": _per_event(lambda c, d, at, t: c.execute(q.REMOVE_DOMAIN, (t, d["domain"]))),
            "MailboxAdded": _per_event(
                lambda c, d, at, t: c.execute(q.ADD_MAILBOX, (d["address"], t, d.get("name", ""), at))
            ),
            "MailboxRemoved": _per_event(lambda c, d, at, t: c.execute(q.REMOVE_MAILBOX, (t, d["address"]))),
            "MessageReceived": _received,
        },
    )
)
