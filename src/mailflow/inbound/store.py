"""Inbound room: durable acceptance - a message is committed before its 250, with group commits.

SMTP sessions hand each accepted message to one Committer thread, which writes whatever has
gathered (up to `max_batch`; by default it does not wait for more: what arrives during one
commit's fsync makes the next batch, so batches grow with the load) in one transaction: the
raw bytes into raw_messages (by tenant and sha256: the same message twice is stored once)
and one MessageReceived event per tenant it is for. Only when that transaction has
committed is each session's future resolved, and only then does the session answer 250. A
failed transaction fails every future in it, and the sessions answer 451: the client keeps
the message and tries again, nothing is lost. One fsync serves a whole batch.

A message sent again with the same bytes - the server was killed after the commit but
before the 250 reached the client, which then retried - is recognised by its sha256 and
answered 250 with the first one's id, without a second event: stored exactly once.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from mailflow.consumers import inline
from mailflow.events.envelope import Metadata, NewEvent
from mailflow.events.store import EventStore
from mailflow.inbound import queries as q
from mailflow.inbound.events import Delivery, MessageQuarantined, MessageReceived, MessageRejected, MessageRouted
from mailflow.infra import personal
from mailflow.log import get_logger

log = get_logger("mailflow.inbound")


@dataclass(frozen=True)
class Outcome:
    """What becomes of one tenant's part of a message: `routed` to its deliveries,
    `quarantined` (held, `reason`), or `rejected` at DATA (nothing stored; `reason`)."""

    kind: str = "routed"
    deliveries: tuple[Delivery, ...] = ()
    reason: str = ""


ROUTED = Outcome()


@dataclass
class Incoming:
    """One message as the session accepted it, for the tenants its recipients belong to."""

    recipients: dict[str, list[str]]  # tenant -> its recipients
    data: bytes
    mail_from: str
    client_ip: str
    helo: str
    tls: bool
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # tenant -> outcome (default ROUTED)
    header: bytes = b""  # prepended to the stored copy (Authentication-Results)
    auth: dict[str, Any] | None = None
    spam: dict[str, Any] | None = None
    defects: list[str] = field(default_factory=list)
    future: Future[dict[str, str]] = field(default_factory=Future)  # tenant -> message id

    @cached_property
    def sha256(self) -> str:  # of the bytes as received: how a retransmission is recognised
        return hashlib.sha256(self.data).hexdigest()

    def outcome(self, tenant: str) -> Outcome:
        return self.outcomes.get(tenant, ROUTED)


class Committer:
    def __init__(self, store: EventStore, *, max_batch: int = 256, max_wait_s: float = 0.0) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue: queue.Queue[Incoming | None] = queue.Queue()
        self.batches = 0
        self.committed = 0
        self._thread = threading.Thread(target=self._run, name="inbound-committer", daemon=True)
        self._thread.start()

    def submit(self, message: Incoming) -> Future[dict[str, str]]:
        self.queue.put(message)
        return message.future

    def close(self, timeout: float = 30.0) -> None:
        """Write what was handed in, then stop."""
        self.queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[Incoming]) -> None:
        try:
            ids = write(self.store, batch)
        except Exception as exc:  # noqa: BLE001 - every session hears of it, and answers 451
            log.warning("inbound.commit_failed", messages=len(batch), error=f"{type(exc).__name__}: {exc}"[:300])
            for m in batch:
                m.future.set_exception(exc)
            return
        self.batches += 1
        self.committed += len(batch)
        for m, got in zip(batch, ids):
            m.future.set_result(got)


Part = tuple[str, int]  # (tenant, index in the batch): one tenant's share of one message


def write(store: EventStore, batch: list[Incoming]) -> list[dict[str, str]]:
    """One transaction for the batch (an operator's store: messages of every tenant)."""
    ids: list[dict[str, str]] = [{} for _ in batch]
    parts = [(t, i) for i, m in enumerate(batch) for t in m.recipients]
    stored = [(t, i) for t, i in parts if batch[i].outcome(t).kind != "rejected"]
    with inline.writing(store) as w:
        subjects = {
            (t, i): store.people.subject(w.conn, t, batch[i].mail_from) for t, i in stored if batch[i].mail_from
        }
        known = _put_raw(w.conn, batch, stored, subjects)
        sealed = _seal_senders(w.conn, batch, [p for p in stored if (p[0], batch[p[1]].sha256) not in known], subjects)
        # Every MessageReceived first, then what became of each: each stream keeps its order,
        # and the projections apply each kind of event to the whole batch in one statement.
        events: list[tuple[str, NewEvent]] = []
        outcomes: list[tuple[str, NewEvent]] = []
        for tenant, i in parts:
            m, outcome, md = batch[i], batch[i].outcome(tenant), Metadata(tenant=tenant)
            if outcome.kind == "rejected":
                rejected = MessageRejected(sha256=m.sha256, stage="data", reason=outcome.reason)
                events.append((f"inbound-rejected-{uuid.uuid4()}", rejected.to_new(md)))
                continue
            key = (tenant, m.sha256)
            if key in known:  # sent before (or twice in this batch): the same message
                ids[i][tenant] = known[key]
                continue
            message_id = known[key] = ids[i][tenant] = str(uuid.uuid4())
            stream = f"inbound-message-{message_id}"
            events.append(
                (
                    stream,
                    _received(m, tenant, message_id, subjects.get((tenant, i)), sealed.get((tenant, i))).to_new(md),
                )
            )
            if outcome.kind == "quarantined":
                outcomes.append((stream, MessageQuarantined(message_id=message_id, reason=outcome.reason).to_new(md)))
            else:
                routed = MessageRouted(message_id=message_id, deliveries=list(outcome.deliveries))
                outcomes.append((stream, routed.to_new(md)))
        events.sort(key=lambda e: e[1].type)  # rejections apart from receptions
        outcomes.sort(key=lambda e: e[1].type)
        if events or outcomes:
            w.record(events + outcomes)
    return ids


def _put_raw(conn: Any, batch: list[Incoming], parts: list[Part], subjects: dict[Part, str]) -> dict:
    """Store the raw copies not stored before; (tenant, sha256) -> message id of those that were."""
    if not parts:
        return {}
    # In one order in every batch, so that the batches of several server processes (--processes)
    # never wait for each other's rows in a circle.
    ordered = sorted(parts, key=lambda p: (p[0], batch[p[1]].sha256))
    rows = [
        (t, batch[i].sha256, len(batch[i].data), batch[i].header + batch[i].data, subjects.get((t, i)))
        for t, i in ordered
    ]
    new = {(t, sha) for t, sha in conn.execute(q.PUT_RAW, tuple(list(c) for c in zip(*rows))).fetchall()}
    seen = [(t, batch[i].sha256) for t, i in parts if (t, batch[i].sha256) not in new]
    if not seen:
        return {}
    found = conn.execute(q.KNOWN_MESSAGES, ([t for t, _ in seen], [h for _, h in seen]))
    return {(t, sha): mid for t, sha, mid in found}


def _seal_senders(conn: Any, batch: list[Incoming], parts: list[Part], subjects: dict[Part, str]) -> dict:
    """Each new part's sender, sealed under its subject: part -> sealed value (None: erased)."""
    sealed: dict[Part, str | None] = {}
    for tenant in sorted({t for t, _ in parts}):
        mine = [(t, i) for t, i in parts if t == tenant and (t, i) in subjects]
        items = [(subjects[p], {"mail_from": batch[p[1]].mail_from, "client_ip": batch[p[1]].client_ip}) for p in mine]
        if items:
            sealed.update(zip(mine, personal.seal_kept(conn, tenant, items)))
    return sealed


def _received(m: Incoming, tenant: str, message_id: str, subject: str | None, sealed: str | None) -> MessageReceived:
    return MessageReceived(
        message_id=message_id,
        sha256=m.sha256,
        size=len(m.data),
        recipients=m.recipients[tenant],
        sender_subject=subject,
        sealed=sealed,
        client_ip=None if subject else m.client_ip,
        helo=m.helo[:255],
        tls=m.tls,
        auth=m.auth,
        spam=m.spam,
        defects=m.defects,
    )
