"""Inbound room: conversation threads, decided - JWZ threading and mailflow's rules on top (pure).

`jwz()` is Jamie Zawinski's published algorithm (https://www.jwz.org/doc/threading.html):
an id_table of containers, References linked in order without making a loop, the message's
own parent taken from the last reference (In-Reply-To when it is not in References), the
root set, and the pruning of empty containers. Its subject grouping step is left out: plain
subject matching is how other systems attach one customer's mail to another's ticket.

`threads()` groups received messages into mailflow's threads:

1. A message that names one of our jobs (its `job_id`: found by VERP, reply address,
   In-Reply-To or References), or descends by References from a message or Message-ID that
   does, is in the thread of that job *and its own correspondent*: two people answering one
   campaign message are two threads, even when JWZ puts them under the same parent. The job's
   own Message-ID (`<job_id@domain>`) is the root of that thread: the outbound message a reply
   answers is part of it.
2. Anything else follows its JWZ tree, cut by mailbox. Nothing ever joins across tenants.
3. The subject fallback, for clients that drop references: a message with no References, no
   In-Reply-To and no job joins the thread of an earlier message with the same normalized
   subject, the same correspondent and the same mailbox, when that thread's last message (of
   those before it) is at most `window` older. Bounces and complaints never match by subject
   (every DSN of one MTA has the same From and subject).

Messages are taken in one canonical order (time, then id), so the result is the same for
any order they arrive in. The projection (threads_projection.py) runs this function over
the messages a new one can affect, so the incremental threads are the rebuilt threads.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from mailflow.mail.message_ids import job_from_message_id

WINDOW = timedelta(days=30)
KINDS = ("reply", "auto_reply", "bounce", "complaint", "unsubscribe", "other")
# The classification events (inbound/events.py) and the kind each one is in a thread.
KIND_OF = {
    "ReplyReceived": "reply",
    "AutoReplyReceived": "auto_reply",
    "BounceDetected": "bounce",
    "ComplaintReceived": "complaint",
    "UnsubscribeReceived": "unsubscribe",
    "OtherReceived": "other",
}
NOT_BY_SUBJECT = frozenset({"bounce", "complaint"})
_NAMESPACE = uuid.UUID("5b0c3d9e-7f1a-4c2e-9a57-3e1f0d2b6c41")

# Reply and forward prefixes, in the languages clients use: Re, Fwd, AW (German), SV (Nordic),
# Antw (Dutch), TR (French), RIF (Italian), Odp (Polish), ... with a count (RE[2]:, Re^2:).
_PREFIX = re.compile(
    r"^\s*(?:re|fwd?|aw|wg|sv|vs|vb|antw|antwort|doorst|tr|rif|r|rv|enc|res|odp|pd|ynt|yan|atb|"
    r"ref|réf|回复|回覆|答复|转发|轉寄)\s*(?:\[\d+\]|\^\d+|\(\d+\))?\s*[:\uff1a]\s*",
    re.IGNORECASE,
)


def normalize_subject(subject: str | None) -> str:
    """A subject line without its reply and forward prefixes, whitespace folded, case folded
    ('' when nothing is left)."""
    s = " ".join((subject or "").split())
    while True:
        stripped = _PREFIX.sub("", s, count=1)
        if stripped == s:
            break
        s = stripped
    return s.casefold()


def normalize_id(value: str) -> str:
    """A Message-ID as compared: `<inner>`, without whitespace ('' for none)."""
    inner = "".join(value.split()).strip("<>")
    return f"<{inner}>" if inner else ""


@dataclass(frozen=True)
class Message:
    """One received message as threading sees it (made from a Classified event by from_event)."""

    message_id: str  # the received message (MessageReceived.message_id)
    tenant: str
    at: datetime
    mailbox: str = ""
    kind: str = "other"
    header_message_id: str = ""
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    job_id: str | None = None
    correspondent: str | None = None  # who the conversation is with (a subject, never an address)
    subject_key: str | None = None  # equal for equal normalized subjects; None: never matched by subject

    @property
    def order(self) -> tuple[datetime, str]:
        return (self.at, self.message_id)

    @property
    def parents(self) -> list[str]:
        """References in order, In-Reply-To last when References do not already end with it."""
        refs = [r for r in (normalize_id(x) for x in self.references) if r]
        reply_to = normalize_id(self.in_reply_to)
        if reply_to and (not refs or refs[-1] != reply_to):
            refs = [r for r in refs if r != reply_to] + [reply_to]
        return refs

    @property
    def ids(self) -> set[str]:
        """Every Message-ID the message names: its own and the ones it answers."""
        own = normalize_id(self.header_message_id)
        return {*self.parents, *([own] if own else [])}


def from_event(event_type: str, data: dict[str, Any], tenant: str, at: datetime, subject_key: str | None) -> Message:
    """A Classified event's message. A bounce or a complaint is a conversation with the person
    it is about (its first recipient), not with the MTA that sent it."""
    kind = KIND_OF[event_type]
    party = data.get("correspondent")
    if kind in NOT_BY_SUBJECT:
        about = [r.get("subject") for r in data.get("recipients") or [] if r.get("subject")]
        party = about[0] if about else party
    return Message(
        message_id=str(data["message_id"]),
        tenant=tenant,
        at=at,
        mailbox=(data.get("mailbox") or "").lower(),
        kind=kind,
        header_message_id=data.get("header_message_id") or "",
        in_reply_to=data.get("in_reply_to") or "",
        references=tuple(data.get("references") or ()),
        job_id=data.get("job_id") or None,
        correspondent=party,
        subject_key=None if kind in NOT_BY_SUBJECT else subject_key,
    )


# -- JWZ -------------------------------------------------------------------------------------


@dataclass(eq=False)
class Container:
    """A node of JWZ's id_table: a message, or an empty placeholder for an id only referenced."""

    id: str
    message: Message | None = None
    parent: Container | None = None
    children: list[Container] = field(default_factory=list)

    def reaches(self, other: Container) -> bool:
        """`other` is this container or one of its ancestors."""
        node: Container | None = self
        while node is not None:
            if node is other:
                return True
            node = node.parent
        return False

    def adopt(self, child: Container) -> None:
        if child.parent is not None:
            child.parent.children.remove(child)
        child.parent = self
        self.children.append(child)

    def orphan(self) -> None:
        if self.parent is not None:
            self.parent.children.remove(self)
            self.parent = None

    def messages(self) -> list[Message]:
        found = [self.message] if self.message else []
        for c in self.children:
            found.extend(c.messages())
        return found


def link(messages: Iterable[Message]) -> dict[str, Container]:
    """JWZ step 1, in canonical order: the id_table with every message and placeholder linked."""
    table: dict[str, Container] = {}

    def get(mid: str) -> Container:
        found = table.get(mid)
        if found is None:
            found = table[mid] = Container(mid)
        return found

    for m in sorted(messages, key=lambda m: m.order):
        own = normalize_id(m.header_message_id)
        container = table.get(own) if own else None
        if container is None or container.message is not None:  # none, or a second message with one id
            container = get(own if own and own not in table else f"\x00{m.message_id}")
        container.message = m
        parents = m.parents
        for above, below in pairwise(parents):
            a, b = get(above), get(below)
            if b.parent is None and not a.reaches(b):  # linked already: keep; a loop: refuse
                a.adopt(b)
        if parents:
            last = get(parents[-1])
            if not last.reaches(container):  # the message's own headers are definitive
                last.adopt(container)
        else:
            container.orphan()
    return table


def prune(containers: Sequence[Container]) -> list[Container]:
    """JWZ step 4: drop empty containers without children; an empty one's children take its
    place, except at the root where it stays when it holds several (their common parent)."""
    out: list[Container] = []
    for c in containers:
        kids = prune(c.children)
        c.children = kids
        for k in kids:
            k.parent = c
        if c.message is None:
            if not kids:
                continue
            if c.parent is not None or len(kids) == 1:
                for k in kids:
                    k.parent = c.parent
                out.extend(kids)
                continue
        out.append(c)
    return out


def jwz(messages: Iterable[Message]) -> list[Container]:
    """The root set of JWZ threads (steps 1 to 4), in canonical order of their first message."""
    table = link(messages)
    roots = prune([c for c in table.values() if c.parent is None])
    for r in roots:
        r.parent = None
    return sorted(roots, key=lambda r: min(m.order for m in r.messages()))


# -- mailflow's threads ------------------------------------------------------------------------


@dataclass(frozen=True)
class Thread:
    thread_id: str
    tenant: str
    mailbox: str  # of its first message (a job's thread is not bound to one mailbox)
    job_id: str | None
    correspondent: str | None
    subject_key: str | None
    messages: tuple[Message, ...]  # in canonical order
    ids: frozenset[str]  # every Message-ID its messages name, placeholders included

    @property
    def first_at(self) -> datetime:
        return self.messages[0].at

    @property
    def last_at(self) -> datetime:
        return max(m.at for m in self.messages)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        for m in self.messages:
            counts[m.kind] += 1
        return counts


def job_thread_id(tenant: str, job_id: str, correspondent: str | None) -> str:
    """A job's thread with one person has one id from its first message on."""
    return str(uuid.uuid5(_NAMESPACE, f"{tenant}\njob\n{job_id}\n{correspondent or ''}"))


def message_thread_id(tenant: str, message_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{tenant}\nmessage\n{message_id}"))


Key = tuple[str, str, str]  # ("job", job_id, correspondent) | ("tree", root id, mailbox)


def threads(messages: Iterable[Message], window: timedelta = WINDOW) -> list[Thread]:
    """mailflow's threads of the messages (see the module docstring), oldest first.

    One message per message_id: the last one given wins (a reclassification)."""
    latest: dict[str, Message] = {}
    for m in messages:
        latest[m.message_id] = m
    by_tenant: dict[str, list[Message]] = {}
    for m in latest.values():
        by_tenant.setdefault(m.tenant, []).append(m)
    found: list[Thread] = []
    for tenant in sorted(by_tenant):
        found.extend(_tenant_threads(tenant, by_tenant[tenant], window))
    return sorted(found, key=lambda t: (t.messages[0].order, t.thread_id))


def _tenant_threads(tenant: str, messages: list[Message], window: timedelta) -> list[Thread]:
    table = link(messages)
    # The job's own Message-ID, where a message that names the job references it.
    job_ids = {
        mid: m.job_id
        for c in table.values()
        if (m := c.message) is not None and m.job_id
        for mid in m.parents
        if job_from_message_id(mid) == m.job_id
    }

    def anchor(c: Container) -> str | None:
        """The job of the container's message or Message-ID, else of its nearest ancestor's."""
        node: Container | None = c
        while node is not None:
            job = (node.message.job_id if node.message else None) or job_ids.get(node.id)
            if job:
                return job
            node = node.parent
        return None

    def root(c: Container) -> Container:
        while c.parent is not None:
            c = c.parent
        return c

    containers = sorted((c for c in table.values() if c.message), key=lambda c: c.message.order)  # type: ignore[union-attr]
    received = [c.message for c in containers if c.message is not None]
    key_of: dict[str, Key] = {}
    for c, m in zip(containers, received):
        job = anchor(c)
        key_of[m.message_id] = ("job", job, m.correspondent or "") if job else ("tree", root(c).id, m.mailbox)

    groups = _Groups(key_of)

    def parties(g: Key) -> set[str]:
        """The correspondents in g's union (a job's thread takes only its own correspondent's)."""
        return {m.correspondent or "" for m in received if groups.find(key_of[m.message_id]) == g}

    # The subject fallback, in canonical order: a message without references or job joins the
    # latest fitting thread of those before it (same mailbox, correspondent and subject).
    for i, m in enumerate(received):
        if m.parents or key_of[m.message_id][0] == "job" or not m.correspondent or not m.subject_key:
            continue
        mine = groups.find(key_of[m.message_id])
        if groups.job(mine):
            continue
        last: dict[Key, datetime] = {}
        candidates: set[Key] = set()
        for o in received[:i]:
            g = groups.find(key_of[o.message_id])
            last[g] = max(last.get(g, o.at), o.at)
            if (o.mailbox, o.correspondent, o.subject_key) == (m.mailbox, m.correspondent, m.subject_key):
                candidates.add(g)
        fit = [
            g
            for g in candidates
            if g != mine and m.at - last[g] <= window and (not groups.job(g) or parties(mine) == {g[2]})
        ]
        if fit:
            groups.union(mine, min(fit, key=lambda g: (-last[g].timestamp(), g)))

    members: dict[Key, list[Message]] = {}
    for m in received:
        members.setdefault(groups.find(key_of[m.message_id]), []).append(m)
    out = []
    for key, msgs in members.items():
        first = msgs[0]
        is_job = key[0] == "job"
        out.append(
            Thread(
                thread_id=job_thread_id(tenant, key[1], key[2] or None)
                if is_job
                else message_thread_id(tenant, first.message_id),
                tenant=tenant,
                mailbox=first.mailbox,
                job_id=key[1] if is_job else None,
                correspondent=(key[2] or None) if is_job else first.correspondent,
                subject_key=next((m.subject_key for m in msgs if m.subject_key), None),
                messages=tuple(msgs),
                ids=frozenset(i for m in msgs for i in m.ids),
            )
        )
    return out


class _Groups:
    """Union-find over thread keys; a union's representative is its job key if it has one,
    else the key of its earliest message."""

    def __init__(self, key_of: dict[str, Key]) -> None:
        self.up: dict[Key, Key] = {}
        self.rank: dict[Key, int] = {}  # canonical position of a key's first message
        for i, k in enumerate(key_of.values()):
            self.up.setdefault(k, k)
            self.rank.setdefault(k, i)

    def find(self, k: Key) -> Key:
        while self.up[k] != k:
            self.up[k] = self.up[self.up[k]]
            k = self.up[k]
        return k

    @staticmethod
    def job(k: Key) -> bool:
        return k[0] == "job"

    def union(self, a: Key, b: Key) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.job(a) or (not self.job(b) and self.rank[a] < self.rank[b]):
            a, b = b, a
        self.up[a] = b
