"""Events room: the PostgreSQL event store.

Append with optimistic concurrency and idempotency by event id; read one stream; read
every event after a global position, or the last N (matching) events. Positions are
dense and assigned by the sequencer (see migrations/0001_event_store.sql for why that
keeps tailing readers from skipping late commits).
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from mailflow.errors import ConcurrencyError, DuplicateEventError, InvalidEventError, MailflowError, NotFoundError
from mailflow.events import queries as q
from mailflow.events.envelope import METADATA_KEYS, Envelope, Metadata, NewEvent, current_acting, default_actor
from mailflow.events.notify import Notifier
from mailflow.events.registry import EventRegistry
from mailflow.events.registry import registry as default_registry
from mailflow.infra.personal import People
from mailflow.infra.services import pool_conninfo, scalar
from mailflow.infra.tenancy import cross_tenant, qualified

ANY: int | None = None
"""expected_version: append whatever the stream's version is."""
NO_STREAM = 0
"""expected_version: the stream must not exist yet."""

NOTIFY_CHANNEL = "mailflow_events"
COPY_THRESHOLD = 100  # events per append from which COPY beats INSERT ... unnest
_MAX_STREAM_NAME = 255


class EventStore:
    """Append and read events. Safe to share between threads (it borrows pool connections)."""

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        registry: EventRegistry = default_registry,
        channel: str = NOTIFY_CHANNEL,
        actor: str | None = None,
        tenant: str | None = None,
        notify_min_interval_s: float = 0.02,
        people: People | None = None,
    ) -> None:
        self.pool = pool
        # Names people (subjects) from addresses for the write paths that take an address from
        # outside (infra/personal.py); None in a store that never does.
        self._people = people
        # Whose events this store appends (and whose streams its names mean); None for the
        # operator, whose every event must name its tenant in its metadata.
        self.tenant = tenant
        # A tenant's own writes are refused while it is suspended; an operator's process
        # acting for it (recording an unsubscribe, a send's result) still writes.
        self.enforce_suspension = tenant is not None
        self.registry = registry
        self.channel = channel
        self.actor = actor or default_actor()
        self.notifier = Notifier(pool_conninfo(pool), channel, notify_min_interval_s)

    def close(self) -> None:
        """Send any NOTIFY still owed, then release the notifier (the pool is the caller's)."""
        self.notifier.close()

    # -- writing ---------------------------------------------------------------------

    def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        expected_version: int | None = ANY,
    ) -> list[Envelope]:
        """Append events to `stream` atomically and return their envelopes (position None).

        expected_version: ANY (None), NO_STREAM (0), or the version the stream must be at.
        A mismatch raises ConcurrencyError and writes nothing. Appending the same event ids
        again returns the stored envelopes instead of writing twice.
        """
        if not events:
            return []
        _check_stream_name(stream)
        tenants = {self._tenant_of(ev) for ev in events}
        if len(tenants) != 1:
            raise InvalidEventError(f"the events of one stream belong to one tenant, not {sorted(tenants)}")
        stream = qualified(tenants.pop(), stream)
        if expected_version is not None and expected_version < 0:
            raise InvalidEventError("expected_version must be >= 0")
        params = self._append_params(stream, events, expected_version)
        try:
            if len(events) >= COPY_THRESHOLD:
                rows = self._append_by_copy(params)
            else:
                sql = (
                    q.APPEND_ANY
                    if expected_version is None
                    else q.APPEND_NO_STREAM
                    if expected_version == 0
                    else q.APPEND_EXPECTED
                )
                with self.pool.connection() as conn:
                    # Binary parameters: text-format arrays would be quoted by regex, per element.
                    rows = conn.execute(sql, params, binary=True).fetchall()
        except pg_errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "events_id_key":
                raise
            return self._existing_or_raise(stream, events, duplicate=True)
        if not rows:
            return self._existing_or_raise(stream, events, expected=expected_version)
        self.notifier.poke()
        return [
            Envelope(
                id=ev.id,
                position=None,
                stream=stream,
                version=version,
                type=ev.type,
                schema=params["schemas"][i],
                data=ev.data,
                metadata=self._stored_metadata(ev),
                recorded_at=recorded_at,
            )
            for i, (ev, (version, recorded_at)) in enumerate(zip(events, rows))
        ]

    def _append_by_copy(self, params: dict[str, Any]) -> list[tuple[int, Any]]:
        """Bump the stream's version, then COPY the rows; [] when the expectation failed."""
        expected = params["expected"]
        bump = q.BUMP_ANY if expected is None else q.BUMP_NO_STREAM if expected == 0 else q.BUMP_EXPECTED
        with self.pool.connection() as conn, conn.transaction():
            # COPY does not run under row-level security; every row's tenant was checked and
            # stamped by _tenant_of (the generated column reads it from the metadata).
            cross_tenant(conn)
            row = conn.execute(bump, params).fetchone()
            if row is None:
                return []
            last, recorded_at = row
            first = last - params["count"] + 1
            stream = params["stream"]
            with conn.cursor().copy(q.COPY_EVENTS) as copy:
                copy.set_types(q.COPY_TYPES)
                for i, (eid, etype, schema, data, meta) in enumerate(
                    zip(params["ids"], params["types"], params["schemas"], params["datas"], params["metas"])
                ):
                    copy.write_row((eid, stream, first + i, etype, schema, data, meta))
        return [(first + i, recorded_at) for i in range(params["count"])]

    def append_many(
        self, items: Sequence[tuple[str, NewEvent]], *, conn: psycopg.Connection | None = None
    ) -> list[Envelope]:
        """Append events to many streams at once (expected version ANY), atomically.

        With `conn`, the append joins the caller's transaction (so state tables can be
        updated in the same commit) and the relay is woken when the caller calls notify().
        Without it, the append commits on its own and wakes the relay.
        """
        if not items:
            return []
        streams = []
        for stream, ev in items:
            _check_stream_name(stream)
            streams.append(qualified(self._tenant_of(ev), stream))
        params = self._append_params("", [ev for _, ev in items], None)
        params["streams"] = streams
        try:
            if conn is not None:
                rows = conn.execute(q.APPEND_MANY, params, binary=True).fetchall()
            else:
                with self.pool.connection() as c:
                    rows = c.execute(q.APPEND_MANY, params, binary=True).fetchall()
        except pg_errors.UniqueViolation as exc:
            if exc.diag.constraint_name == "events_id_key":
                raise DuplicateEventError("an event id of this batch was already used; nothing was written") from exc
            raise
        if conn is None:
            self.notifier.poke()
        by_id = {r[0]: (r[1], r[2]) for r in rows}
        out = []
        for i, (stream, (_, ev)) in enumerate(zip(streams, items)):
            version, recorded_at = by_id[ev.id]
            out.append(
                Envelope(
                    ev.id,
                    None,
                    stream,
                    version,
                    ev.type,
                    params["schemas"][i],
                    ev.data,
                    self._stored_metadata(ev),
                    recorded_at,
                )
            )
        return out

    def _tenant_of(self, ev: NewEvent) -> str:
        """The tenant an event belongs to, stamped into its metadata: the one it names, else
        this store's. A tenant's store never writes another tenant's event."""
        md = ev.metadata
        if md.tenant is None:
            if self.tenant is None:
                raise InvalidEventError(f"{ev.type} names no tenant, and an operator's events must")
            md.tenant = self.tenant
        elif self.tenant is not None and md.tenant != self.tenant:
            raise InvalidEventError(f"{ev.type} belongs to tenant {md.tenant!r}, not to {self.tenant!r}")
        return md.tenant

    @property
    def people(self) -> People:
        if self._people is None:
            raise MailflowError("this event store was made without the keyring, so it cannot name people")
        return self._people

    def subject(self, conn: psycopg.Connection, email: str) -> str:
        """The subject of an address in this store's tenant (see infra/personal.py)."""
        if self.tenant is None:
            raise MailflowError("an address names a person within a tenant: act for one (for_tenant)")
        return self.people.subject(conn, self.tenant, email)

    def for_tenant(self, tenant: str) -> EventStore:
        """This store acting for one tenant (same pool and notifier): its writing transactions see
        only that tenant's rows, and its events belong to it."""
        scoped = copy.copy(self)
        scoped.tenant = tenant
        scoped.enforce_suspension = False
        return scoped

    def qualify(self, stream: str) -> str:
        """A stream name as stored: under this store's tenant (an operator names it in full)."""
        return stream if self.tenant is None else qualified(self.tenant, stream)

    def notify(self) -> None:
        """Wake the relay after a transaction that appended through `conn` has committed."""
        self.notifier.poke()

    def _append_params(self, stream: str, events: Sequence[NewEvent], expected: int | None) -> dict[str, Any]:
        ids, types, schemas, datas, metas = [], [], [], [], []
        validate = self.registry.validate if self.registry.types() else None
        # Events of one batch usually share their metadata: serialise each distinct one once.
        # A missing correlation id is stored as absent and read back as the event's own id.
        meta_json: dict[tuple[str | None, ...], str] = {}
        now_acting = current_acting()
        for ev in events:
            if now_acting is not None:
                ev.metadata.correlation_id = now_acting.correlation_id or ev.metadata.correlation_id
                ev.metadata.actor = ev.metadata.actor or now_acting.actor
            if not ev.type or len(ev.type) > 200:
                raise InvalidEventError("an event type must be 1 to 200 characters")
            data = ev.data
            if not isinstance(data, dict):
                raise InvalidEventError(f"{ev.type} data must be a JSON object")
            schema = ev.schema
            if validate is not None and self.registry.model(ev.type) is not None:
                data = validate(ev.type, schema, data)
                schema = self.registry.current_schema(ev.type) or schema
                ev.data = data
            md = ev.metadata
            key = (md.correlation_id, md.causation_id, md.tenant, md.actor or self.actor)
            meta = meta_json.get(key)
            if meta is None:
                stored = dict(zip(METADATA_KEYS, key))
                meta = meta_json[key] = orjson.dumps({k: v for k, v in stored.items() if v is not None}).decode()
            try:
                datas.append(orjson.dumps(data).decode())
            except TypeError as exc:
                raise InvalidEventError(f"{ev.type} data is not JSON-serialisable: {exc}") from exc
            ids.append(ev.id)
            types.append(ev.type)
            schemas.append(schema)
            metas.append(meta)
        return {
            "stream": stream,
            "count": len(events),
            "expected": expected,
            "ids": ids,
            "types": types,
            "schemas": schemas,
            "datas": datas,
            "metas": metas,
        }

    def _stored_metadata(self, ev: NewEvent) -> Metadata:
        """The metadata a reader will see for an event just appended (defaults filled in)."""
        md = ev.metadata
        return Metadata(md.correlation_id or str(ev.id), md.causation_id, md.tenant, md.actor or self.actor)

    def _existing_or_raise(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected: int | None = None,
        duplicate: bool = False,
    ) -> list[Envelope]:
        """After a conflict: a retried append of stored events succeeds; anything else raises."""
        ids = [ev.id for ev in events]
        with self.pool.connection() as conn:
            found = [self._envelope(r) for r in conn.execute(q.EVENTS_BY_ID, (ids,)).fetchall()]
            actual_row = conn.execute(q.STREAM_VERSION, (stream,)).fetchone()
        by_id = {env.id: env for env in found}
        if len(by_id) == len(ids) and all(
            by_id[ev.id].stream == stream and by_id[ev.id].type == ev.type and by_id[ev.id].data == ev.data
            for ev in events
        ):
            return [by_id[i] for i in ids]
        if found or duplicate:
            clash = found[0] if found else None
            where = f" (already stored in stream {clash.stream!r})" if clash else ""
            raise DuplicateEventError(
                f"event ids of this append were already used for other content{where}; nothing was written"
            )
        raise ConcurrencyError(stream, expected or 0, actual_row[0] if actual_row else 0)

    # -- the sequencer -----------------------------------------------------------------

    def sequence(self, limit: int = 10_000, *, wait: bool = False) -> int:
        """Give positions to committed events; return how many got one.

        Only one sequencer runs at a time (advisory lock). With wait=False a busy lock
        returns 0 at once: the other sequencer is doing the work.
        """
        with self.pool.connection() as conn, conn.transaction():
            if wait:
                conn.execute(q.SEQUENCER_LOCK, (q.SEQUENCER_LOCK_KEY,))
            elif not scalar(conn, q.SEQUENCER_TRY_LOCK, (q.SEQUENCER_LOCK_KEY,)):
                return 0
            cross_tenant(conn)  # positions are global: every tenant's events get theirs
            row = conn.execute(q.SEQUENCE, {"limit": limit}).fetchone()
        return int(row[1]) if row else 0

    def sync(self, limit: int = 10_000, timeout_s: float = 60.0) -> int:
        """Wait until every event committed before this call has a position; return the head.

        Events of transactions still open elsewhere on the server hold the horizon back;
        if that lasts longer than timeout_s, raise instead of waiting forever.
        """
        with self.pool.connection() as conn:
            below = scalar(conn, q.SNAPSHOT_XMAX)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.sequence(limit, wait=True) >= limit:
                continue
            if not self.has_unsequenced(below):
                return self.head()
            if time.monotonic() > deadline:
                raise MailflowError(
                    f"events are still waiting for a position after {timeout_s:.0f} s: an open "
                    "transaction on the PostgreSQL server holds back the visibility horizon "
                    "(see docs/operations.md)"
                )
            time.sleep(0.002)

    def has_unsequenced(self, below: str | None = None) -> bool:
        """Are there committed events without a position (of transactions older than `below`)?"""
        with self.pool.connection() as conn, conn.transaction():
            cross_tenant(conn)
            return bool(scalar(conn, q.UNSEQUENCED_EXIST, {"below": below}))

    # -- reading -----------------------------------------------------------------------

    def head(self) -> int:
        """The highest position given so far (0 when empty)."""
        with self.pool.connection() as conn:
            return int(scalar(conn, q.HEAD_POSITION))

    def stream_version(self, stream: str) -> int:
        with self.pool.connection() as conn:
            row = conn.execute(q.STREAM_VERSION, (self.qualify(stream),)).fetchone()
        return int(row[0]) if row else 0

    def read_stream(self, stream: str, after_version: int = 0, limit: int = 10_000) -> list[Envelope]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                q.READ_STREAM, {"stream": self.qualify(stream), "after": after_version, "limit": limit}
            ).fetchall()
        return [self._envelope(r) for r in rows]

    def read_all(
        self,
        after: int = 0,
        limit: int = 1000,
        *,
        upto: int | None = None,
        types: Sequence[str] | None = None,
        stream: str | None = None,
        conn: psycopg.Connection | None = None,
    ) -> list[Envelope]:
        """Events with position > after (and <= upto), in position order."""
        upto = upto if upto is not None else 2**62
        if types or stream:
            sql, params = (
                q.READ_ALL_FILTERED,
                {
                    "after": after,
                    "upto": upto,
                    "limit": limit,
                    "types": list(types) if types else None,
                    "stream": self.qualify(stream) if stream else None,
                },
            )
        else:
            # Positions are dense, so the next `limit` events lie in (after, after + limit]:
            # bounding the range keeps the plan a short index range even before the log's
            # statistics are known (a fresh import planned it as a sort of everything to the head).
            sql, params = q.READ_ALL, {"after": after, "upto": min(upto, after + limit), "limit": limit}
        if conn is not None:
            rows = conn.execute(sql, params).fetchall()
        else:
            with self.pool.connection() as c:
                rows = c.execute(sql, params).fetchall()
        return [self._envelope(r) for r in rows]

    def read_last(self, limit: int, *, types: Sequence[str] | None = None, stream: str | None = None) -> list[Envelope]:
        """The last `limit` events (of these types, of this stream), in position order."""
        params = {
            "limit": limit,
            "types": list(types) if types else None,
            "stream": self.qualify(stream) if stream else None,
        }
        with self.pool.connection() as conn:
            rows = conn.execute(q.READ_LAST_FILTERED, params).fetchall()
        return [self._envelope(r) for r in rows]

    def iter_all(self, after: int = 0, *, upto: int | None = None, batch: int = 5000) -> Iterator[list[Envelope]]:
        """Batches of events after `after` up to `upto` (default: the head when called)."""
        upto = self.head() if upto is None else upto
        while after < upto:
            chunk = self.read_all(after, batch, upto=upto)
            if not chunk:
                return
            yield chunk
            after = chunk[-1].position or after

    def get(self, position: int) -> Envelope:
        found = self.read_all(position - 1, 1, upto=position)
        if not found:
            raise NotFoundError(f"no event at position {position} (head is {self.head()})")
        return found[0]

    def get_by_id(self, event_id: uuid.UUID) -> Envelope:
        with self.pool.connection() as conn:
            rows = conn.execute(q.EVENTS_BY_ID, ([event_id],)).fetchall()
        if not rows:
            raise NotFoundError(f"no event with id {event_id}")
        return self._envelope(rows[0])

    def upcast(self, env: Envelope) -> Envelope:
        """Bring an envelope that did not come from this store (e.g. from Redis) to the current schema."""
        schema, data = self.registry.upcast(env.type, env.schema, env.data)
        if schema != env.schema:
            env.schema, env.data = schema, data
        return env

    def _envelope(self, row: tuple[Any, ...]) -> Envelope:
        event_id, position, stream, version, etype, schema, data, md, recorded_at = row
        schema, data = self.registry.upcast(etype, schema, data)
        return Envelope(
            id=event_id,
            position=position,
            stream=stream,
            version=version,
            type=etype,
            schema=schema,
            data=data,
            metadata=Metadata(
                md.get("correlation_id") or str(event_id), md.get("causation_id"), md.get("tenant"), md.get("actor")
            ),
            recorded_at=recorded_at,
        )


def _check_stream_name(stream: str) -> None:
    if not stream or len(stream) > _MAX_STREAM_NAME or stream != stream.strip():
        raise InvalidEventError(f"stream name must be 1 to {_MAX_STREAM_NAME} characters without surrounding spaces")
