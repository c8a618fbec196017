"""A history written into the log as it is, for tests of what is derived from the log in SQL.

The store stamps every event with the time of its append and checks it against its model; a
test of late and out-of-order events (a DSN recorded days after its message) needs events
recorded at times it chooses, and often only the fields a projection reads. `recorded()`
inserts them into `events` with their own times and lets the real sequencer give them their
positions, in the order given.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence

from psycopg.types.json import Json

from mailflow.events.envelope import Envelope
from mailflow.events.store import EventStore
from mailflow.infra.services import connect, pool_conninfo
from mailflow.infra.tenancy import Scope

INSERT = """
INSERT INTO events (id, stream, version, type, schema, data, metadata, recorded_at)
VALUES (%s, %s, 1, %s, %s, %s, %s, %s)
"""
POSITIONS = "SELECT e.id, p.position FROM events e JOIN event_positions p ON p.seq = e.seq WHERE e.id = ANY(%s)"


def recorded(store: EventStore, events: Sequence[Envelope]) -> list[Envelope]:
    """The events appended in this order (one transaction), each recorded at its own
    `recorded_at`; returned as stored: new ids, their positions, the same order."""
    ids = [uuid.uuid4() for _ in events]
    with connect(pool_conninfo(store.pool), scope=Scope.operator()) as conn, conn.transaction():
        for eid, e in zip(ids, events, strict=True):
            meta = {k: v for k, v in e.metadata.to_dict().items() if v is not None}
            conn.execute(INSERT, (eid, f"test-{eid}", e.type, e.schema, Json(e.data), Json(meta), e.recorded_at))
    store.sync()
    with connect(pool_conninfo(store.pool), scope=Scope.operator()) as conn:
        positions = dict(conn.execute(POSITIONS, (ids,)).fetchall())
    return [dataclasses.replace(e, id=eid, position=positions[eid]) for eid, e in zip(ids, events, strict=True)]


def by_position(store: EventStore, events: Sequence[Envelope]) -> dict[int, Envelope]:
    """The events recorded in the order of their (made-up) positions, found by those: a test
    writes its history once and hands the projection parts of it, as the runtime would."""
    order = sorted(events, key=lambda e: e.position or 0)
    return {e.position or 0: stored for e, stored in zip(order, recorded(store, order), strict=True)}
