"""Events room: Redis stream helpers shared by the relay and the queuer.

Both publish with entry IDs they choose (<position>-0, <queue_seq>-0) so that Redis itself
refuses a second copy; these helpers read where a stream stands and tell that refusal
apart from real errors.
"""

from __future__ import annotations

import redis


def stream_last_id(r: redis.Redis, key: str) -> int | None:
    """The stream's last generated ID (its first part), or None when the stream does not exist."""
    try:
        info = r.xinfo_stream(key)
    except redis.ResponseError:
        return None
    raw = info["last-generated-id"]
    raw = raw.decode() if isinstance(raw, bytes) else raw
    return int(raw.split("-")[0])


def raise_unless_duplicates(results: list[object]) -> int:
    """Check a pipeline of XADDs with chosen IDs; returns how many were already there."""
    duplicates = 0
    for res in results:
        if isinstance(res, redis.ResponseError):
            if "equal or smaller" not in str(res):
                raise res
            duplicates += 1
    return duplicates
