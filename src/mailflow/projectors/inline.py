"""Projectors room: inline projections - read models written in the command's own transaction.

The catalogue (contacts, segments, templates, suppressions, senders, campaigns) and the
jobs table are updated by the same transaction that appends their events, so they are
never behind. They can still be rebuilt from the log: every writing transaction holds a
shared advisory lock, and a rebuild takes it exclusively, waits for those in flight,
empties the tables and replays every relevant event in position order, in one
transaction. Writers wait for the rebuild; readers see the old tables until it commits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..events.envelope import Envelope
from ..events.store import EventStore
from . import catalog, jobs
from .locks import INLINE_LOCK_KEY, writing

__all__ = ["INLINE", "InlineProjection", "writing"]

@dataclass(frozen=True)
class InlineProjection:
    name: str
    description: str
    tables: tuple[str, ...]
    types: frozenset[str]
    apply: Callable[[psycopg.Connection, list[Envelope]], None]

    def rebuild(self, store: EventStore, progress: Callable[[int, int], None] | None = None) -> int:
        """Replay every relevant event into emptied tables; returns how many were applied."""
        applied = 0
        with store.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (INLINE_LOCK_KEY,))
            upto = store.sync()
            # RESTART IDENTITY: generated ids (contacts.id) come out as they first did.
            conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(
                sql.SQL(", ").join(map(sql.Identifier, self.tables))))
            for batch in store.iter_all(0, upto=upto):
                relevant = [e for e in batch if e.type in self.types]
                if relevant:
                    self.apply(conn, relevant)
                    applied += len(relevant)
                if progress is not None:
                    progress(batch[-1].position or 0, upto)
        return applied


INLINE: dict[str, InlineProjection] = {
    "catalog": InlineProjection(
        "catalog",
        "contacts, segments, templates, suppressions, senders, campaigns (inline)",
        ("contacts", "suppressions", "segments", "templates", "senders", "campaigns"),
        frozenset(catalog.HANDLERS),
        catalog.apply,
    ),
    "jobs": InlineProjection("jobs", "one row per job with its current state (inline)", ("jobs",),
                             frozenset(jobs.HANDLERS), jobs.apply),
}
