"""Inbound room: the `threads` inline projection - conversations kept in step with the
classification events - and its reads for `mailflow threads`.

threads.py decides; this module keeps `threads`, `thread_messages` and `thread_ids` in step.
A classified message (BounceDetected, ComplaintReceived, AutoReplyReceived,
UnsubscribeReceived, ReplyReceived, OtherReceived) can link or merge threads made before it,
so it is not appended to one: the projection loads every stored message it could affect - the
threads that share one of its Message-IDs (placeholders from References included), its job,
or its mailbox, correspondent and subject - and runs `threads.threads()` over them again,
until no further thread is touched. The incremental tables are therefore what the function
makes of the whole log, and `mailflow projections rebuild threads` gives the same threads.
Writers of one tenant's threads take turns (Lock.THREADS), so none decides without the
messages another has just placed.

Nothing personal is in these tables: people are subjects, the subject line is a digest keyed
by the sender's own key (equal subjects of one sender match; nobody can read or search it),
and the From, subject and a reply's text are opened from the sealed value when shown. An
erased person's sealed values and subject digests are cleared (on_erasure), and a rebuild
does not store them again: it cannot open them, and stores what it cannot open as nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Sequence
from itertools import groupby
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailflow.consumers.inline import InlineProjection, register
from mailflow.errors import NotFoundError, UsageError
from mailflow.events.envelope import Envelope
from mailflow.inbound import threads as th
from mailflow.infra import personal
from mailflow.infra.locks import Lock

# One tenant's messages are threaded one transaction at a time: two writers placing messages
# that link each other must not each decide without seeing the other's (class of per-tenant
# locks, second key hashtext(tenant)). Its home is infra/locks.py (Lock.THREADS).
LOCK_TENANT = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"

COUNT_COLUMNS = {
    "reply": "replies",
    "auto_reply": "auto_replies",
    "bounce": "bounces",
    "complaint": "complaints",
    "unsubscribe": "unsubscribes",
    "other": "others",
}

# -- SQL, by name ----------------------------------------------------------------------------

_MESSAGE_COLUMNS = """
message_id::text AS message_id, tenant, thread_id::text AS thread_id, kind, at, mailbox, job_id::text AS job_id,
header_message_id, in_reply_to, refs, correspondent, sender, subject_key, sealed
"""
STORED_MESSAGES = f"SELECT {_MESSAGE_COLUMNS} FROM thread_messages WHERE tenant = %s AND message_id = ANY(%s::uuid[])"
THREAD_MESSAGES = f"""
SELECT {_MESSAGE_COLUMNS} FROM thread_messages WHERE tenant = %s AND thread_id = ANY(%s::uuid[])
ORDER BY at, message_id
"""
# The threads a message can affect: those naming one of its Message-IDs, of its job, or with a
# message of its mailbox, correspondent and subject.
TOUCHED_THREADS = """
SELECT thread_id::text FROM thread_ids WHERE tenant = %(tenant)s AND rfc_id = ANY(%(ids)s::text[])
UNION
SELECT thread_id::text FROM thread_messages WHERE tenant = %(tenant)s AND job_id = ANY(%(jobs)s::uuid[])
UNION
SELECT m.thread_id::text FROM thread_messages m
JOIN unnest(%(mailboxes)s::text[], %(people)s::text[], %(subjects)s::text[]) AS s(mailbox, correspondent, subject_key)
  ON (m.mailbox, m.correspondent, m.subject_key) = (s.mailbox, s.correspondent, s.subject_key)
WHERE m.tenant = %(tenant)s
"""
DELETE_THREADS = "DELETE FROM threads WHERE tenant = %s AND id = ANY(%s::uuid[])"
DELETE_THREAD_IDS = "DELETE FROM thread_ids WHERE tenant = %s AND thread_id = ANY(%s::uuid[])"
INSERT_THREAD = """
INSERT INTO threads (tenant, id, mailbox, job_id, correspondent, subject_key, first_at, last_at, messages,
                     replies, auto_replies, bounces, complaints, unsubscribes, others)
VALUES (%(tenant)s, %(id)s, %(mailbox)s, %(job_id)s, %(correspondent)s, %(subject_key)s, %(first_at)s,
        %(last_at)s, %(messages)s, %(replies)s, %(auto_replies)s, %(bounces)s, %(complaints)s,
        %(unsubscribes)s, %(others)s)
"""
INSERT_THREAD_IDS = """
INSERT INTO thread_ids (tenant, rfc_id, thread_id) SELECT %s, unnest(%s::text[]), %s ON CONFLICT DO NOTHING
"""
PUT_MESSAGE = """
INSERT INTO thread_messages (tenant, message_id, thread_id, kind, at, mailbox, job_id, header_message_id,
                             in_reply_to, refs, correspondent, sender, subject_key, sealed)
VALUES (%(tenant)s, %(message_id)s, %(thread_id)s, %(kind)s, %(at)s, %(mailbox)s, %(job_id)s,
        %(header_message_id)s, %(in_reply_to)s, %(refs)s, %(correspondent)s, %(sender)s, %(subject_key)s,
        %(sealed)s)
ON CONFLICT (tenant, message_id) DO UPDATE SET
    thread_id = excluded.thread_id, kind = excluded.kind, mailbox = excluded.mailbox, job_id = excluded.job_id,
    header_message_id = excluded.header_message_id, in_reply_to = excluded.in_reply_to, refs = excluded.refs,
    correspondent = excluded.correspondent, sender = excluded.sender, subject_key = excluded.subject_key,
    sealed = excluded.sealed
"""
MOVE_MESSAGE = "UPDATE thread_messages SET thread_id = %s WHERE tenant = %s AND message_id = %s"

FIND_THREAD = "SELECT id::text FROM threads WHERE id::text LIKE %(prefix)s || '%%' ORDER BY id LIMIT 2"
_THREAD_COLUMNS = """
t.id::text AS id, t.tenant, t.mailbox, t.job_id::text AS job_id, t.correspondent, t.first_at, t.last_at,
t.messages, t.replies, t.auto_replies, t.bounces, t.complaints, t.unsubscribes, t.others,
f.sender AS first_sender, f.sealed AS first_sealed
"""
# The first message with something to show: the correspondent's own, else any.
_FIRST_SHOWN = """
LEFT JOIN LATERAL (
    SELECT m.sender, m.sealed FROM thread_messages m
    WHERE m.tenant = t.tenant AND m.thread_id = t.id AND m.sealed IS NOT NULL
    ORDER BY (m.sender IS NOT DISTINCT FROM t.correspondent) DESC, m.at, m.message_id LIMIT 1
) f ON true
"""
LIST_THREADS = f"""
SELECT {_THREAD_COLUMNS} FROM threads t {_FIRST_SHOWN}
WHERE (%(mailbox)s::text IS NULL OR EXISTS (
        SELECT 1 FROM thread_messages b WHERE b.tenant = t.tenant AND b.thread_id = t.id AND b.mailbox = %(mailbox)s))
  AND (%(job)s::text IS NULL OR t.job_id::text LIKE %(job)s || '%%')
ORDER BY t.last_at DESC, t.id
LIMIT %(limit)s
"""
GET_THREAD = f"SELECT {_THREAD_COLUMNS} FROM threads t {_FIRST_SHOWN} WHERE t.id = %s"
THREAD_JOB = """
SELECT j.id::text AS job_id, j.campaign_id::text AS campaign_id, c.name AS campaign, j.sender, j.template,
       j.state, j.created_at, coalesce(j.accepted_at, j.finished_at) AS sent_at
FROM jobs j LEFT JOIN campaigns c ON (c.tenant, c.id) = (j.tenant, j.campaign_id)
WHERE j.tenant = %s AND j.id = %s
"""

# Erasure (infra/personal.py on_erasure: in the transaction that shreds the subjects' keys).
ERASE_PEOPLE_MESSAGES = """
UPDATE thread_messages SET sealed = NULL, subject_key = NULL
WHERE tenant = %(tenant)s AND (sender = ANY(%(subjects)s::text[]) OR correspondent = ANY(%(subjects)s::text[]))
"""
ERASE_PEOPLE_THREADS = """
UPDATE threads SET subject_key = NULL WHERE tenant = %(tenant)s AND correspondent = ANY(%(subjects)s::text[])
"""
ERASE_TENANT_MESSAGES = "UPDATE thread_messages SET sealed = NULL, subject_key = NULL WHERE tenant = %(tenant)s"
ERASE_TENANT_THREADS = "UPDATE threads SET subject_key = NULL WHERE tenant = %(tenant)s"


# -- the inline projection -------------------------------------------------------------------


def subject_digest(key: bytes, subject: str | None) -> str | None:
    """The normalized subject under the sender's key (None when nothing is left of it)."""
    normal = th.normalize_subject(subject)
    return hmac.new(key, normal.encode(), hashlib.sha256).hexdigest()[:32] if normal else None


def _uuid_or_none(value: Any) -> str | None:
    try:
        return str(uuid.UUID(str(value))) if value else None
    except ValueError:
        return None


def _received(conn: psycopg.Connection, tenant: str, events: list[Envelope]) -> list[dict[str, Any]]:
    """The events' messages as thread_messages rows (thread_id still to decide)."""
    senders = [e.data.get("correspondent") for e in events]
    opened = personal.open_many(conn, tenant, [(s or "", e.data.get("sealed")) for s, e in zip(senders, events)])
    keys = personal.keys(conn, tenant, [s for s in senders if s], create=False)
    rows = []
    for e, sender, value in zip(events, senders, opened):
        key = keys.get(sender or "")
        digest = subject_digest(key, value.get("subject")) if value is not None and key is not None else None
        data = {**e.data, "job_id": _uuid_or_none(e.data.get("job_id"))}
        m = th.from_event(e.type, data, tenant, e.recorded_at, digest)
        rows.append(_row(m) | {"sender": sender, "sealed": e.data.get("sealed") if value is not None else None})
    gone = personal.erased(conn, tenant, [r["correspondent"] for r in rows if r["correspondent"]])
    for r in rows:
        if r["correspondent"] in gone:  # a bounce about an erased person is kept without its text
            r["sealed"] = r["subject_key"] = None
    return rows


def _row(m: th.Message) -> dict[str, Any]:
    return {
        "tenant": m.tenant,
        "message_id": m.message_id,
        "kind": m.kind,
        "at": m.at,
        "mailbox": m.mailbox,
        "job_id": m.job_id,
        "header_message_id": m.header_message_id,
        "in_reply_to": m.in_reply_to,
        "refs": list(m.references),
        "correspondent": m.correspondent,
        "subject_key": m.subject_key,
    }


def _message(row: dict[str, Any]) -> th.Message:
    return th.Message(
        message_id=row["message_id"],
        tenant=row["tenant"],
        at=row["at"],
        mailbox=row["mailbox"],
        kind=row["kind"],
        header_message_id=row["header_message_id"],
        in_reply_to=row["in_reply_to"],
        references=tuple(row["refs"]),
        job_id=row["job_id"],
        correspondent=row["correspondent"],
        subject_key=row["subject_key"],
    )


def _touched(conn: psycopg.Connection, tenant: str, msgs: Sequence[th.Message]) -> set[str]:
    triples = [(m.mailbox, m.correspondent, m.subject_key) for m in msgs if m.correspondent and m.subject_key]
    args = {
        "tenant": tenant,
        "ids": sorted({i for m in msgs for i in m.ids}),
        "jobs": sorted({m.job_id for m in msgs if m.job_id}),
        "mailboxes": [t[0] for t in triples],
        "people": [t[1] for t in triples],
        "subjects": [t[2] for t in triples],
    }
    return {r[0] for r in conn.execute(TOUCHED_THREADS, args).fetchall()}


def _place(conn: psycopg.Connection, tenant: str, events: list[Envelope]) -> None:
    """Put one tenant's newly classified messages in their threads (module docstring)."""
    conn.execute(LOCK_TENANT, (Lock.THREADS, tenant))
    new = {r["message_id"]: r for r in _received(conn, tenant, events)}  # a later event of one message wins
    with conn.cursor(row_factory=dict_row) as cur:
        before = {r["message_id"]: r for r in cur.execute(STORED_MESSAGES, (tenant, list(new))).fetchall()}
        for mid, r in new.items():  # a reclassified message keeps the time it first arrived
            if mid in before:
                r["at"] = before[mid]["at"]
        old_threads = {r["thread_id"] for r in before.values()}
        stored: dict[str, dict[str, Any]] = {}
        frontier = [_message(r) for r in new.values()]
        seen: set[str] = set()
        pending = old_threads
        while True:
            pending = (pending | _touched(conn, tenant, frontier)) - seen
            if not pending:
                break
            seen |= pending
            rows = cur.execute(THREAD_MESSAGES, (tenant, sorted(pending))).fetchall()
            pending = set()
            frontier = []
            for r in rows:
                if r["message_id"] not in stored:
                    stored[r["message_id"]] = r
                    frontier.append(_message(r))
    msgs = [_message(r) for mid, r in stored.items() if mid not in new] + [_message(r) for r in new.values()]
    found = th.threads(msgs)
    conn.execute(DELETE_THREADS, (tenant, sorted(seen)))
    conn.execute(DELETE_THREAD_IDS, (tenant, sorted(seen)))
    for t in found:
        counts = t.counts()
        conn.execute(
            INSERT_THREAD,
            {
                "tenant": tenant,
                "id": t.thread_id,
                "mailbox": t.mailbox,
                "job_id": t.job_id,
                "correspondent": t.correspondent,
                "subject_key": t.subject_key,
                "first_at": t.first_at,
                "last_at": t.last_at,
                "messages": len(t.messages),
                **{COUNT_COLUMNS[k]: n for k, n in counts.items()},
            },
        )
        conn.execute(INSERT_THREAD_IDS, (tenant, sorted(t.ids), t.thread_id))
        for m in t.messages:
            if m.message_id in new:
                conn.execute(PUT_MESSAGE, new[m.message_id] | {"thread_id": t.thread_id})
            elif stored[m.message_id]["thread_id"] != t.thread_id:
                conn.execute(MOVE_MESSAGE, (t.thread_id, tenant, m.message_id))


def _classified(conn: psycopg.Connection, events: list[Envelope]) -> None:
    for tenant, run in groupby(events, key=lambda e: str(e.metadata.tenant)):
        _place(conn, tenant, list(run))


@personal.on_erasure
def forget(conn: psycopg.Connection, tenant: str, subjects: Sequence[str] | None) -> None:
    """People erased on request: the sealed values (which could no longer be opened anyway) and
    the subject digests of what they sent, or of what was about them, are cleared; the threads
    keep their messages, kinds and times under the subject, which names nobody."""
    if subjects is None:
        conn.execute(ERASE_TENANT_MESSAGES, {"tenant": tenant})
        conn.execute(ERASE_TENANT_THREADS, {"tenant": tenant})
        return
    args = {"tenant": tenant, "subjects": list(subjects)}
    conn.execute(ERASE_PEOPLE_MESSAGES, args)
    conn.execute(ERASE_PEOPLE_THREADS, args)


PROJECTION = register(
    InlineProjection(
        "threads",
        "conversations: received messages threaded with the outbound message they answer (inline)",
        ("threads", "thread_messages", "thread_ids"),
        dict.fromkeys(th.KIND_OF, _classified),
    )
)


# -- reading ---------------------------------------------------------------------------------

_ID_PREFIX = re.compile(r"^[0-9a-f-]{4,36}$")


def find(conn: psycopg.Connection, ref: str) -> str:
    """A thread's id from its id or a unique prefix of it (as lists show)."""
    ref = ref.strip().lower()
    if not _ID_PREFIX.match(ref):
        raise NotFoundError(f"no thread {ref} (give at least 4 characters of an id from `mailflow threads list`)")
    found = conn.execute(FIND_THREAD, {"prefix": ref}).fetchall()
    if not found:
        raise NotFoundError(f"no thread {ref} (see `mailflow threads list`)")
    if len(found) > 1:
        raise UsageError(f"{ref} is the start of more than one thread id: give more of it")
    return str(found[0][0])


def _shown(conn: psycopg.Connection, row: dict[str, Any]) -> dict[str, Any]:
    """A thread row as shown: its correspondent's address and subject opened, counts by kind."""
    [value] = personal.open_many(conn, row["tenant"], [(row.pop("first_sender") or "", row.pop("first_sealed"))])
    value = value or {}
    counts = {k: row.pop(c) for k, c in COUNT_COLUMNS.items()}
    return row | {"sender": value.get("sender"), "subject": value.get("subject"), "counts": counts}


def list_threads(
    conn: psycopg.Connection, *, mailbox: str | None = None, job: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The tenant's threads, the latest message first."""
    if job is not None and not _ID_PREFIX.match(job.strip().lower()):
        raise UsageError(f"--job {job}: give a job id or at least 4 characters of one")
    args = {"mailbox": mailbox.lower() if mailbox else None, "job": job.strip().lower() if job else None}
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(LIST_THREADS, args | {"limit": limit}).fetchall()
    return [_shown(conn, r) for r in rows]


def thread(conn: psycopg.Connection, ref: str) -> dict[str, Any]:
    """One thread: the outbound message it answers (when it does), then every received message
    in order, with its kind, time, sender and, for a reply, the new text."""
    thread_id = find(conn, ref)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(GET_THREAD, (thread_id,)).fetchone()
        assert row is not None
        tenant = row["tenant"]
        job = cur.execute(THREAD_JOB, (tenant, row["job_id"])).fetchone() if row["job_id"] else None
        rows = cur.execute(THREAD_MESSAGES, (tenant, [thread_id])).fetchall()
    opened = personal.open_many(conn, tenant, [(r["sender"] or "", r["sealed"]) for r in rows])
    messages = [
        {
            "message_id": r["message_id"],
            "kind": r["kind"],
            "at": r["at"],
            "mailbox": r["mailbox"],
            "job_id": r["job_id"],
            "erased": r["sender"] is not None and value is None,
            "sender": (value or {}).get("sender"),
            "subject": (value or {}).get("subject"),
            "text": (value or {}).get("text") if r["kind"] in ("reply", "other") else None,
        }
        for r, value in zip(rows, opened)
    ]
    return _shown(conn, row) | {"job": job, "outbound": job is not None, "items": messages}
