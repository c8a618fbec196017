"""Consumers room: the consumer-group runtime that runs a projection.

A consumer is a named Redis consumer group on the events stream. Each batch is applied in
one PostgreSQL transaction that also moves the consumer's checkpoint, so an event is applied
exactly once: entries at or below the checkpoint are acknowledged and skipped, and a hole
between the checkpoint and the next entry (new consumer, trimmed stream, Redis flushed) is
filled from PostgreSQL, the truth. XACK follows the commit. Pending entries of a dead
consumer are reclaimed (the Redis side - group, read, claim, ack, lost data - is groups.py).
An event that keeps failing goes to the DLQ after `consumer_max_attempts` tries, and the consumer moves on. A lost PostgreSQL or Redis is
reported once per outage (health.py); the consumer backs off and resumes from its
checkpoint, so the batch that failed is simply applied again.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import redis
import structlog
from psycopg.types.json import Jsonb

from mailflow.config import Settings
from mailflow.consumers import groups
from mailflow.consumers import queries as q
from mailflow.consumers.projection import Projection
from mailflow.events.envelope import Envelope
from mailflow.events.keys import Keys
from mailflow.events.store import EventStore
from mailflow.infra.health import Backoff, Health
from mailflow.infra.services import (
    POSTGRES_OUTAGE,
    connect,
    is_postgres_outage,
    is_redis_outage,
    pool_conninfo,
    recover_pool,
    redis_client,
    scalar,
)
from mailflow.log import get_logger

log = get_logger("mailflow.consumer")

_INFRA_ERRORS = POSTGRES_OUTAGE
_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
ProgressFn = Callable[[int, int], None]


def checkpoints(conn: psycopg.Connection) -> dict[str, tuple[int, object]]:
    """Every consumer's checkpoint and when it last moved."""
    return {c: (int(p), u) for c, p, u in conn.execute(q.ALL_CHECKPOINTS).fetchall()}


def retention_floor(conn: psycopg.Connection) -> int | None:
    """The oldest checkpoint a consumer still needs: a relay republishing a lost stream starts
    there. None when no consumer has a checkpoint yet."""
    oldest = scalar(conn, q.OLDEST_CHECKPOINT)
    return None if oldest is None else int(oldest)


class _ApplyFailed(Exception):
    """The projection raised while applying events (not an infrastructure failure)."""


def describe(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:2000]


class ConsumerRunner:
    def __init__(
        self,
        projection: Projection,
        store: EventStore,
        redis_url: str,
        settings: Settings,
        *,
        consumer_id: str | None = None,
        health: Health | None = None,
    ) -> None:
        self.projection = projection
        self.name = projection.name
        self.store = store
        projection.bind(store, settings)
        self.redis_url = redis_url
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.consumer_id = consumer_id or f"{socket.gethostname()}-{os.getpid()}"
        self.stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._redis: redis.Redis | None = None
        self.applied = 0
        self.dead_lettered = 0
        self.log = log.bind(consumer=self.name)
        self.health = health or Health("consumer", f"{self.name}.{self.consumer_id}", self.log)

    # -- connections -------------------------------------------------------------------

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(pool_conninfo(self.store.pool))
        return self._conn

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            # Blocking reads need a socket timeout longer than BLOCK (redis-py's default is 5 s).
            timeout = self.settings.consumer_block_ms / 1000 + 10
            self._redis = redis_client(self.redis_url, socket_timeout=timeout)
        return self._redis

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    # -- the loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Catch up from PostgreSQL, then follow the live stream until `stop` is set."""
        if stop is not None:
            self.stop = stop
        self.log.info("consumer.start", consumer_id=self.consumer_id)
        backoff = Backoff()
        try:
            while not self.stop.is_set():
                try:
                    self.health.beat()
                    self.ensure_checkpoint()
                    self.catch_up()
                    self.health.ok("postgres")
                    self._ensure_group()
                    self._claim_stale()
                    self.health.ok("redis")
                    backoff.reset()
                    self._follow()
                except Exception as exc:
                    if is_postgres_outage(exc):
                        self.health.lost("postgres", exc)
                        recover_pool(self.store.pool)
                    elif is_redis_outage(exc):
                        self.health.lost("redis", exc)
                    else:
                        raise
                    self.close()
                    self.stop.wait(backoff.next())
        finally:
            self.log.info("consumer.stopped", applied=self.applied, dead_lettered=self.dead_lettered)
            self.close()

    def _follow(self) -> None:
        last_claim = time.monotonic()
        claim_every = self.settings.consumer_claim_idle_ms / 2000
        while not self.stop.is_set():
            self.health.beat()
            try:
                resp = groups.read(
                    self.redis,
                    self.name,
                    self.consumer_id,
                    {self.keys.events: ">"},
                    count=self.settings.consumer_batch_size,
                    block=self.settings.consumer_block_ms,
                )
            except groups.StreamLost:
                self._recover_group()
                continue
            self.health.ok("redis")
            entries = resp[0][1] if resp else []
            if entries:
                self.handle_entries(entries)
            else:
                # Quiet stream: make sure nothing was missed (relay down, Redis flushed).
                self.catch_up()
            self.health.ok("postgres")
            if time.monotonic() - last_claim > claim_every:
                try:
                    self._claim_stale()
                except groups.StreamLost:
                    self._recover_group()
                last_claim = time.monotonic()

    def _recover_group(self) -> None:
        """Redis lost the stream or the group (FLUSHALL, restart): PostgreSQL has everything."""
        self.log.warning("consumer.group_missing", detail="Redis lost its data; catching up and recreating")
        self.catch_up()
        self._ensure_group()

    def _ensure_group(self) -> None:
        cp = self.checkpoint()
        if groups.ensure_group(self.redis, self.keys.events, self.name, start_id=f"{cp}-0"):
            self.log.info("consumer.group_created", from_position=cp)

    def _claim_stale(self) -> None:
        """Take over entries a dead consumer of this group read but never acknowledged."""
        if self.stop.is_set():
            return
        for page in groups.claim_stale(
            self.redis,
            self.keys.events,
            self.name,
            self.consumer_id,
            min_idle_ms=self.settings.consumer_claim_idle_ms,
            count=self.settings.consumer_batch_size,
        ):
            groups.ack(self.redis, self.keys.events, self.name, page.deleted)
            if page.entries:
                self.log.info("consumer.reclaimed", count=len(page.entries))
                self.handle_entries(page.entries)
            if self.stop.is_set():
                break
        groups.forget_idle_consumers(
            self.redis,
            self.keys.events,
            self.name,
            keep=self.consumer_id,
            idle_ms=self.settings.consumer_claim_idle_ms * 4,
        )

    # -- applying ----------------------------------------------------------------------

    def handle_entries(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        envs: list[Envelope] = []
        ids = []
        for entry_id, fields in entries:
            ids.append(entry_id)
            try:
                env = self.store.upcast(Envelope.from_json(fields[b"event"]))
                pos = int(entry_id.split(b"-")[0])
                if env.position != pos:
                    raise ValueError(f"entry {entry_id.decode()} carries position {env.position}")
                envs.append(env)
            except Exception as exc:  # noqa: BLE001 - a malformed entry must not stop the consumer
                self._dead_letter_entry(entry_id, fields, describe(exc))
        if envs:
            envs.sort(key=lambda e: e.position or 0)
            if not self.apply_events(envs):
                return  # stopping: leave the rest pending, to be reclaimed
        groups.ack(self.redis, self.keys.events, self.name, ids)

    def apply_events(self, envs: list[Envelope]) -> bool:
        """Apply consecutive events; returns False if asked to stop before finishing."""
        try:
            self._apply_tx(envs)
            return True
        except _ApplyFailed:
            pass
        # Find the poison: apply one at a time, retrying each failure before giving up on it.
        for env in envs:
            if not self._apply_one(env):
                return False
        return True

    def _apply_tx(self, envs: list[Envelope]) -> None:
        conn = self.conn
        refill = False
        with conn.transaction():
            cp = self._lock_checkpoint(conn)
            todo = [e for e in envs if (e.position or 0) > cp]
            if not todo:
                return
            last = todo[-1].position or 0
            if todo[0].position != cp + 1 or last - cp != len(todo):
                if last - cp > self.settings.catchup_batch_size:
                    refill = True  # too big a hole for one transaction: catch up in batches
                else:
                    todo = self.store.read_all(cp, last - cp, upto=last, conn=conn)
            if not refill:
                tail = todo[-1]
                try:
                    with structlog.contextvars.bound_contextvars(
                        position=tail.position, correlation_id=tail.metadata.correlation_id
                    ):
                        self.projection.apply(conn, todo)
                except _INFRA_ERRORS:
                    raise
                except Exception as exc:
                    raise _ApplyFailed(describe(exc)) from exc
                conn.execute(q.SET_CHECKPOINT, (tail.position, self.name))
                self.applied += len(todo)
        if not refill:
            self.projection.committed(self._publish)
        if refill:
            self.catch_up(upto=max(e.position or 0 for e in envs))
            self._apply_tx(envs)

    def _publish(self, channel: str, message: bytes) -> None:
        """Pub/sub for a projection's committed() (fire and forget: Redis away loses the message)."""
        try:
            self.redis.publish(f"{self.keys.prefix}:{channel}", message)
        except _REDIS_ERRORS as exc:
            self.log.warning("consumer.publish_failed", channel=channel, error=str(exc)[:200])

    def _apply_one(self, env: Envelope) -> bool:
        with structlog.contextvars.bound_contextvars(position=env.position, correlation_id=env.metadata.correlation_id):
            return self._apply_one_with_retries(env)

    def _apply_one_with_retries(self, env: Envelope) -> bool:
        failed_before = False
        while True:
            try:
                self._apply_tx([env])
                if failed_before:
                    with self.conn.transaction():
                        self.conn.execute(q.CLEAR_FAILURE, (self.name, env.position))
                return True
            except _ApplyFailed as failure:
                failed_before = True
                error = str(failure)
                with self.conn.transaction():
                    attempts = scalar(
                        self.conn,
                        q.RECORD_FAILURE,
                        {"consumer": self.name, "position": env.position, "error": error},
                    )
                limit = self.settings.consumer_max_attempts
                self.log.warning("consumer.apply_failed", attempts=attempts, max_attempts=limit, error=error)
                if attempts >= limit:
                    self._dead_letter(env, attempts, error)
                    return True
                backoff = min(self.settings.consumer_retry_backoff_s * 2 ** (attempts - 1), 30)
                if self.stop.wait(backoff):
                    return False

    def _dead_letter(self, env: Envelope, attempts: int, error: str) -> None:
        conn = self.conn
        with conn.transaction():
            cp = self._lock_checkpoint(conn)
            if env.position != cp + 1:
                return  # someone else applied or dead-lettered it meanwhile
            dl_id = scalar(
                conn,
                q.DEAD_LETTER,
                {
                    "consumer": self.name,
                    "position": env.position,
                    "event_id": env.id,
                    "event_type": env.type,
                    "attempts": attempts,
                    "error": error,
                },
            )
            conn.execute(q.CLEAR_FAILURE, (self.name, env.position))
            conn.execute(q.SET_CHECKPOINT, (env.position, self.name))
        self.dead_lettered += 1
        self.log.error("consumer.dead_lettered", dead_letter_id=dl_id, attempts=attempts, error=error)
        try:
            self.redis.xadd(
                self.keys.dlq(self.name),
                {
                    "dead_letter_id": str(dl_id),
                    "consumer": self.name,
                    "position": str(env.position),
                    "event_id": str(env.id),
                    "type": env.type,
                    "attempts": str(attempts),
                    "error": error,
                    "event": env.to_json(),
                },
                maxlen=100_000,
                approximate=True,
            )
        except _REDIS_ERRORS as exc:  # PostgreSQL holds the dead letter; the mirror can wait
            self.log.warning("consumer.dlq_mirror_failed", error=describe(exc))

    def _dead_letter_entry(self, entry_id: bytes, fields: dict[bytes, bytes], error: str) -> None:
        """A stream entry that is not a valid envelope (not written by the relay).

        Nothing is lost by skipping it: events come from PostgreSQL whenever the stream has
        a hole. It is recorded so an operator can see who wrote it, then acknowledged.
        """
        self.log.error("consumer.malformed_entry", entry_id=entry_id.decode(), error=error)
        raw = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
        with self.conn.transaction():
            dl_id = scalar(
                self.conn,
                q.DEAD_LETTER_ENTRY,
                {"consumer": self.name, "entry_id": entry_id.decode(), "entry": Jsonb(raw), "error": error},
            )
        mirror: dict[Any, Any] = dict(raw)
        mirror.update({"dead_letter_id": str(dl_id), "consumer": self.name, "entry_id": entry_id, "error": error})
        try:
            self.redis.xadd(self.keys.dlq(self.name), mirror, maxlen=100_000, approximate=True)
        except _REDIS_ERRORS as exc:
            self.log.warning("consumer.dlq_mirror_failed", error=describe(exc))

    # -- checkpoints, catch-up, rebuild --------------------------------------------------

    def ensure_checkpoint(self) -> None:
        self.conn.execute(q.ENSURE_CHECKPOINT, (self.name,))

    def checkpoint(self) -> int:
        row = self.conn.execute(q.GET_CHECKPOINT, (self.name,)).fetchone()
        return int(row[0]) if row else 0

    def _lock_checkpoint(self, conn: psycopg.Connection) -> int:
        row = conn.execute(q.LOCK_CHECKPOINT, (self.name,)).fetchone()
        if row is None:
            conn.execute(q.ENSURE_CHECKPOINT, (self.name,))
            return int(scalar(conn, q.LOCK_CHECKPOINT, (self.name,)))
        return int(row[0])

    def catch_up(self, upto: int | None = None, progress: ProgressFn | None = None) -> int:
        """Apply events from PostgreSQL in batches until the head (or `upto`); returns the count."""
        if upto is None:
            self.store.sequence()  # harmless if the relay is sequencing already
            upto = self.store.head()
        cp = self.checkpoint()
        start = cp
        if cp < upto:
            self.log.info("consumer.catching_up", checkpoint=cp, head=upto)
        if self.projection.batch_size is not None:
            cp = self._catch_up_ranges(cp, upto, self.projection.batch_size, progress)
        else:
            cp = self._catch_up_envelopes(cp, upto, progress)
        return cp - start

    def _catch_up_envelopes(self, cp: int, upto: int, progress: ProgressFn | None) -> int:
        size = self.settings.catchup_batch_size
        # The next batch is read (on a pooled connection) while this one is applied: the
        # read's time in PostgreSQL and the apply's overlap instead of adding up.
        with ThreadPoolExecutor(1, thread_name_prefix=f"mailflow-{self.name}-read") as reader:
            ahead = reader.submit(self.store.read_all, cp, size, upto=upto) if cp < upto else None
            while ahead is not None and not self.stop.is_set():
                batch = ahead.result()
                if not batch:
                    break
                last = batch[-1].position or cp
                ahead = reader.submit(self.store.read_all, last, size, upto=upto) if last < upto else None
                if not self.apply_events(batch):
                    break
                cp = last
                if progress is not None:
                    progress(cp, upto)
            if ahead is not None:
                ahead.cancel()
        return cp

    def _catch_up_ranges(self, cp: int, upto: int, size: int, progress: ProgressFn | None) -> int:
        """Catch up a projection that reads the log itself, a range of positions at a time; a
        range that fails is read as envelopes and applied as such, so its poison is found and
        dead-lettered as anywhere else."""
        while cp < upto and not self.stop.is_set():
            last = min(cp + size, upto)
            try:
                self._apply_range_tx(cp, last)
            except _ApplyFailed:
                batch = self.store.read_all(cp, last - cp, upto=last)
                if not self.apply_events(batch):
                    break
            cp = self.checkpoint()
            if progress is not None:
                progress(cp, upto)
        return cp

    def _apply_range_tx(self, after: int, upto: int) -> None:
        conn = self.conn
        with conn.transaction():
            cp = self._lock_checkpoint(conn)
            if cp >= upto:
                return  # applied meanwhile (another member of the group)
            after = max(after, cp)
            try:
                with structlog.contextvars.bound_contextvars(position=upto):
                    self.projection.apply_range(conn, after, upto)
            except _INFRA_ERRORS:
                raise
            except Exception as exc:
                raise _ApplyFailed(describe(exc)) from exc
            conn.execute(q.SET_CHECKPOINT, (upto, self.name))
            self.applied += upto - after
        self.projection.committed(self._publish)

    def rebuild(self, from_position: int = 1, progress: ProgressFn | None = None) -> int:
        """Undo events >= from_position and apply them again from PostgreSQL."""
        from_position = max(from_position, 1)
        self.ensure_checkpoint()
        upto = self.store.sync()
        conn = self.conn
        with conn.transaction():
            cp = self._lock_checkpoint(conn)
            self.projection.reset(conn, from_position, cp)
            conn.execute(q.SUPERSEDE_DEAD_LETTERS, (self.name, from_position))
            conn.execute(q.SET_CHECKPOINT, (min(cp, from_position - 1), self.name))
        self.log.info("consumer.rebuild", from_position=from_position, head=upto)
        return self.catch_up(upto=upto, progress=progress)
