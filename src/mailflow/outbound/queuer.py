"""Outbound room: the queuer moves due jobs from PostgreSQL to the Redis priority streams.

One queuer is active at a time (advisory lock; others wait as standbys). Each pass:
reclaims jobs whose worker lease expired (active -> retry), then per priority (high first)
takes due jobs oldest first, within the per-(sender, domain) token buckets, skipping
paused campaigns and streams that are already deep (backpressure). A job is marked queued
(JobQueued, with a queue sequence number) in one transaction, then added to Redis with
entry ID <queue_seq>-0. A crash in between loses nothing and queues nothing twice: on
start, and whenever Redis lost its data, queued jobs after the stream's last ID are
added again, and Redis rejects any ID it already has.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psycopg
import redis

from ..config import Settings
from ..events.keys import Keys
from ..events.streams import raise_unless_duplicates, stream_last_id
from ..events.store import EventStore
from ..log import get_logger
from ..projectors import inline
from ..projectors import jobs as jobs_projection
from ..leader import run_as_leader
from ..services import redis_client
from . import campaigns
from . import queries as q
from .events import JobQueued, JobRetryScheduled
from .jobs import SLA_SECONDS, Priority
from .ratelimit import DEFAULT_LIMITS_PER_S, RateLimiter

QUEUER_LOCK_KEY = 7_300_010
log = get_logger("mailflow.queuer")


@dataclass
class QueuerStats:
    queued: dict[str, int] = field(default_factory=lambda: {p.value: 0 for p in Priority})
    reclaimed: int = 0
    republished: int = 0
    throttled: int = 0


class Queuer:
    def __init__(self, store: EventStore, redis_url: str, settings: Settings) -> None:
        self.store = store
        self.redis_url = redis_url
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.limiter = RateLimiter(limits={**DEFAULT_LIMITS_PER_S, **settings.rate_limits})
        self.stats = QueuerStats()
        self._epoch: bytes | None = None
        self._housekept = 0.0
        self.is_leader = threading.Event()

    def run(self, stop: threading.Event) -> None:
        run_as_leader("queuer", QUEUER_LOCK_KEY, self.store.pool.conninfo, stop,
                      lambda _conn: self._lead(stop), log, self.is_leader)
        log.info("queuer.stopped", queued=self.stats.queued, reclaimed=self.stats.reclaimed)

    def _lead(self, stop: threading.Event) -> None:
        r = redis_client(self.redis_url)
        try:
            while not stop.is_set():
                moved = self.tick(r)
                if moved < self.settings.queuer_batch_size:
                    stop.wait(self.settings.queuer_interval_s)
        finally:
            r.close()

    # -- one pass ---------------------------------------------------------------------------

    def tick(self, r: redis.Redis) -> int:
        """Reclaim expired leases, then queue due jobs; returns how many jobs were queued."""
        if self._epoch is None or r.get(self.keys.jobs_epoch) != self._epoch:
            self.republish(r)
        housekeeping = time.monotonic() - self._housekept > 1.0
        if housekeeping:
            campaigns.start_due(self.store)
            self.reclaim_expired()
        moved = 0
        for priority in Priority:
            moved += self._queue(r, priority)
        if housekeeping:
            campaigns.complete_finished(self.store)
            self._housekept = time.monotonic()
        return moved

    def reclaim_expired(self) -> int:
        """Jobs whose worker died mid-send: active -> retry, due now (another worker sends them)."""
        now = datetime.now(timezone.utc).isoformat()
        with inline.writing(self.store) as conn:
            rows = conn.execute(q.EXPIRED_LEASES, (self.settings.queuer_batch_size,)).fetchall()
            if not rows:
                return 0
            events = [
                JobRetryScheduled(
                    job_id=str(jid), attempt=attempts, reply="lease expired: the worker stopped answering",
                    due_at=now, reason="lease_expired",
                ).to_new()
                for jid, attempts in rows
            ]
            envs = self.store.append_many([(f"job-{e.data['job_id']}", e) for e in events], conn=conn)
            jobs_projection.apply(conn, envs)
        self.store.notify()
        self.stats.reclaimed += len(rows)
        log.warning("queuer.leases_expired", count=len(rows))
        return len(rows)

    def _queue(self, r: redis.Redis, priority: Priority) -> int:
        key = self.keys.jobs(priority)
        room = self.settings.queue_max_depth - r.xlen(key)
        if room <= 0:
            return 0
        limit = min(self.settings.queuer_batch_size, room)
        now = time.monotonic()
        with inline.writing(self.store) as conn:
            # Look past the head so one throttled domain does not block everyone behind it.
            rows = conn.execute(q.DUE_JOBS, {"priority": str(priority), "limit": limit * 4}).fetchall()
            granted = []
            for jid, sender, domain in rows:
                if len(granted) >= limit:
                    break
                if self.limiter.take(sender, domain, 1, now):
                    granted.append(jid)
                else:
                    self.stats.throttled += 1
            if granted:
                locked = {j for (j,) in conn.execute(q.LOCK_GRANTED, (granted,)).fetchall()}
                granted = [j for j in granted if j in locked]
            if not granted:
                return 0
            seqs = [s for (s,) in conn.execute(q.NEXT_QUEUE_SEQS, (len(granted),)).fetchall()]
            events = [JobQueued(job_id=str(j), queue_seq=s).to_new() for j, s in zip(granted, seqs)]
            envs = self.store.append_many([(f"job-{e.data['job_id']}", e) for e in events], conn=conn)
            jobs_projection.apply(conn, envs)
        self.store.notify()
        self._xadd(r, key, list(zip(granted, seqs)))
        self.stats.queued[str(priority)] += len(granted)
        return len(granted)

    def _xadd(self, r: redis.Redis, key: str, jobs: list[tuple[uuid.UUID, int]]) -> None:
        pipe = r.pipeline(transaction=False)
        for jid, seq in jobs:
            pipe.xadd(key, {"job_id": str(jid), "queue_seq": str(seq)}, id=f"{seq}-0")
        raise_unless_duplicates(pipe.execute(raise_on_error=False))

    def republish(self, r: redis.Redis) -> None:
        """Add queued jobs that Redis does not have (after a crash, a restart or a FLUSHALL)."""
        total = 0
        with self.store.pool.connection() as conn:
            for priority in Priority:
                key = self.keys.jobs(priority)
                last = stream_last_id(r, key) or 0
                rows = conn.execute(q.QUEUED_AFTER, (str(priority), last)).fetchall()
                if rows:
                    self._xadd(r, key, [(jid, seq) for jid, seq in rows])
                    total += len(rows)
        self._epoch = uuid.uuid4().hex.encode()
        r.set(self.keys.jobs_epoch, self._epoch)
        self.stats.republished += total
        if total:
            log.info("queuer.republished", count=total)


def queue_stats(conn: psycopg.Connection, r: redis.Redis, keys: Keys) -> list[dict[str, object]]:
    """Per priority: stream depth, jobs by state, oldest unfinished job, latency vs SLA."""
    rows = {row[0]: row for row in conn.execute(q.QUEUE_STATS).fetchall()}
    out = []
    for p in Priority:
        row = rows.get(str(p))
        p50, p99 = (row[8], row[9]) if row else (None, None)
        out.append({
            "priority": str(p),
            "stream_depth": r.xlen(keys.jobs(p)),
            "pending": row[1] if row else 0, "retry": row[2] if row else 0, "queued": row[3] if row else 0,
            "active": row[4] if row else 0, "completed": row[5] if row else 0, "failed": row[6] if row else 0,
            "oldest_unfinished_s": round(float(row[7]), 3) if row and row[7] is not None else None,
            "latency_p50_s": round(float(p50), 3) if p50 is not None else None,
            "latency_p99_s": round(float(p99), 3) if p99 is not None else None,
            "sla_s": SLA_SECONDS[p],
            "within_sla": None if p99 is None else float(p99) <= SLA_SECONDS[p],
        })
    return out
