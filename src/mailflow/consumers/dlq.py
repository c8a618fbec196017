"""Consumers room: dead letters - list them, re-apply them after a fix, or drop them.

PostgreSQL's dead_letters table is the truth; the Redis stream mailflow:dlq:<consumer>
mirrors the open ones for integrators and loses nothing that matters if Redis is flushed.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import redis
from psycopg.rows import dict_row

from mailflow.consumers import queries as q
from mailflow.consumers.projection import Projection
from mailflow.consumers.runtime import describe
from mailflow.errors import MailflowError, NotFoundError, UsageError
from mailflow.events.keys import Keys
from mailflow.events.store import EventStore


@dataclass(frozen=True)
class DeadLetter:
    id: int
    consumer: str
    position: int | None
    event_id: str | None
    event_type: str | None
    attempts: int
    error: str
    status: str
    created_at: datetime
    resolved_at: datetime | None
    entry_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["created_at"] = self.created_at.isoformat()
        d["resolved_at"] = self.resolved_at.isoformat() if self.resolved_at else None
        return d


def _letter(row: dict[str, Any]) -> DeadLetter:
    """A dead_letters row (read with dict_row, so by column name) as a DeadLetter."""
    event_id = row["event_id"]
    return DeadLetter(
        id=row["id"],
        consumer=row["consumer"],
        position=row["position"],
        event_id=None if event_id is None else str(event_id),
        event_type=row["event_type"],
        attempts=row["attempts"],
        error=row["error"],
        status=row["status"],
        created_at=row["created_at"],
        resolved_at=row["resolved_at"],
        entry_id=row["entry_id"],
    )


class DeadLetters:
    def __init__(self, conn: psycopg.Connection, store: EventStore, redis_client: redis.Redis, keys: Keys) -> None:
        self.conn = conn
        self.store = store
        self.redis = redis_client
        self.keys = keys

    def open_counts(self) -> dict[str, int]:
        return {c: int(n) for c, n in self.conn.execute(q.OPEN_DEAD_LETTER_COUNTS).fetchall()}

    def list(self, consumer: str | None = None, *, include_resolved: bool = False) -> list[DeadLetter]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(q.LIST_DEAD_LETTERS, {"consumer": consumer, "all": include_resolved}).fetchall()
        return [_letter(r) for r in rows]

    def select(self, ids: builtins.list[int], consumer: str | None, every: bool) -> builtins.list[DeadLetter]:
        if every:
            return self.list(consumer)
        if not ids:
            raise UsageError("name dead letter ids, or pass --all")
        open_ = {d.id: d for d in self.list(None)}
        missing = [i for i in ids if i not in open_]
        if missing:
            raise NotFoundError(f"no open dead letter with id {', '.join(map(str, missing))}")
        return [open_[i] for i in ids]

    def retry(self, letter: DeadLetter, projection_for: Callable[[str], Projection]) -> None:
        """Apply the event again; on success the dead letter is closed. Raises on failure."""
        if letter.position is None:
            raise MailflowError(
                f"dead letter {letter.id} is a malformed stream entry ({letter.entry_id}), not an event; "
                "there is nothing to re-apply - drop it"
            )
        projection = projection_for(letter.consumer)
        event = self.store.get(letter.position)
        try:
            with self.conn.transaction():
                with self.conn.cursor(row_factory=dict_row) as cur:
                    row = cur.execute(q.LOCK_DEAD_LETTER, (letter.id,)).fetchone()
                if row is None or row["status"] != "open":
                    raise NotFoundError(f"dead letter {letter.id} is no longer open")
                projection.apply(self.conn, [event])
                self.conn.execute(q.RESOLVE_DEAD_LETTER, ("retried", letter.id))
        except MailflowError:
            raise
        except Exception as exc:
            raise MailflowError(
                f"dead letter {letter.id} (position {letter.position}) failed again: {describe(exc)}"
            ) from exc
        self._unmirror(letter)

    def drop(self, letter: DeadLetter) -> None:
        with self.conn.transaction():
            self.conn.execute(q.RESOLVE_DEAD_LETTER, ("dropped", letter.id))
        self._unmirror(letter)

    def _unmirror(self, letter: DeadLetter) -> None:
        key = self.keys.dlq(letter.consumer)
        try:
            for entry_id, fields in self.redis.xrange(key) or []:
                if entry_id is not None and fields and fields.get(b"dead_letter_id") == str(letter.id).encode():
                    self.redis.xdel(key, entry_id)
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # the mirror is best effort; PostgreSQL has the status
