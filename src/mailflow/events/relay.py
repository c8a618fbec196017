"""Events room: the relay publishes committed events, in order, to the Redis stream.

One relay is active at a time (PostgreSQL advisory lock); a second instance waits as a hot
standby. Entry IDs are `<position>-0`, so Redis itself rejects a republish of an entry it
already has: a relay that crashed mid-batch restarts from the stream's last ID and nothing
is lost or duplicated. The relay is also the sequencer that gives committed events their
positions. It wakes on NOTIFY (sent once per burst of commits) and polls as a fallback.
Redis is disposable: when the relay's epoch key vanishes (restart without persistence,
FLUSHALL) it republishes the retention window (`stream_maxlen` entries), or less: from the
oldest checkpoint a consumer still needs, when it is given `retention_floor` (the consumers
room knows the checkpoints; this room ranks below it, so it is handed in). A lost
PostgreSQL or Redis ends its term (leader.py): it reports the outage once, backs off and
leads again from where the stream stands.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import redis

from mailflow.config import Settings
from mailflow.events.envelope import Envelope
from mailflow.events.keys import Keys
from mailflow.events.registry import registry
from mailflow.events.store import EventStore
from mailflow.events.streams import raise_unless_duplicates, stream_last_id
from mailflow.infra.health import Health
from mailflow.infra.leader import Term, run_as_leader
from mailflow.infra.locks import Lock
from mailflow.infra.services import redis_client
from mailflow.log import get_logger

RELAY_LOCK_KEY = Lock.RELAY
ANNOUNCE_WITHIN_S = 300.0  # older events are not announced on pub/sub (a republish)

log = get_logger("mailflow.relay")

# The oldest position some consumer still needs (None: no consumer yet); e.g. consumers.runtime.retention_floor.
RetentionFloor = Callable[[psycopg.Connection], int | None]


@dataclass
class RelayStats:
    published: int = 0
    last_position: int = 0
    republished_from: int | None = None


class Relay:
    def __init__(
        self,
        store: EventStore,
        redis_url: str,
        settings: Settings,
        *,
        health: Health | None = None,
        retention_floor: RetentionFloor | None = None,
    ) -> None:
        self.store = store
        self.retention_floor = retention_floor
        self.redis_url = redis_url
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.stats = RelayStats()
        self._epoch: bytes | None = None
        self._published = 0
        self.is_leader = threading.Event()
        self.health = health or Health("relay", f"{socket.gethostname()}-{os.getpid()}", log)

    def run(self, stop: threading.Event) -> None:
        """Wait to become leader, then publish until `stop` is set; survives lost connections."""
        run_as_leader(
            "relay",
            RELAY_LOCK_KEY,
            self.store.pool,
            stop,
            lambda term: self._lead(term, stop),
            log,
            self.health,
            self.is_leader,
            redis_url=self.redis_url,
        )
        log.info("relay.stopped", published=self.stats.published, position=self._published)

    # -- publishing ----------------------------------------------------------------------

    def _lead(self, term: Term, stop: threading.Event) -> None:
        conn = term.conn
        conn.execute(f"LISTEN {self.store.channel}")
        r = redis_client(self.redis_url, check=False)
        try:
            self._resume(r)
            blocked_wait = self.settings.relay_retry_interval_s
            while not stop.is_set():
                self.health.beat()
                if r.get(self.keys.relay_epoch) != self._epoch:
                    log.warning("relay.redis_reset", detail="epoch key missing; republishing")
                    self._resume(r)
                self.store.sequence(self.settings.relay_batch_size * 4)
                batch = self.store.read_all(self._published, self.settings.relay_batch_size)
                self.health.ok("postgres")
                self.health.ok("redis")
                if batch:
                    self._publish(r, batch)
                    blocked_wait = self.settings.relay_retry_interval_s
                    continue
                if self.store.has_unsequenced():
                    # Committed events wait behind an older open transaction: look again soon,
                    # backing off (up to 100 ms) while it stays open.
                    stop.wait(blocked_wait)
                    blocked_wait = min(blocked_wait * 2, max(0.1, self.settings.relay_retry_interval_s))
                    continue
                blocked_wait = self.settings.relay_retry_interval_s
                self._wait_for_notify(conn, stop)
        finally:
            r.close()

    def _wait_for_notify(self, conn: psycopg.Connection, stop: threading.Event) -> None:
        # Short slices so SIGTERM is honoured quickly; the full slice is the polling fallback.
        deadline = time.monotonic() + self.settings.relay_poll_interval_s
        while not stop.is_set():
            self.health.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            woke = any(True for _ in conn.notifies(timeout=min(left, 0.25), stop_after=1))
            if woke:
                # Drain whatever else arrived; one wake-up covers them all. (Not inside the
                # loop above: a notifies() generator holds the connection's lock.)
                for _ in conn.notifies(timeout=0.001):
                    pass
                return

    def _resume(self, r: redis.Redis) -> None:
        """Find where to continue: the stream's last ID, or (stream lost) the oldest checkpoint."""
        last = stream_last_id(r, self.keys.events)
        head = self.store.head()
        if last is not None:
            start = last
            if last > head:
                log.warning(
                    "relay.stream_ahead_of_database",
                    stream_last=last,
                    head=head,
                    detail="the Redis stream holds positions this database has not reached; "
                    "is another database publishing to the same prefix?",
                )
        else:
            oldest = None
            if self.retention_floor is not None:
                with self.store.pool.connection() as c:
                    oldest = self.retention_floor(c)
            # No mailflow consumer yet: publish the retention window for other readers.
            start = 0 if oldest is None else oldest
            start = max(start, head - self.settings.stream_maxlen, 0)
            self.stats.republished_from = start
            log.info("relay.republish", from_position=start + 1, head=head)
        self._published = min(start, head) if last is None else start
        self._epoch = uuid.uuid4().hex.encode()
        r.set(self.keys.relay_epoch, self._epoch)

    def _publish(self, r: redis.Redis, batch: list[Envelope]) -> None:
        pipe = r.pipeline(transaction=False)
        now = datetime.now(UTC)
        for env in batch:
            channel = registry.channel(env.type)
            # Live notifications are for what just happened: a republish after Redis lost the
            # stream does not announce old events again.
            if channel is not None and (now - env.recorded_at).total_seconds() < ANNOUNCE_WITHIN_S:
                pipe.publish(f"{self.keys.prefix}:{channel}", env.to_json())
            pipe.xadd(
                self.keys.events,
                {
                    "type": env.type,
                    "tenant": env.metadata.tenant or "",
                    "stream": env.stream,
                    "position": str(env.position),
                    "event": env.to_json(),
                },
                id=f"{env.position}-0",
                maxlen=self.settings.stream_maxlen,
                approximate=True,
            )
        raise_unless_duplicates(pipe.execute(raise_on_error=False))
        self._published = batch[-1].position or self._published
        self.stats.published += len(batch)
        self.stats.last_position = self._published
