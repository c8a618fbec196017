"""Consumers room: the consumer-group toolkit - the one place that speaks Redis consumer groups.

Create a group (XGROUP CREATE ... MKSTREAM; one that exists already is fine), read as a
member (XREADGROUP), take over entries another member left unacknowledged (the XAUTOCLAIM
cursor loop, which also reports entries deleted while pending), acknowledge (XACK), and
forget members that went away. ConsumerRunner (events stream, redis-py) and the send
worker (job streams, redis.asyncio) both use it, so there is one answer to "what does this
reply mean"; the pure helpers below decide, the sync and `_async` wrappers only send.

Redis is a disposable transport: a FLUSHALL or a restart without persistence takes the
stream and its group with it. Redis says so in several ways - NOGROUP (no such key or
group), `no such key` (XINFO), and for a reader blocked at the time UNBLOCKED (Redis 7) or
`... no longer exists` - and every wrapper turns each of them into `StreamLost`, so a
caller recovers from PostgreSQL without parsing error strings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aredis

Entry = tuple[bytes, dict[bytes, bytes]]
StreamEntries = list[tuple[str, list[Entry]]]

# Replies that mean Redis no longer has the stream or the group (see the module docstring).
_LOST_PREFIXES = ("NOGROUP", "UNBLOCKED")
_LOST_PHRASES = ("no such key", "no longer exists")
_GROUP_EXISTS = "BUSYGROUP"
_CURSOR_DONE = (b"0-0", "0-0")


class StreamLost(redis.ResponseError):
    """Redis lost a stream or consumer group this process uses (FLUSHALL, restart): recreate it and
    catch up from PostgreSQL. A ResponseError, so code that catches those still does."""

    def __init__(self, stream: str, group: str, reply: str) -> None:
        super().__init__(f"stream {stream!r} or its group {group!r} is gone from Redis: {reply}")
        self.stream = stream
        self.group = group
        self.reply = reply


@dataclass
class Claimed:
    """One page of XAUTOCLAIM: live entries now owned by the claimer, and ids of entries that
    were deleted from the stream while pending (nothing to process; acknowledge them)."""

    entries: list[Entry] = field(default_factory=list)
    deleted: list[bytes] = field(default_factory=list)
    unnamed: int = field(default=0, repr=False, compare=False)  # deleted ones whose ids Redis 6.2 left out


# -- the pure core: what a reply means ---------------------------------------------------------


def lost_data(exc: BaseException) -> bool:
    """Is `exc` Redis saying it no longer has the stream or the group (not a bug, not an outage)?"""
    if isinstance(exc, StreamLost):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc)
    return text.startswith(_LOST_PREFIXES) or any(p in text.lower() for p in _LOST_PHRASES)


def group_exists(exc: BaseException) -> bool:
    """Is `exc` XGROUP CREATE's answer for a group that is there already?"""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_GROUP_EXISTS)


def parse_claim(reply: Sequence[Any]) -> tuple[bytes | str, Claimed]:
    """(next cursor, page) from an XAUTOCLAIM reply.

    Redis 7 lists entries deleted while pending third (already dropped from the pending list;
    acknowledging them is harmless). Redis 6.2 returns each as nil, without its id: the page
    counts them (`unnamed`) and the wrappers look their ids up.
    """
    page = Claimed()
    for entry_id, fields in reply[1]:
        if entry_id is None:
            page.unnamed += 1  # Redis 6.2 gives a deleted entry as nil, without its id
        elif fields:
            page.entries.append((entry_id, fields))
        else:
            page.deleted.append(entry_id)
    if len(reply) > 2 and reply[2]:
        page.deleted.extend(reply[2])
    return reply[0], page


def claim_finished(cursor: bytes | str) -> bool:
    """Has the XAUTOCLAIM cursor gone round the whole pending list?"""
    return cursor in _CURSOR_DONE


def _page_range(start: bytes | str, cursor: bytes | str) -> tuple[bytes | str, bytes | str]:
    """The ids one XAUTOCLAIM page covered: from its start to just before the next cursor."""
    return start, "+" if claim_finished(cursor) else b"(" + (cursor if isinstance(cursor, bytes) else cursor.encode())


def _unnamed_candidates(pending: list[dict[str, Any]], page: Claimed) -> list[bytes]:
    live = {eid for eid, _ in page.entries}
    return [p["message_id"] for p in pending if p["message_id"] not in live and p["message_id"] not in page.deleted]


def parse_read(reply: Any) -> StreamEntries:
    """XREADGROUP's reply (None when BLOCK timed out) as [(stream name, entries)]."""
    return [(key.decode() if isinstance(key, bytes) else str(key), list(entries)) for key, entries in reply or []]


@contextmanager
def _lost_becomes_stream_lost(stream: str, group: str) -> Iterator[None]:
    try:
        yield
    except StreamLost:
        raise
    except redis.ResponseError as exc:
        if lost_data(exc):
            raise StreamLost(stream, group, str(exc)) from exc
        raise


def _streams_label(streams: Mapping[str, str]) -> str:
    return ",".join(streams)


def _ids(streams: Mapping[str, str]) -> dict[Any, Any]:
    return dict(streams)


# -- redis-py (threads) ---------------------------------------------------------------------------


def ensure_group(r: redis.Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """Create `group` on `stream` (and the stream) at `start_id`; True if it was created, False if it existed."""
    try:
        r.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.ResponseError as exc:
        if group_exists(exc):
            return False
        raise
    return True


def read(
    r: redis.Redis,
    group: str,
    consumer: str,
    streams: Mapping[str, str],
    *,
    count: int | None = None,
    block: int | None = None,
) -> StreamEntries:
    """XREADGROUP: `streams` maps each stream to `>` (new entries) or an id (this consumer's own pending
    entries after it). Raises StreamLost if Redis lost a stream or the group."""
    with _lost_becomes_stream_lost(_streams_label(streams), group):
        return parse_read(r.xreadgroup(group, consumer, _ids(streams), count=count, block=block))


def claim_stale(
    r: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    min_idle_ms: int,
    count: int = 100,
) -> Iterator[Claimed]:
    """Take over, page by page, entries of `group` idle longer than `min_idle_ms` (their reader died).

    Stop iterating to stop claiming; what was not reached stays pending. Raises StreamLost.
    """
    cursor: bytes | str = "0-0"
    while True:
        start = cursor
        with _lost_becomes_stream_lost(stream, group):
            reply = r.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=count)
            cursor, page = parse_claim(reply)
            if page.unnamed:  # find them: pending here now, in the page's range, gone from the stream
                low, high = _page_range(start, cursor)
                pending = r.xpending_range(stream, group, low, high, count + len(page.entries), consumername=consumer)
                page.deleted += [i for i in _unnamed_candidates(pending, page) if not r.xrange(stream, i, i, count=1)]
        yield page
        if claim_finished(cursor):
            return


def unread(r: redis.Redis, stream: str, group: str) -> int:
    """Entries of the stream not yet delivered to any consumer of the group (length minus
    pending; Redis 6.2 has no XINFO lag). A missing stream or group counts as all unread."""
    pipe = r.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xpending(stream, group)
    length, pending = pipe.execute(raise_on_error=False)
    if isinstance(length, Exception):
        raise length
    if isinstance(pending, Exception):
        if lost_data(pending):
            return int(length)
        raise pending
    return max(int(length) - int(pending["pending"]), 0)


def ack(r: redis.Redis, stream: str, group: str, ids: Sequence[bytes | str]) -> int:
    """XACK; a stream or group that is gone acknowledges nothing, which is what it should do."""
    return int(r.xack(stream, group, *ids)) if ids else 0


def queue_ack(
    pipe: redis.client.Pipeline | aredis.client.Pipeline,
    stream: str,
    group: str,
    ids: Sequence[bytes | str],
    *,
    delete: bool = False,
) -> None:
    """Add XACK (and XDEL with `delete`: work streams need no history) to a pipeline, sync or async."""
    if ids:
        pipe.xack(stream, group, *ids)
        if delete:
            pipe.xdel(stream, *ids)


def forget_idle_consumers(r: redis.Redis, stream: str, group: str, *, keep: str, idle_ms: int) -> list[str]:
    """Remove members with nothing pending that have been idle longer than `idle_ms` (dead processes);
    `keep` (the caller) stays. Returns the names removed. Raises StreamLost."""
    gone = []
    with _lost_becomes_stream_lost(stream, group):
        for info in r.xinfo_consumers(stream, group):
            name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
            if name != keep and info["pending"] == 0 and info["idle"] > idle_ms:
                r.xgroup_delconsumer(stream, group, name)
                gone.append(name)
    return gone


# -- redis.asyncio -----------------------------------------------------------------------------------


async def ensure_group_async(r: aredis.Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """ensure_group() for redis.asyncio."""
    try:
        await r.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.ResponseError as exc:
        if group_exists(exc):
            return False
        raise
    return True


async def read_async(
    r: aredis.Redis,
    group: str,
    consumer: str,
    streams: Mapping[str, str],
    *,
    count: int | None = None,
    block: int | None = None,
) -> StreamEntries:
    """read() for redis.asyncio."""
    with _lost_becomes_stream_lost(_streams_label(streams), group):
        return parse_read(await r.xreadgroup(group, consumer, _ids(streams), count=count, block=block))


async def claim_stale_async(
    r: aredis.Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    min_idle_ms: int,
    count: int = 100,
) -> AsyncIterator[Claimed]:
    """claim_stale() for redis.asyncio."""
    cursor: bytes | str = "0-0"
    while True:
        start = cursor
        with _lost_becomes_stream_lost(stream, group):
            reply = await r.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=count)
            cursor, page = parse_claim(reply)
            if page.unnamed:
                low, high = _page_range(start, cursor)
                pending = await r.xpending_range(
                    stream, group, low, high, count + len(page.entries), consumername=consumer
                )
                page.deleted += [
                    i for i in _unnamed_candidates(pending, page) if not await r.xrange(stream, i, i, count=1)
                ]
        yield page
        if claim_finished(cursor):
            return


async def ack_async(r: aredis.Redis, stream: str, group: str, ids: Sequence[bytes | str]) -> int:
    """ack() for redis.asyncio."""
    return int(await r.xack(stream, group, *ids)) if ids else 0
