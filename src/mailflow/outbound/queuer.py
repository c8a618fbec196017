"""Outbound room: the queuer moves due jobs from PostgreSQL to the Redis priority streams.

One queuer is active at a time (advisory lock; others wait as standbys). Each pass:
reclaims jobs whose worker lease expired (active -> retry), then per priority (high first)
takes due jobs oldest first, within the per-(sender, domain) token buckets, skipping
paused campaigns and streams that are already deep (backpressure). A job is marked queued
(JobQueued, with a queue sequence number) in one transaction, then added to Redis with
entry ID <queue_seq>-0, so Redis refuses a second copy.

Redis may lose anything at any moment, also between those two steps, so nothing here
trusts it to remember: `reconcile()` compares the jobs PostgreSQL says are queued with the
job ids the streams hold and adds the missing ones again. It runs at the start of every
term, as soon as the epoch key shows that Redis lost its data (FLUSHALL, a restart), after
an XADD failed, and whenever the cheap check every MAILFLOW_QUEUER_RECONCILE_INTERVAL_S
(each stream's XLEN against a count of its queued jobs) finds a stream shorter than its
queued jobs; as a backstop also every tenth interval (stale entries could hide a loss
from the count).

A worker cut off from PostgreSQL cannot renew its leases. Leases that expired only
lately are therefore left alone for the first seconds of a term (the queuer's own
reconnect after an outage begins one), so that workers coming back from the same outage
renew them instead of having their jobs sent a second time.

Periodic duties ride on the same loop: about once a second the leader turns the due rows of
the periodic table into jobs (periodic.py) - hourly aggregation, retention, the sending
domains' DNS re-checks - which workers run from the low queue like any job, so a DNS server
that hangs delays one duty, never the queue.
"""

from __future__ import annotations

import heapq
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from mailflow.config import Settings
from mailflow.consumers import groups, inline
from mailflow.events.envelope import Metadata
from mailflow.events.keys import Keys
from mailflow.events.store import EventStore
from mailflow.events.streams import raise_unless_duplicates, scan_fields, stream_last_entry_id
from mailflow.infra.health import Health
from mailflow.infra.leader import Term, run_as_leader
from mailflow.infra.locks import Lock
from mailflow.infra.services import redis_client
from mailflow.log import get_logger
from mailflow.outbound import campaigns, periodic, streams
from mailflow.outbound import queries as q
from mailflow.outbound.events import JobQueued, JobRetryScheduled
from mailflow.outbound.jobs import Priority
from mailflow.outbound.ratelimit import DEFAULT_LIMITS_PER_S, RateLimiter

QUEUER_LOCK_KEY = Lock.QUEUER
log = get_logger("mailflow.queuer")


@dataclass
class QueuerStats:
    queued: dict[str, int] = field(default_factory=lambda: {p.value: 0 for p in Priority})
    reclaimed: int = 0
    republished: int = 0
    throttled: int = 0


class DrainRate:
    """How much work to keep waiting, unread, in one priority's stream.

    Workers read a stream in order, so whatever waits in it is ahead of any job queued
    later - a tenant's first job included. The queuer therefore keeps only about
    `target_s` seconds of work unread there (at the rate the workers have lately taken it,
    never fewer than `floor` entries, never more than `cap`), and shares every batch
    between tenants (fair_share)."""

    def __init__(self, target_s: float, floor: int, cap: int) -> None:
        self.target_s, self.floor, self.cap = target_s, floor, cap
        self.rate = 0.0  # entries per second, smoothed
        self._last: tuple[float, int] | None = None  # (when, unread then + added since)

    def room(self, now: float, unread: int) -> int:
        if self._last is not None:
            then, expected = self._last
            dt = now - then
            if dt > 0.005:  # (closer samples are folded into the next one)
                taken = max(expected - unread, 0) / dt
                self.rate = taken if self.rate == 0 else 0.7 * self.rate + 0.3 * taken
                self._last = (now, unread)
        else:
            self._last = (now, unread)
        target = min(max(self.floor, int(self.rate * self.target_s)), self.cap)
        return target - unread

    def added(self, n: int) -> None:
        if self._last is not None:
            self._last = (self._last[0], self._last[1] + n)


def fair_share(
    rows: list[Any], limit: int, *, priority: Priority, turn: int, usage: Mapping[str, float] | None = None
) -> Iterator[tuple[Any, ...]]:
    """Due jobs in the order to offer them to the rate limiter, shared between tenants.

    Each next job is the oldest of the tenant with the smallest claim: what it sent lately
    (`usage`, decayed - see Usage) plus what it still has due (up to 4 x limit, as fetched).
    So a small campaign goes through almost as if it were alone, a big one waits at most for
    that small one, a tenant that starts while another has been sending goes first until
    they have sent alike, and two tenants that both have much to send share every batch
    half and half (round-robin; whose turn it is to go first changes every tick). A tenant
    at its hourly or daily limit offers no normal or low work (its transactional mail still
    goes).

    `rows` are (id, tenant, sender, domain, correlation, hourly_left, daily_left), a
    tenant's oldest first; yields (id, tenant, sender, domain, correlation), at most 4 x limit."""
    queues: dict[str, deque[tuple[Any, ...]]] = {}
    allowed: dict[str, float] = {}
    for jid, tenant, sender, domain, correlation, hourly_left, daily_left in rows:
        if tenant not in queues:
            queues[tenant] = deque()
            lefts = [x for x in (hourly_left, daily_left) if x is not None]
            allowed[tenant] = max(0, min(lefts)) if lefts and priority is not Priority.HIGH else float("inf")
        queues[tenant].append((jid, tenant, sender, domain, correlation))
    order = sorted(queues)
    if order:
        first = turn % len(order)
        order = order[first:] + order[:first]
    used = usage or {}
    more = {t for t, queue in queues.items() if len(queue) >= limit * 4}  # due jobs beyond those fetched
    heap = [(used.get(t, 0.0) + len(queues[t]), i, t) for i, t in enumerate(order) if allowed[t] > 0]
    heapq.heapify(heap)
    offered = 0
    while heap and offered < limit * 4:
        spent, i, tenant = heapq.heappop(heap)
        queue = queues[tenant]
        yield queue.popleft()
        offered += 1
        allowed[tenant] -= 1
        if queue and allowed[tenant] > 0:
            # One more sent, and one less due - unless it has more due than was fetched.
            heapq.heappush(heap, (spent + 1 if tenant in more else spent, i, tenant))


class Usage:
    """Messages each tenant released lately, decaying with a half-life of `half_life_s`:
    the measure fair_share evens out. Kept in the queuer's memory (a new queuer starts even)."""

    def __init__(self, half_life_s: float = 10.0) -> None:
        self.half_life_s = half_life_s
        self.used: dict[str, float] = {}
        self._at = time.monotonic()

    def now(self, now: float) -> dict[str, float]:
        factor = 0.5 ** ((now - self._at) / self.half_life_s)
        self._at = now
        self.used = {t: u * factor for t, u in self.used.items() if u * factor > 0.01}
        return self.used

    def add(self, tenant: str, n: int) -> None:
        self.used[tenant] = self.used.get(tenant, 0.0) + n


class Queuer:
    def __init__(self, store: EventStore, redis_url: str, settings: Settings, *, health: Health | None = None) -> None:
        self.store = store
        self.redis_url = redis_url
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.limiter = RateLimiter(limits={**DEFAULT_LIMITS_PER_S, **settings.rate_limits})
        self.stats = QueuerStats()
        self._epoch: bytes | None = None
        self._reconciled = 0.0
        self._checked = 0.0
        self._housekept = 0.0
        self._term_began = 0.0
        self._turn: dict[Priority, int] = dict.fromkeys(Priority, 0)  # which tenant goes first
        self._usage = Usage()
        self._drain = {
            p: DrainRate(settings.queue_target_s, settings.queue_min_unread, settings.queue_max_depth) for p in Priority
        }
        self.is_leader = threading.Event()
        self.health = health or Health("queuer", f"{socket.gethostname()}-{os.getpid()}", log)

    def run(self, stop: threading.Event) -> None:
        run_as_leader(
            "queuer",
            QUEUER_LOCK_KEY,
            self.store.pool,
            stop,
            lambda term: self._lead(term, stop),
            log,
            self.health,
            self.is_leader,
            redis_url=self.redis_url,
        )
        log.info(
            "queuer.stopped",
            queued=self.stats.queued,
            reclaimed=self.stats.reclaimed,
            republished=self.stats.republished,
        )

    def _lead(self, term: Term, stop: threading.Event) -> None:
        r = redis_client(self.redis_url, check=False)
        self._epoch = None  # a new term starts by checking the streams against PostgreSQL
        self._term_began = time.monotonic()
        try:
            while not stop.is_set():
                self.health.beat()
                term.check()
                moved = self.tick(r)
                self.health.ok("postgres")
                self.health.ok("redis")
                if moved < self.settings.queuer_batch_size:
                    stop.wait(self.settings.queuer_interval_s)
        finally:
            r.close()

    # -- one pass ---------------------------------------------------------------------------

    def tick(self, r: redis.Redis) -> int:
        """Reclaim expired leases, then queue due jobs; returns how many jobs were queued."""
        if self._epoch is None or r.get(self.keys.jobs_epoch) != self._epoch or self._streams_short(r):
            self.reconcile(r)
        housekeeping = time.monotonic() - self._housekept > 1.0
        if housekeeping:
            campaigns.start_due(self.store)
            self.reclaim_expired()
        moved = 0
        for priority in Priority:
            moved += self._queue(r, priority)
        if housekeeping:
            campaigns.complete_finished(self.store)
            if self.settings.periodic_duties:
                periodic.schedule_due(self.store)
            self._housekept = time.monotonic()
        return moved

    def reclaim_expired(self) -> int:
        """Jobs whose worker died mid-send: active -> retry, due now (another worker sends them)."""
        now = datetime.now(UTC).isoformat()
        hold = max(0.0, self.lease_grace_s - (time.monotonic() - self._term_began)) if self._term_began else 0.0
        with inline.writing(self.store) as w:
            rows = w.conn.execute(
                q.EXPIRED_LEASES, {"hold_s": hold, "limit": self.settings.queuer_batch_size}
            ).fetchall()
            if not rows:
                return 0
            w.record(
                [
                    (
                        streams.job(jid),
                        JobRetryScheduled(
                            job_id=str(jid),
                            attempt=attempts,
                            reply="lease expired: the worker stopped answering",
                            due_at=now,
                            reason="lease_expired",
                        ).to_new(Metadata(correlation_id=correlation, tenant=tenant)),
                    )
                    for jid, tenant, attempts, correlation in rows
                ]
            )
        self.stats.reclaimed += len(rows)
        log.warning("queuer.leases_expired", count=len(rows))
        return len(rows)

    def _queue(self, r: redis.Redis, priority: Priority) -> int:
        key = self.keys.jobs(priority)
        now = time.monotonic()
        unread = groups.unread(r, key, streams.WORKER_GROUP)
        room = self._drain[priority].room(now, unread)
        if room <= 0:
            return 0
        limit = min(self.settings.queuer_batch_size, room)
        with inline.writing(self.store) as w:
            conn = w.conn
            # Look past the head so one throttled domain does not block everyone behind it.
            rows = conn.execute(q.DUE_JOBS, {"priority": str(priority), "limit": limit * 4}).fetchall()
            self._turn[priority] += 1
            granted: list[Any] = []
            correlations: dict[Any, Metadata] = {}
            usage = self._usage.now(now)
            for jid, tenant, sender, domain, correlation in fair_share(
                rows, limit, priority=priority, turn=self._turn[priority], usage=usage
            ):
                if self.limiter.take(f"{tenant}/{sender}", domain, 1, now):
                    granted.append(jid)
                    correlations[jid] = Metadata(correlation_id=correlation, tenant=tenant)
                    if len(granted) >= limit:
                        break
                else:
                    self.stats.throttled += 1
            if granted:
                locked = {j for (j,) in conn.execute(q.LOCK_GRANTED, (granted,)).fetchall()}
                granted = [j for j in granted if j in locked]
            if not granted:
                return 0
            seqs = [s for (s,) in conn.execute(q.NEXT_QUEUE_SEQS, (len(granted),)).fetchall()]
            w.record(
                [
                    (
                        streams.job(j),
                        JobQueued(job_id=str(j), queue_seq=s).to_new(correlations[j]),
                    )
                    for j, s in zip(granted, seqs)
                ]
            )
        self._xadd(r, key, list(zip(granted, seqs)))
        self._drain[priority].added(len(granted))
        for j in granted:
            self._usage.add(correlations[j].tenant or "", 1)
        self.stats.queued[str(priority)] += len(granted)
        return len(granted)

    def _streams_short(self, r: redis.Redis) -> bool:
        """The periodic cheap check: is it time, and does a stream hold fewer entries than queued jobs?"""
        now = time.monotonic()
        interval = self.settings.queuer_reconcile_interval_s
        if now - self._checked < interval:
            return False
        self._checked = now
        if now - self._reconciled > 10 * interval:
            return True
        with self.store.pool.connection() as conn:
            queued: dict[str, int] = dict(conn.execute(q.QUEUED_COUNTS).fetchall())
        return any(r.xlen(self.keys.jobs(p)) < queued.get(str(p), 0) for p in Priority)

    @property
    def lease_grace_s(self) -> float:
        """How long a new term leaves lately expired leases to be renewed by their workers."""
        return min(self.settings.job_lease_s / 2, 15.0)

    def _xadd(self, r: redis.Redis, key: str, jobs: list[tuple[uuid.UUID, int]]) -> None:
        pipe = r.pipeline(transaction=False)
        for jid, seq in jobs:
            pipe.xadd(key, {"job_id": str(jid), "queue_seq": str(seq)}, id=f"{seq}-0")
        try:
            raise_unless_duplicates(pipe.execute(raise_on_error=False))
        except redis.RedisError:
            self._epoch = None  # some may be missing: compare with PostgreSQL before going on
            raise

    def reconcile(self, r: redis.Redis) -> int:
        """Add every job PostgreSQL says is queued that its stream does not hold (under its
        current queue_seq); returns how many.

        The epoch key is set first, so a flush during the comparison is seen at the next
        tick. Each stream is read before PostgreSQL: an entry the worker deletes in between
        belongs to a job that is no longer queued, so no job is added twice by mistake (and
        if one were, the worker's claim refuses the second entry: it starts a job only while
        it is queued under that queue_seq).
        """
        epoch = uuid.uuid4().hex.encode()
        r.set(self.keys.jobs_epoch, epoch)
        self._epoch = epoch
        total = 0
        for priority in Priority:
            key = self.keys.jobs(priority)
            last = stream_last_entry_id(r, key)
            # By job and queue_seq: an entry of an earlier attempt (a job queued again after its
            # lease expired) does not stand for the current one; the worker refuses it as stale.
            held = set(scan_fields(r, key, (b"job_id", b"queue_seq")))
            with self.store.pool.connection() as conn:
                rows = conn.execute(q.QUEUED_JOBS, (str(priority),)).fetchall()
            missing = [(jid, seq) for jid, seq in rows if (str(jid).encode(), str(seq).encode()) not in held]
            if missing:
                self._readd(r, key, missing, last)
                total += len(missing)
        self._reconciled = self._checked = time.monotonic()
        self.stats.republished += total
        if total:
            log.warning(
                "queuer.republished",
                count=total,
                detail="Redis had lost these queued jobs (flushed, restarted or cut off); added again",
            )
        return total

    def _readd(self, r: redis.Redis, key: str, jobs: list[tuple[uuid.UUID, int]], last: tuple[int, int] | None) -> None:
        """Add lost entries after whatever the stream holds now.

        An entry keeps ID <queue_seq>-0 when that is still above the stream's last ID;
        otherwise it takes the next free sub-ID of the last one (<last>-1, -2, ...), which
        keeps every later <queue_seq>-0 valid.
        """
        pipe = r.pipeline(transaction=False)
        for jid, seq in jobs:
            if last is None or seq > last[0]:
                last = (seq, 0)
            else:
                last = (last[0], last[1] + 1)
            pipe.xadd(key, {"job_id": str(jid), "queue_seq": str(seq)}, id=f"{last[0]}-{last[1]}")
        for res in pipe.execute(raise_on_error=False):
            if isinstance(res, Exception):
                self._epoch = None
                raise res
