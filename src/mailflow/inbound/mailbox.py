"""Inbound room: received messages after their 250 - where they went, the quarantine, read and
unread, and each tenant's spam thresholds.

The `messages` inline projection keeps `inbound_messages` (one row per message and tenant:
its verdicts, its state, the deliveries routing decided), `mailbox_messages` (one row per
message and mailbox, with its read time), `route_actions` (one row per http or forward
delivery and where it is: actions.py) and `inbound_thresholds` in step with the events:

    MessageReceived -> received     MessageRouted -> routed (into its mailboxes, its actions pending)
    MessageQuarantined -> quarantined    MessageRejected -> rejected    MessageRead -> read/unread
    RouteActionDone -> done    RouteActionFailed -> pending until its retry, or failed

A quarantined message is released (`release`: MessageReleased, then MessageRouted with the
routes as they are now) or dropped (`drop`: MessageRejected at stage `quarantine`, and its
raw copy deleted unless another message of the tenant has the same bytes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailflow.consumers import inline
from mailflow.consumers.inline import InlineProjection, register
from mailflow.errors import ConflictError, NotFoundError, UsageError
from mailflow.events.envelope import Envelope
from mailflow.events.store import EventStore
from mailflow.inbound import actions, defects, directory, policy, routing
from mailflow.inbound import queries as q
from mailflow.inbound.events import (
    Delivery,
    MessageRead,
    MessageRejected,
    MessageReleased,
    MessageRouted,
    ThresholdsSet,
)
from mailflow.inbound.policy import Kind
from mailflow.inbound.spam import Thresholds
from mailflow.infra import personal
from mailflow.mail import tokens

STATES = ("received", "routed", "quarantined", "rejected")


# -- reading -----------------------------------------------------------------------------------


def find(conn: psycopg.Connection, ref: str) -> str:
    """A message's id from its id, a unique prefix of it (as lists show) or its sha256."""
    ref = ref.strip().lower()
    if len(ref) < 4:
        raise UsageError("give at least 4 characters of a message id")
    found = conn.execute(q.FIND_MESSAGE, {"prefix": ref}).fetchall()
    if not found:
        raise NotFoundError(f"no received message {ref} (see `mailflow messages list`)")
    if len(found) > 1:
        raise UsageError(f"{ref} is the start of more than one message id: give more of it")
    return str(found[0][0])


def messages(
    conn: psycopg.Connection,
    *,
    mailbox: str | None = None,
    state: str | None = None,
    unread: bool = False,
    limit: int = 50,
) -> list[dict[str, Any]]:
    if state is not None and state not in STATES:
        raise UsageError(f"state must be one of {', '.join(STATES)}")
    args = {"mailbox": mailbox.lower() if mailbox else None, "state": state, "unread": unread, "limit": limit}
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(q.LIST_MESSAGES, args).fetchall()


def message(conn: psycopg.Connection, ref: str) -> dict[str, Any]:
    """One message: its verdicts, state, deliveries and mailboxes (with read times)."""
    message_id = find(conn, ref)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.GET_MESSAGE, (message_id,)).fetchone()
        assert row is not None
        row["mailboxes"] = cur.execute(q.MESSAGE_BOXES, (message_id,)).fetchall()
    return row


def raw(conn: psycopg.Connection, ref: str) -> bytes:
    """The stored copy: the Authentication-Results mailflow added, then the bytes as received."""
    found = conn.execute(q.MESSAGE_RAW, (find(conn, ref),)).fetchone()
    if found is None:
        raise NotFoundError(f"the raw copy of {ref} was deleted (dropped from quarantine, or its sender erased)")
    return bytes(found[0])


def thresholds(conn: psycopg.Connection) -> Thresholds:
    row = conn.execute(q.THRESHOLDS).fetchone()
    return Thresholds() if row is None else Thresholds(quarantine=row[0], reject=row[1])


def every_tenants_thresholds(conn: psycopg.Connection) -> dict[str, Thresholds]:
    """An operator's connection: the server's snapshot (tenants without a row: the defaults)."""
    return {t: Thresholds(quarantine=qu, reject=r) for t, qu, r in conn.execute(q.ALL_THRESHOLDS).fetchall()}


# -- writing -----------------------------------------------------------------------------------


def set_thresholds(store: EventStore, *, quarantine: float, reject: float) -> Thresholds:
    if not 0 < quarantine <= reject:
        raise UsageError("the thresholds must be 0 < quarantine <= reject (equal: nothing is quarantined)")
    with inline.writing(store) as w:
        w.record([(f"inbound-thresholds-{store.tenant}", ThresholdsSet(quarantine=quarantine, reject=reject).to_new())])
    return Thresholds(quarantine=quarantine, reject=reject)


def mark_read(store: EventStore, ref: str, *, read: bool = True, mailbox: str | None = None) -> str:
    with inline.writing(store) as w:
        message_id = find(w.conn, ref)
        boxes = [r[0] for r in w.conn.execute(q.MESSAGE_BOXES, (message_id,)).fetchall()]
        if mailbox is not None and mailbox.lower() not in boxes:
            raise NotFoundError(f"message {ref} is not in mailbox {mailbox}")
        for box in [mailbox.lower()] if mailbox else boxes:
            event = MessageRead(message_id=message_id, mailbox=box, read=read)
            w.record([(f"inbound-message-{message_id}", event.to_new())])
    return message_id


def _quarantined(conn: psycopg.Connection, ref: str) -> dict[str, Any]:
    message_id = find(conn, ref)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.GET_MESSAGE + " FOR UPDATE", (message_id,)).fetchone()
    assert row is not None
    if row["state"] != "quarantined":
        raise ConflictError(f"message {message_id[:8]} is {row['state']}, not quarantined")
    return row


def release(store: EventStore, ref: str, route: Callable[[psycopg.Connection, dict], Sequence[Delivery]]) -> str:
    """Deliver a quarantined message where `route(conn, row)` says (the routes as they are now)."""
    with inline.writing(store) as w:
        row = _quarantined(w.conn, ref)
        message_id = str(row["id"])
        deliveries = list(route(w.conn, row))
        stream = f"inbound-message-{message_id}"
        w.record(
            [
                (stream, MessageReleased(message_id=message_id).to_new()),
                (stream, MessageRouted(message_id=message_id, deliveries=deliveries).to_new()),
            ]
        )
    return message_id


def route_again(secret: list[bytes]) -> Callable[[psycopg.Connection, dict], list[Delivery]]:
    """Routing for a released message: its recipients decided again, with the tenant's
    directory and routes as they are now (policy.decide, then routing.deliveries)."""

    def verp_job(address: str) -> str | None:
        try:
            return tokens.job_from_verp(secret, address)
        except tokens.BadToken:
            return None

    def route(conn: psycopg.Connection, row: dict) -> list[Delivery]:
        snapshot = directory.load(conn)  # the tenant's connection: its own rows
        recipients = []
        for address in row["recipients"]:
            decision = policy.decide(address, snapshot, verp_job)
            sender = None
            if decision.kind is Kind.BOUNCE and decision.job_id is not None:
                job = conn.execute(q.JOB_TENANT, (decision.job_id,)).fetchone()
                sender = job[1] if job else None
            if decision.accepted:
                recipients.append(routing.Recipient(decision, routing.default_mailbox(decision, snapshot, sender)))
        data = raw(conn, str(row["id"]))
        routes = snapshot.routes.get(str(row["tenant"]), ())
        return routing.deliveries(recipients, routes, defects.headers(data))

    return route


def drop(store: EventStore, ref: str) -> str:
    """Refuse a quarantined message for good: recorded, and its raw copy deleted."""
    with inline.writing(store) as w:
        row = _quarantined(w.conn, ref)
        message_id = str(row["id"])
        event = MessageRejected(message_id=message_id, sha256=row["sha256"], stage="quarantine", reason="dropped")
        w.record([(f"inbound-message-{message_id}", event.to_new())])
        w.conn.execute(q.DROP_RAW, (message_id, message_id))
    return message_id


# -- the inline projection ---------------------------------------------------------------------


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
            [None if x.get("auth") is None else json.dumps(x["auth"]) for x in d],
            [None if x.get("spam") is None else json.dumps(x["spam"]) for x in d],
            [" ".join(x.get("defects", [])) for x in d],
        ),
    )


def _routed(conn: psycopg.Connection, events: list[Envelope]) -> None:
    tenants = [str(e.metadata.tenant) for e in events]
    conn.execute(
        q.SET_ROUTED,
        (tenants, [e.data["message_id"] for e in events], [json.dumps(e.data["deliveries"]) for e in events]),
    )
    boxes = {
        (t, e.data["message_id"], d["target"]): (d["recipient"], d.get("route_id"), e.recorded_at)
        for t, e in zip(tenants, events)
        for d in e.data["deliveries"]
        if d["action"] == "mailbox"
    }
    if boxes:
        keys, values = list(boxes), list(boxes.values())
        conn.execute(q.DELIVER, (*(list(c) for c in zip(*keys)), *(list(c) for c in zip(*values))))
    actions.plan(conn, events)  # http and forward deliveries: carried out by actions.run()


def _state(state: str, reason: Callable[[dict], str | None]):
    def run(conn: psycopg.Connection, events: list[Envelope]) -> None:
        for e in events:
            if e.data.get("message_id"):  # a refusal at DATA has no message
                conn.execute(q.SET_STATE, (state, reason(e.data), str(e.metadata.tenant), e.data["message_id"]))

    return run


def _read(conn: psycopg.Connection, events: list[Envelope]) -> None:
    for e in events:
        args = {"read": e.data["read"], "at": e.recorded_at, "tenant": str(e.metadata.tenant)}
        conn.execute(q.SET_READ, {**args, "id": e.data["message_id"], "mailbox": e.data["mailbox"]})


def _thresholds(conn: psycopg.Connection, events: list[Envelope]) -> None:
    for e in events:
        t = str(e.metadata.tenant)
        conn.execute(q.SET_THRESHOLDS, (t, e.data["quarantine"], e.data["reject"], e.recorded_at))


@personal.on_erasure
def forget(conn: psycopg.Connection, tenant: str, subjects: Sequence[str] | None) -> None:
    """People erased on request: the raw copies of the mail they sent are deleted (the rows
    stay, with their verdicts and where they went, under the subject, which opens nothing;
    the raw copies are not a projection, so a rebuild does not bring them back).
    An erased tenant keeps no received mail at all (bounces, which have no sender, too)."""
    if subjects is None:
        conn.execute(q.ERASE_TENANT_RAW, (tenant,))
        return
    conn.execute(q.ERASE_SENDERS_RAW, (tenant, list(subjects)))


PROJECTION = register(
    InlineProjection(
        "messages",
        "received messages, their mailboxes, route actions and quarantine, spam thresholds (inline)",
        ("inbound_messages", "mailbox_messages", "route_actions", "inbound_thresholds"),
        {
            "MessageReceived": _received,
            "MessageRouted": _routed,
            "MessageQuarantined": _state("quarantined", lambda d: d["reason"]),
            "MessageRejected": _state("rejected", lambda d: f"{d['stage']}: {d['reason']}"),
            "MessageRead": _read,
            "ThresholdsSet": _thresholds,
            "RouteActionDone": actions.project_done,
            "RouteActionFailed": actions.project_failed,
        },
    )
)
