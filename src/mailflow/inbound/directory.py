"""Inbound room: the domains and mailboxes a tenant receives mail for.

A domain belongs to one tenant (its MX points at mailflow); a mailbox is an address at one of
the tenant's domains. Both are inline projections of their events, like the outbound
catalogue, and `load()` reads every tenant's - with their routes (routes.py) - into the
snapshot the SMTP server decides RCPT TO from (policy.py). `domain_details()` and
`mailbox_details()` read one of them with its counts and routes (`domains show`, `mailboxes show`).
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
from mailflow.inbound import routes
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
    """Remove a mailbox; a ConflictError while routes deliver to it (they would deliver nowhere)."""
    address = (canonical(raw) or raw).lower()
    with inline.writing(store) as w:
        if w.conn.execute(q.MAILBOX_LOCKED, (address,)).fetchone() is None:
            raise NotFoundError(f"no mailbox {address} (see `mailflow mailboxes list`)")
        using = [r for (r,) in w.conn.execute(q.ROUTES_TO_MAILBOX, (address,)).fetchall()]
        if using:
            raise ConflictError(
                f"route {', '.join(using)} delivers to {address}: remove it first (`mailflow routes remove ID`)"
            )
        w.record([(f"mailbox-{address}", MailboxRemoved(address=address).to_new())])


def domains(conn: psycopg.Connection) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(q.LIST_DOMAINS).fetchall()


def mailboxes(conn: psycopg.Connection) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(q.LIST_MAILBOXES).fetchall()


def domain(conn: psycopg.Connection, raw: str) -> dict[str, Any]:
    """One of the connection's tenant's domains (another tenant's is not found)."""
    name = _domain(raw)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.DOMAIN, (name,)).fetchone()
    if row is None:
        raise NotFoundError(f"no inbound domain {name} (see `mailflow domains list`)")
    return row


def domain_details(conn: psycopg.Connection, raw: str) -> dict[str, Any]:
    """A domain with its mailboxes (and their message counts), the routes that may take its
    mail - address patterns at it, and regexes, which may match any of the tenant's domains -
    and its received messages by state."""
    row = domain(conn, raw)
    with conn.cursor(row_factory=dict_row) as cur:
        row["mailboxes"] = cur.execute(q.DOMAIN_MAILBOXES, (row["domain"],)).fetchall()
        by_state = {r["state"]: r["messages"] for r in cur.execute(q.DOMAIN_MESSAGES_BY_STATE, (row["domain"],))}
    row["routes"] = [r for r in routes.routes(conn) if r.recipient.domain in (row["domain"], None)]
    row["messages"] = {
        "received": sum(by_state.values()),
        "by_state": by_state,
        "in_mailboxes": sum(b["messages"] for b in row["mailboxes"]),
        "unread": sum(b["unread"] for b in row["mailboxes"]),
    }
    return row


def mailbox_details(conn: psycopg.Connection, raw: str, *, latest: int = 5) -> dict[str, Any]:
    """A mailbox, its message counts, the routes that deliver to it, and its latest messages."""
    address = (canonical(raw) or raw).strip().lower()
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.MAILBOX, (address,)).fetchone()
        if row is None:
            raise NotFoundError(f"no mailbox {address} (see `mailflow mailboxes list`)")
        counts = cur.execute(q.MAILBOX_COUNTS, (address,)).fetchone()
        row.update(counts or {"messages": 0, "unread": 0})
        row["latest"] = cur.execute(q.MAILBOX_LATEST, (address, latest)).fetchall()
    row["routes"] = [r for r in routes.routes(conn) if r.action is routes.Action.MAILBOX and r.target == address]
    return row


def load(conn: psycopg.Connection) -> Directory:
    """Every tenant's domains, mailboxes, sender addresses and routes (an operator's
    connection; a tenant's sees its own)."""
    senders: dict[str, set[str]] = {}
    for address, tenant in conn.execute(q.DIRECTORY_SENDERS).fetchall():
        senders.setdefault(address, set()).add(tenant)
    return Directory(
        domains=dict(conn.execute(q.DIRECTORY_DOMAINS).fetchall()),
        mailboxes=dict(conn.execute(q.DIRECTORY_MAILBOXES).fetchall()),
        senders={a: frozenset(t) for a, t in senders.items()},
        sender_domains=frozenset(a.rpartition("@")[2] for a in senders),
        routes=routes.by_tenant(conn),
    )


# -- the inline projection --------------------------------------------------------------------


def _per_event(apply: Callable[[psycopg.Connection, dict, datetime, str], object]):
    def run(conn: psycopg.Connection, events: list[Envelope]) -> None:
        for env in events:
            apply(conn, env.data, env.recorded_at, str(env.metadata.tenant))

    return run


PROJECTION = register(
    InlineProjection(
        "inbound",
        "inbound domains and mailboxes (inline)",
        ("inbound_domains", "mailboxes"),
        {
            "InboundDomainAdded": _per_event(lambda c, d, at, t: c.execute(q.ADD_DOMAIN, (d["domain"], t, at))),
            "InboundDomainRemoved": _per_event(lambda c, d, at, t: c.execute(q.REMOVE_DOMAIN, (t, d["domain"]))),
            "MailboxAdded": _per_event(
                lambda c, d, at, t: c.execute(q.ADD_MAILBOX, (d["address"], t, d.get("name", ""), at))
            ),
            "MailboxRemoved": _per_event(lambda c, d, at, t: c.execute(q.REMOVE_MAILBOX, (t, d["address"]))),
        },
    )
)
