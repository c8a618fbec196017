"""Consumers room: the one write path - append events, apply the inline projections, wake the relay.

An inline projection is a read model written by the very transaction that appends its
events (the outbound catalogue, the jobs table), so it is never behind the log. Every
domain write goes through `writing()` and `Writer.record()`: append in the caller's
transaction, apply every registered inline projection that handles each event's type, and
after the commit wake the relay once. No room wires those three steps by hand.

A room registers its inline projections when its package is imported (see
`outbound/__init__.py`), the way event types register themselves; `registered()` lists them
for `mailflow projections`.

Inline projections can still be rebuilt from the log: every writing transaction holds the
inline advisory lock shared, and a rebuild takes it exclusively, waits for the writers in
flight, empties the tables and replays every relevant event in position order, in one
transaction. Writers wait for the rebuild; readers see the old tables until it commits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from mailflow.consumers import queries as q
from mailflow.errors import ConflictError, NotFoundError, UsageError
from mailflow.events.envelope import Envelope, NewEvent
from mailflow.events.store import EventStore
from mailflow.infra.locks import Lock
from mailflow.infra.tenancy import SCOPE_TO_TENANT

Handler = Callable[[psycopg.Connection, list[Envelope]], None]

__all__ = ["InlineProjection", "Writer", "reading", "record", "register", "registered", "writing"]


@dataclass(frozen=True)
class InlineProjection:
    """A read model kept in step with the log by the writing transaction itself.

    `handlers` maps an event type to a function that applies a run of consecutive events of
    that type (set-based: one statement for a thousand jobs)."""

    name: str
    description: str
    tables: tuple[str, ...]
    handlers: dict[str, Handler]
    seed: str = ""  # SQL that puts back rows no event created (run after the tables are emptied)

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self.handlers)

    def apply(self, conn: psycopg.Connection, events: Sequence[Envelope]) -> None:
        """Apply the events this projection handles, in order, runs of one type at a time."""
        for etype, run in groupby(events, key=lambda e: e.type):
            handler = self.handlers.get(etype)
            if handler is not None:
                handler(conn, list(run))

    def rebuild(self, store: EventStore, progress: Callable[[int, int], None] | None = None) -> int:
        """Replay every relevant event into emptied tables; returns how many were applied.

        The tables hold every tenant's rows, so only an operator's store may rebuild them."""
        if store.tenant is not None:
            raise UsageError(f"{self.name} holds every tenant's rows: rebuild it as the operator")
        applied = 0
        types = self.types
        with store.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (Lock.INLINE,))
            upto = store.sync()
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, self.tables))))
            # Generated ids (contacts.id) restart, so they come out as they first did. (Not
            # TRUNCATE ... RESTART IDENTITY: that needs the owner; setval needs only UPDATE.)
            for (sequence,) in conn.execute(q.IDENTITY_SEQUENCES, (list(self.tables),)).fetchall():
                conn.execute("SELECT setval(%s, 1, false)", (sequence,))
            if self.seed:
                conn.execute(self.seed)
            for batch in store.iter_all(0, upto=upto):
                relevant = [e for e in batch if e.type in types]
                if relevant:
                    self.apply(conn, relevant)
                    applied += len(relevant)
                if progress is not None:
                    progress(batch[-1].position or 0, upto)
        return applied


_REGISTRY: dict[str, InlineProjection] = {}


def register(projection: InlineProjection) -> InlineProjection:
    """Make `projection` part of the write path. A second projection handling a type that
    one already handles is refused: an event is applied by exactly one read model."""
    existing = _REGISTRY.get(projection.name)
    if existing is not None and existing is not projection:
        raise ValueError(f"an inline projection named {projection.name!r} is already registered")
    for other in _REGISTRY.values():
        shared = other.types & projection.types
        if other.name != projection.name and shared:
            raise ValueError(f"{projection.name} and {other.name} both handle {sorted(shared)}")
    _REGISTRY[projection.name] = projection
    return projection


def registered() -> dict[str, InlineProjection]:
    return dict(_REGISTRY)


def apply_inline(conn: psycopg.Connection, envelopes: Sequence[Envelope]) -> None:
    """Apply every registered inline projection to the envelopes it handles."""
    for projection in _REGISTRY.values():
        relevant = [e for e in envelopes if e.type in projection.handlers]
        if relevant:
            projection.apply(conn, relevant)


class Writer:
    """One writing transaction. `conn` is for the reads and locks the decision needs."""

    def __init__(self, store: EventStore, conn: psycopg.Connection) -> None:
        self.store = store
        self.conn = conn
        self.recorded = 0

    def record(self, items: Sequence[tuple[str, NewEvent]]) -> list[Envelope]:
        """Append (stream, event) pairs in this transaction and apply the inline projections."""
        envelopes = self.store.append_many(items, conn=self.conn)
        apply_inline(self.conn, envelopes)
        self.recorded += len(envelopes)
        return envelopes


@contextmanager
def writing(store: EventStore, conn: psycopg.Connection | None = None) -> Iterator[Writer]:
    """A transaction that records domain events; the relay is woken once it has committed.

    It holds the inline lock shared: any number run at once, and a rebuild (which takes it
    exclusively) waits for them and they for it. With `conn`, the transaction is opened on
    that connection instead of one from the store's pool. A tenant's store (store.tenant)
    scopes the transaction to that tenant, so an operator's process doing one tenant's work
    (`store.for_tenant(t)`) reads and writes only that tenant's rows.
    """
    if conn is None:
        with store.pool.connection() as pooled, _transaction(store, pooled) as writer:
            yield writer
    else:
        with _transaction(store, conn) as writer:
            yield writer
    if writer.recorded:
        store.notify()


# The inline lock, and the tenant scope for a tenant's store: whatever the connection's own
# scope, the transaction then sees and writes only that tenant's rows (row-level security).
_BEGIN = "SELECT pg_advisory_xact_lock_shared(%s)"
_BEGIN_FOR_TENANT = f"""
SELECT pg_advisory_xact_lock_shared(%(lock)s), {SCOPE_TO_TENANT}, (SELECT status FROM tenants WHERE id = %(tenant)s)
"""


_SCOPE_FOR_TENANT = f"SELECT {SCOPE_TO_TENANT}"
_SCOPE_FOR_TENANT_TIMED = f"SELECT {SCOPE_TO_TENANT}, set_config('statement_timeout', %(timeout)s, true)"


@contextmanager
def _transaction(store: EventStore, conn: psycopg.Connection) -> Iterator[Writer]:
    with conn.transaction():
        if store.tenant is None:
            conn.execute(_BEGIN, (Lock.INLINE,))
        else:
            row = conn.execute(_BEGIN_FOR_TENANT, {"lock": Lock.INLINE, "tenant": store.tenant}).fetchone()
            status = row[3] if row else None
            if store.enforce_suspension:
                if status is None:
                    raise NotFoundError(f"no tenant {store.tenant!r}")
                if status in ("suspended", "erased"):
                    raise ConflictError(f"tenant {store.tenant!r} is {status}: its data can be read, not changed")
        yield Writer(store, conn)


@contextmanager
def reading(
    store: EventStore, *, timeout_ms: int | None = None, one_snapshot: bool = False
) -> Iterator[psycopg.Connection]:
    """A pooled connection, in a transaction scoped as the store's writes are (see writing()),
    whose statements are cancelled after `timeout_ms` if given (one round trip sets both).
    `one_snapshot`: a read-only REPEATABLE READ transaction, so that its reads agree."""
    with store.pool.connection() as conn, conn.transaction():
        if one_snapshot:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if store.tenant is not None and timeout_ms is not None:
            conn.execute(_SCOPE_FOR_TENANT_TIMED, {"tenant": store.tenant, "timeout": str(timeout_ms)})
        elif store.tenant is not None:
            conn.execute(_SCOPE_FOR_TENANT, {"tenant": store.tenant})
        elif timeout_ms is not None:
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(timeout_ms),))
        yield conn


async def read_one(
    pool: AsyncConnectionPool, tenant: str, query: str, params: dict[str, Any], *, timeout_ms: int
) -> dict[str, Any] | None:
    """The first row of one read for `tenant` on the event loop (the API's hottest reads), in
    one round trip: the scope and the statement timeout are set in the same simple-query
    message as `query`, and PostgreSQL runs such a message as one transaction, so they end
    with it. The parameters are bound by psycopg on the client (ClientCursor) - a message of
    several statements cannot carry server-side parameters. `pool` must be an operator pool."""
    async with pool.connection() as conn:
        cur = psycopg.AsyncClientCursor(conn, row_factory=dict_row)
        await cur.execute(
            f"{_SCOPE_FOR_TENANT_TIMED}; {query}", {**params, "tenant": tenant, "timeout": str(timeout_ms)}
        )
        cur.nextset()
        return await cur.fetchone()


def record(store: EventStore, items: Sequence[tuple[str, NewEvent]]) -> list[Envelope]:
    """Record events in a transaction of their own."""
    with writing(store) as w:
        return w.record(items)
