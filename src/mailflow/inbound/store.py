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
from mailflow.events.envelope import Metadata
from mailflow.events.store import EventStore
from mailflow.inbound import queries as q
from mailflow.inbound.events import MessageReceived
from mailflow.infra import personal
from mailflow.log import get_logger

log = get_logger("mailflow.inbound")


@dataclass
class Incoming:
    """One message as the session accepted it, for the tenants its recipients belong to."""

    recipients: dict[str, list[str]]  # tenant -> its recipients
    data: bytes
    mail_from: str
    client_ip: str
    helo: str
    tls: bool
    future: Future[dict[str, str]] = field(default_factory=Future)  # tenant -> message id

    @cached_property
    def sha256(self) -> str:  # read several times by the committer: hashed once
        return hashlib.sha256(self.data).hexdigest()


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


def _sealed_senders(conn: Any, tenant: str, items: list[tuple[str, dict[str, Any]]]) -> list[str | None]:
    """The senders' values sealed under their subjects (None for a sender erased on request:
    their message is kept, their address is not put in the log again)."""
    try:
        return list(personal.seal_many(conn, tenant, items))
    except personal.Erased:
        gone = personal.erased(conn, tenant, [s for s, _ in items])
        kept = [(s, v) for s, v in items if s not in gone]
        sealed = iter(personal.seal_many(conn, tenant, kept))
        return [None if s in gone else next(sealed) for s, _ in items]


def write(store: EventStore, batch: list[Incoming]) -> list[dict[str, str]]:
    """One transaction for the batch (an operator's store: messages of every tenant)."""
    ids: list[dict[str, str]] = [{} for _ in batch]
    with inline.writing(store) as w:
        by_tenant: dict[str, list[int]] = {}
        for i, m in enumerate(batch):
            for tenant in m.recipients:
                by_tenant.setdefault(tenant, []).append(i)
        subjects: dict[tuple[str, int], str] = {}
        for tenant, where in by_tenant.items():
            for i in where:
                if batch[i].mail_from:
                    subjects[(tenant, i)] = store.people.subject(w.conn, tenant, batch[i].mail_from)
        rows = [
            (t, batch[i].sha256, len(batch[i].data), batch[i].data, subjects.get((t, i)))
            for t, where in by_tenant.items()
            for i in where
        ]
        new = {(t, sha) for t, sha in w.conn.execute(q.PUT_RAW, tuple(list(c) for c in zip(*rows))).fetchall()}
        seen = [
            (t, batch[i].sha256) for t, where in by_tenant.items() for i in where if (t, batch[i].sha256) not in new
        ]
        known = (
            {
                (t, sha): mid
                for t, sha, mid in w.conn.execute(q.KNOWN_MESSAGES, ([t for t, _ in seen], [h for _, h in seen]))
            }
            if seen
            else {}
        )
        events = []
        for tenant, where in by_tenant.items():
            fresh = [i for i in where if (tenant, batch[i].sha256) not in known]
            items = [
                (subjects[(tenant, i)], {"mail_from": batch[i].mail_from, "client_ip": batch[i].client_ip})
                for i in fresh
                if (tenant, i) in subjects
            ]
            sealed = (
                dict(zip([i for i in fresh if (tenant, i) in subjects], _sealed_senders(w.conn, tenant, items)))
                if items
                else {}
            )
            for i in where:
                m = batch[i]
                key = (tenant, m.sha256)
                if key in known:  # sent before (or twice in this batch): the same message
                    ids[i][tenant] = known[key]
                    continue
                message_id = str(uuid.uuid4())
                known[key] = ids[i][tenant] = message_id
                subject = subjects.get((tenant, i))
                event = MessageReceived(
                    message_id=message_id,
                    sha256=m.sha256,
                    size=len(m.data),
                    recipients=m.recipients[tenant],
                    sender_subject=subject,
                    sealed=sealed.get(i),
                    client_ip=None if subject else m.client_ip,
                    helo=m.helo[:255],
                    tls=m.tls,
                )
                events.append((f"inbound-message-{message_id}", event.to_new(Metadata(tenant=tenant))))
        if events:
            w.record(events)
    return ids
