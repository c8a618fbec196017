"""Events room: Redis stream helpers shared by the relay and the queuer.

Both publish with entry IDs they choose (<position>-0, <queue_seq>-0) so that Redis itself
refuses a second copy; these helpers read where a stream stands, read what a stream
holds, and tell that refusal apart from real errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import redis

SCAN_PAGE = 1000


def stream_last_entry_id(r: redis.Redis, key: str) -> tuple[int, int] | None:
    """The stream's last generated ID as (milliseconds part, sequence part); None when it does not exist."""
    try:
        info = r.xinfo_stream(key)
    except redis.ResponseError as exc:
        if "no such key" not in str(exc).lower():
            raise
        return None
    raw = info["last-generated-id"]
    raw = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq or 0)


def stream_last_id(r: redis.Redis, key: str) -> int | None:
    """The stream's last generated ID (its first part), or None when the stream does not exist."""
    last = stream_last_entry_id(r, key)
    return None if last is None else last[0]


def scan_fields(
    r: redis.Redis, key: str, names: tuple[bytes, ...], page: int = SCAN_PAGE
) -> Iterator[tuple[bytes | None, ...]]:
    """The values of these fields in every entry of the stream, oldest first, a page at a time."""
    start = "-"
    while True:
        # Clients here do not decode responses: ids and fields come back as bytes.
        entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", r.xrange(key, start, "+", count=page) or [])
        for _eid, fields in entries:
            yield tuple(fields.get(name) for name in names)
        if len(entries) < page:
            return
        last = entries[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else last)  # exclusive (Redis >= 6.2)


def raise_unless_duplicates(results: list[object]) -> int:
    """Check a pipeline of XADDs with chosen IDs; returns how many were already there."""
    duplicates = 0
    for res in results:
        if isinstance(res, redis.ResponseError):
            if "equal or smaller" not in str(res):
                raise res
            duplicates += 1
    return duplicates
