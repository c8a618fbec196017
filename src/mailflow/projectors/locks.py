"""Projectors room: the lock that keeps inline read-model writes and their rebuilds apart."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from ..events.store import EventStore

INLINE_LOCK_KEY = 7_300_020


@contextmanager
def writing(store: EventStore) -> Iterator[psycopg.Connection]:
    """A transaction that appends events and updates inline read models with them.

    It holds the inline lock shared: any number run at once, and a rebuild (which takes it
    exclusively) waits for them and they for it.
    """
    with store.pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (INLINE_LOCK_KEY,))
        yield conn
