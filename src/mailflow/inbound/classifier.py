"""Inbound room: the inbound_classifier consumer - every received message classified once, and
what it is recorded as an event.

For each MessageReceived it reads the stored bytes, runs classify() (classify/) with the
tenant's lookups of mailflow's own outbound messages (a signed VERP or reply address, a
Message-ID mailflow made, the last message a sender sent to this correspondent), and records
one of the Classified events (BounceDetected, ComplaintReceived, AutoReplyReceived,
UnsubscribeReceived, ReplyReceived, OtherReceived) in the consumer's own transaction, with a
row in inbound_classifications. That row is what makes it exactly once: the checkpoint moves in
the same transaction, and a message that already has a row is not classified again however
often its event is redelivered, replayed or rebuilt. Effects are outbound's (outbound/
feedback.py consumes these events); inbound only says what came back.

`reclassify()` is `mailflow inbound reprocess`: stored messages through the current
classifier again, an event only where the verdict (its digest) changed.

People: bounced and complained-about recipients are named by subject with their address
sealed; the correspondent (From) likewise, with the subject line and the reply's text.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row

from mailflow.config import Settings
from mailflow.consumers import inline
from mailflow.consumers.projection import Projection
from mailflow.events.envelope import Envelope, Metadata, NewEvent
from mailflow.events.store import EventStore
from mailflow.inbound import queries as q
from mailflow.inbound.classify import Classification, Context, Kind, Recipient, classify
from mailflow.inbound.events import (
    AutoReplyReceived,
    BounceDetected,
    Classified,
    ClassifiedRecipient,
    ComplaintReceived,
    MessageReceived,
    OtherReceived,
    ReplyReceived,
    UnsubscribeReceived,
)
from mailflow.infra import personal
from mailflow.log import get_logger
from mailflow.mail import tokens
from mailflow.mail.addresses import without_address
from mailflow.mail.message_ids import job_from_message_id

log = get_logger("mailflow.inbound.classifier")

NAME = "inbound_classifier"
SIGNED_LOCALS = ("bounces+", "reply+", "unsubscribe+")  # the local parts mailflow signs


def stream(message_id: str) -> str:
    """The received message's own stream (inbound/store.py): its classification is its history."""
    return f"inbound-message-{message_id}"


def digest(c: Classification) -> str:
    """What a verdict is, for comparing two classifications of one message."""
    return hashlib.sha256(orjson.dumps(c.to_dict(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


@dataclass
class Lookups:
    """One tenant's lookups of mailflow's own outbound messages, on the consumer's connection,
    for one batch (answers are kept for the batch: a DSN and the reply it follows ask twice)."""

    conn: psycopg.Connection
    tenant: str
    keys: list[bytes]  # the keyring's: signed addresses made before a key rotation still verify
    pepper: bytes  # names people (personal.subject_of)
    _jobs: dict[str, str | None] = field(default_factory=dict)
    _senders: frozenset[str] | None = None

    def job(self, job_id: str | None) -> str | None:
        if not job_id:
            return None
        try:
            uuid.UUID(job_id)
        except ValueError:
            return None
        if job_id not in self._jobs:
            row = self.conn.execute(q.TENANT_JOB, (self.tenant, job_id)).fetchone()
            self._jobs[job_id] = str(row[0]) if row else None
        return self._jobs[job_id]

    def signed(self, address: str) -> str | None:
        """The payload of a signed address mailflow made (VERP bounce, reply, unsubscribe)."""
        local = address.partition("@")[0].lower()
        if not local.startswith(SIGNED_LOCALS):
            return None
        try:
            return tokens.verify(self.keys, address.partition("@")[0].split("+", 1)[1])
        except tokens.BadToken:
            return None

    def job_for_address(self, address: str) -> str | None:
        payload = self.signed(address)
        return self.job(payload) if payload and not address.lower().startswith("unsubscribe+") else None

    def job_for_message_id(self, mid: str) -> str | None:
        return self.job(job_from_message_id(mid))

    def reply_address(self, address: str) -> bool:
        if self._senders is None:
            self._senders = frozenset(str(a) for (a,) in self.conn.execute(q.SENDER_ADDRESSES, (self.tenant,)))
        return address.lower() in self._senders

    def unsubscribe_address(self, address: str) -> bool:
        return address.lower().startswith("unsubscribe+") and self.signed(address) is not None

    def context(self, recipients: Iterable[str], mail_from: str = "") -> Context:
        return Context(
            envelope_recipients=tuple(recipients),
            mail_from=mail_from,
            job_for_address=self.job_for_address,
            job_for_message_id=self.job_for_message_id,
            reply_address=self.reply_address,
            unsubscribe_address=self.unsubscribe_address,
        )

    def last_job_to(self, sender_address: str, correspondent: str) -> str | None:
        row = self.conn.execute(q.LAST_JOB_TO, (self.tenant, correspondent, sender_address.lower())).fetchone()
        return str(row[0]) if row else None


def classify_stored(lookups: Lookups, raw: bytes, recipients: list[str], mail_from: str = "") -> Classification:
    """classify() with the tenant's lookups, then mailflow's last link: a reply to a sender's
    From that names no message of ours answers the last one that sender sent this person."""
    c = classify(raw, lookups.context(recipients, mail_from))
    if c.kind is Kind.REPLY and c.job_id is None and c.sender:
        ours = [r for r in recipients if lookups.reply_address(r)]
        if ours:
            job = lookups.last_job_to(ours[0], personal.subject_of(lookups.pepper, lookups.tenant, c.sender))
            if job is not None:
                c = replace(c, job_id=job, found_by="reply_address")
    return c


@dataclass(frozen=True)
class Found:
    """One received message and the classifier's verdict on it."""

    message_id: str
    mailbox: str
    verdict: Classification


def events_for(conn: psycopg.Connection, store: EventStore, tenant: str, found: list[Found]) -> list[Classified]:
    """The Classified events for a batch of verdicts: people named by subject, their values
    sealed (in one go: a key per person, created or read once for the batch)."""
    people = store.people
    plans = []
    items: list[tuple[str, dict[str, Any]]] = []
    for f in found:
        c = f.verdict
        correspondent = people.subject(conn, tenant, c.sender) if c.sender else None
        rows = [(people.subject(conn, tenant, r.address), r) for r in c.recipients if r.address]
        plans.append((f, correspondent, rows, len(items)))
        items += [(s, {"email": r.address}) for s, r in rows]
        if correspondent is not None:
            items.append((correspondent, {"sender": c.sender, "subject": c.subject, "text": c.reply_text}))
    sealed = personal.seal_kept(conn, tenant, items) if items else []
    out = []
    for f, correspondent, rows, at in plans:
        mine = sealed[at : at + len(rows)]
        out.append(_event(f, correspondent, sealed[at + len(rows)] if correspondent else None, rows, mine))
    return out


def _event(
    f: Found,
    correspondent: str | None,
    correspondent_sealed: str | None,
    rows: list[tuple[str, Recipient]],
    sealed: list[str | None],
) -> Classified:
    c = f.verdict
    recipients = [
        ClassifiedRecipient(
            subject=s,
            sealed=sealed[i],
            status=r.status,
            reply_code=r.reply_code,
            reason=r.reason,
            hard=r.hard,
            action=r.action,
            remote_mta=r.remote_mta,
            diagnostic=without_address(r.diagnostic, r.address)[:1000],
        )
        for i, (s, r) in enumerate(rows)
    ]
    common: dict[str, Any] = {
        "message_id": f.message_id,
        "mailbox": f.mailbox,
        "job_id": c.job_id,
        "found_by": c.found_by,
        "header_message_id": c.message_id[:998],
        "in_reply_to": c.in_reply_to[:998],
        "references": [r[:998] for r in c.references[-50:]],
        "correspondent": correspondent,
        "sealed": correspondent_sealed,
    }
    if c.kind is Kind.BOUNCE:
        return BounceDetected(
            **common, recipients=recipients, delayed=c.delayed, original_message_id=c.original.message_id[:998]
        )
    if c.kind is Kind.COMPLAINT:
        return ComplaintReceived(
            **common,
            recipients=recipients,
            feedback_type=c.feedback_type,
            original_message_id=c.original.message_id[:998],
        )
    if c.kind is Kind.AUTO_REPLY:
        return AutoReplyReceived(**common, why=c.auto_submitted[:200])
    if c.kind is Kind.UNSUBSCRIBE:
        return UnsubscribeReceived(**common)
    if c.kind is Kind.REPLY:
        return ReplyReceived(**common)
    return OtherReceived(**common)


class InboundClassifier(Projection):
    """The consumer group that classifies received mail (module docstring)."""

    name = NAME
    description = "classifies received mail (bounce, complaint, auto-reply, reply ...) once, as events"

    def __init__(self) -> None:
        self.store: EventStore | None = None

    def bind(self, store: EventStore, settings: Settings | None = None) -> None:
        self.store = store

    def apply(self, conn: psycopg.Connection, events: list[Envelope]) -> None:
        received = [e for e in events if e.type == MessageReceived.event_type]
        if not received:
            return
        assert self.store is not None, "InboundClassifier.bind(store) was not called"
        by_tenant: dict[str, list[Envelope]] = {}
        for e in received:
            by_tenant.setdefault(e.metadata.tenant or "default", []).append(e)
        with inline.writing(self.store, conn) as w:
            for tenant, envs in sorted(by_tenant.items()):
                done = {
                    r["message_id"] for r in _rows(conn, q.CLASSIFIED, (tenant, [e.data["message_id"] for e in envs]))
                }
                todo: dict[str, Envelope] = {}
                for e in envs:  # a message once, however often its event comes
                    if e.data["message_id"] not in done:
                        todo.setdefault(e.data["message_id"], e)
                if not todo:
                    continue
                items = [(mid, e.data["sha256"], list(e.data["recipients"])) for mid, e in todo.items()]
                found = classify_batch(conn, self.store, tenant, items)
                events_ = events_for(conn, self.store, tenant, found)
                new: list[tuple[str, NewEvent]] = []
                for f, event in zip(found, events_, strict=True):
                    e = todo[f.message_id]
                    md = Metadata(
                        correlation_id=e.metadata.correlation_id or f.message_id, causation_id=str(e.id), tenant=tenant
                    )
                    new.append((stream(f.message_id), event.to_new(md)))
                _remember(conn, tenant, found)
                # By type: the threads inline projection places a run of one type in one go.
                w.record(sorted(new, key=lambda item: item[1].type))

    def reset(self, conn: psycopg.Connection, from_position: int, applied_upto: int) -> None:
        """Nothing to undo: a message keeps its classification (its event is in the log), so a
        replay classifies only messages it has not seen. `mailflow inbound reprocess` is the
        way to classify stored mail again."""


def _lookups(conn: psycopg.Connection, store: EventStore, tenant: str) -> Lookups:
    return Lookups(conn, tenant, store.people.vault.keyring.verifying_keys, store.people.pepper(conn))


def _rows(conn: psycopg.Connection, query: str, params: Any) -> list[dict[str, Any]]:
    return conn.cursor(row_factory=dict_row).execute(query, params).fetchall()


def classify_batch(
    conn: psycopg.Connection, store: EventStore, tenant: str, items: list[tuple[str, str, list[str]]]
) -> list[Found]:
    """Classify stored messages, given as (message id, sha256, recipients). A message whose raw
    copy is gone (dropped from quarantine, its sender erased) before it was classified is
    skipped: there is nothing left to say what it was."""
    lookups = _lookups(conn, store, tenant)
    raw = {r["sha256"]: bytes(r["data"]) for r in _rows(conn, q.RECEIVED_RAW, (tenant, [sha for _, sha, _ in items]))}
    found = []
    for mid, sha, recipients in items:
        data = raw.get(sha)
        if data is None:
            log.info("classify.no_raw", message_id=mid, tenant=tenant)
            continue
        found.append(Found(mid, recipients[0] if recipients else "", classify_stored(lookups, data, recipients)))
    return found


def _remember(conn: psycopg.Connection, tenant: str, found: list[Found]) -> None:
    now = datetime.now(UTC)
    conn.cursor().executemany(
        q.PUT_CLASSIFICATION,
        [(tenant, f.message_id, str(f.verdict.kind), digest(f.verdict), f.verdict.job_id, now) for f in found],
    )


@dataclass(frozen=True)
class Reprocessed:
    seen: int
    changed: int
    kinds: dict[str, int]  # new kind -> how many changed to it


def reclassify(
    store: EventStore,
    tenant: str,
    *,
    since: datetime,
    kind: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    batch: int = 200,
) -> Reprocessed:
    """Run stored messages through the current classifier again; record an event (reclassified)
    only where the verdict changed. Effects downstream apply once per event, and outbound's
    feedback is keyed by message and person, so a changed verdict never counts twice."""
    seen = changed = 0
    kinds: dict[str, int] = {}
    with store.pool.connection() as conn:
        rows = (
            conn.cursor(row_factory=dict_row)
            .execute(q.TO_REPROCESS, {"tenant": tenant, "since": since, "kind": kind})
            .fetchall()
        )
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        with store.pool.connection() as conn, inline.writing(store, conn) as w:
            old = {
                r["message_id"]: r["digest"]
                for r in _rows(conn, q.CLASSIFIED, (tenant, [r["message_id"] for r in part]))
            }
            seen += len(part)
            items = [(r["message_id"], r["sha256"], list(r["recipients"])) for r in part]
            found = [
                f for f in classify_batch(conn, store, tenant, items) if old.get(f.message_id) != digest(f.verdict)
            ]
            for f in found:
                kinds[str(f.verdict.kind)] = kinds.get(str(f.verdict.kind), 0) + 1
            changed += len(found)
            events_ = events_for(conn, store, tenant, found)
            w.record(
                [
                    (
                        stream(f.message_id),
                        e.model_copy(update={"reclassified": f.message_id in old}).to_new(
                            Metadata(correlation_id=f"reprocess-{f.message_id}", tenant=tenant)
                        ),
                    )
                    for f, e in zip(found, events_, strict=True)
                ]
            )
            _remember(conn, tenant, found)
        if progress is not None:
            progress(min(start + batch, len(rows)), len(rows))
    return Reprocessed(seen, changed, kinds)
