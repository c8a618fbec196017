"""Outbound room: SMTP workers - take jobs from the priority streams and send them.

asyncio with aiosmtplib. High before normal before low, always: a few slots are kept for
high-priority work, and every few reads low goes before normal so it is never starved.
Jobs are started in batches (JobStarted with a lease, in one transaction), sent over SMTP
sessions that are reused for many messages, and finished in batches (JobCompleted,
JobFailed or JobRetryScheduled, with the remote reply) before their stream entries are
acknowledged. A tracked campaign's message (docs/tracking.md) has its links rewritten and the
open pixel added before it is built; nothing else pays for tracking. A worker killed mid-send
leaves active jobs whose lease expires; the queuer then retries them, so at most the messages
in flight at the kill can go out twice. Jobs that are not emails (duties: runtime/duties.py)
are claimed, leased and recorded the same way and run in a thread.

Losing PostgreSQL or Redis for a while stops nothing that is already under way. SMTP
transactions in flight run to their end; their outcomes wait in memory and are recorded
when PostgreSQL answers again, leases are renewed as soon as it does, and entries read
but not yet claimed are claimed then (a claim whose commit was not seen is recognised
and resumed, not left for its lease to expire). Acknowledgements wait for Redis. After a
Redis error the worker reads its own pending entries again, so entries whose reply was
lost on the wire are not left for XAUTOCLAIM. Each outage is reported once (health.py).
On SIGTERM the worker finishes its sends and keeps trying to record them for
MAILFLOW_WORKER_STOP_TIMEOUT_S; what it could not record then is said in one line.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiosmtplib
import redis.asyncio as aredis
from psycopg.rows import dict_row

from mailflow.config import Settings
from mailflow.consumers import groups, inline
from mailflow.errors import ServiceUnavailable
from mailflow.events.envelope import Metadata, NewEvent
from mailflow.events.keys import Keys
from mailflow.events.store import EventStore
from mailflow.infra import personal
from mailflow.infra.health import Backoff, Health
from mailflow.infra.services import (
    POSTGRES_OUTAGE,
    async_redis_client,
    is_postgres_outage,
    is_redis_outage,
    recover_pool,
)
from mailflow.infra.tenancy import DEFAULT_TENANT
from mailflow.infra.vault import Keyring, Vault
from mailflow.log import get_logger
from mailflow.mail import tracking
from mailflow.mail.addresses import without_address
from mailflow.outbound import consent, mime, mx, smtp, streams, templates
from mailflow.outbound import queries as q
from mailflow.outbound.events import (
    ContactStatusChanged,
    JobCompleted,
    JobFailed,
    JobRetryScheduled,
    JobStarted,
    SuppressionAdded,
)
from mailflow.outbound.jobs import Priority
from mailflow.outbound.replies import FailureKind, Outcome, RetrySchedule, Verdict, classify, transient
from mailflow.outbound.senders import Sender, SmtpRelay, smtp_client
from mailflow.outbound.sending import load_sender

GROUP = streams.WORKER_GROUP
LOW_EVERY = 8  # every 8th read offers low before normal
BATCH_GATHER_S = 0.01  # a busy worker waits this long at most for more free slots before starting jobs
ORPHAN_CLAIM_EVERY_S = 5.0
log = get_logger("mailflow.worker")
Entry = tuple[Priority, bytes, dict[bytes, bytes]]
Duty = Callable[[dict[str, Any]], str]  # a job's args -> what it did (runtime/duties.py)


@dataclass
class Claimed:
    priority: Priority
    entry_id: bytes
    job_id: str
    attempt: int
    email: str | None  # None: the recipient was erased (the job is refused)
    sender: str
    template: str
    variables: dict[str, Any]
    campaign_id: str | None
    attributes: dict[str, Any]
    correlation_id: str | None = None
    tenant: str | None = None
    subject: str = ""
    subject_key: bytes | None = None  # seals what a bounce records about the recipient
    kind: str = "send"  # or a duty's kind (periodic.py), run by the worker's table of duties
    args: dict[str, Any] = field(default_factory=dict)
    tracking: bool = False  # a campaign message whose opens and clicks are tracked (docs/tracking.md)

    @property
    def metadata(self) -> Metadata:
        return Metadata(correlation_id=self.correlation_id, tenant=self.tenant)


def refusal_reason(
    job: Claimed,
    *,
    suppressed: str | None,
    contact_status: str | None,
    campaign_status: str | None,
    stopped: bool = False,
) -> tuple[str, str] | None:
    """Why a claimed job must not be sent, as (reply, failure kind); None to send it.

    Consent (consent.may_send): an unsubscribe stops campaign mail, not transactional mail."""
    if job.email is None:
        return "not sent: the recipient was erased on request", "suppressed"
    why = consent.may_send(transactional=job.campaign_id is None, contact_status=contact_status, suppression=suppressed)
    if why is not None:
        return why, "suppressed"
    if job.campaign_id is not None and campaign_status == "cancelled":
        return "campaign cancelled", "cancelled"
    if job.campaign_id is not None and stopped:
        return "not sent: the contact replied, and the campaign stops on reply", "stopped"
    return None


@dataclass
class Result:
    job: Claimed
    verdict: Verdict
    code: int | None
    reply: str
    kind: str | None = None  # overrides the verdict's failure kind (suppressed, message)
    size: int | None = None  # bytes of the message as sent
    # The events that record it, made once: a retried write after a commit that was not
    # seen carries the same event ids, so it can tell "already recorded" from "lost the lease".
    events: list[tuple[str, NewEvent]] | None = None


class _Unavailable(Exception):
    """PostgreSQL stayed away while the worker was stopping; the job is recorded as a retry."""


class RelayPool:
    """Open SMTP sessions to one relay (or one MX host), reused across messages, one at a time each.

    A session idle for `idle_close_s` is closed rather than reused: servers hang up on idle
    clients (RFC 5321 asks them to wait at least 5 minutes), and a message sent into a
    session the server has dropped would wait for a retry.
    """

    def __init__(
        self, relay: SmtpRelay, size: int, local_hostname: str | None = None, idle_close_s: float = 60.0
    ) -> None:
        self.relay = relay
        self.size = size
        self.local_hostname = local_hostname
        self.idle_close_s = idle_close_s
        self.idle: list[tuple[float, aiosmtplib.SMTP]] = []
        self.open = 0
        self.urgent_waiting = 0
        self.available = asyncio.Condition()

    async def acquire(self, urgent: bool = False) -> aiosmtplib.SMTP:
        """A session for one message; `urgent` (high priority) ones go before everyone waiting."""
        async with self.available:
            self.urgent_waiting += urgent
            try:
                while (not self.idle and self.open >= self.size) or (not urgent and self.urgent_waiting):
                    await self.available.wait()
            finally:
                self.urgent_waiting -= urgent
            now = time.monotonic()
            client = None
            while self.idle and client is None:
                used, candidate = self.idle.pop()
                if candidate.is_connected and now - used < self.idle_close_s:
                    client = candidate
                else:
                    candidate.close()
                    self.open -= 1
            if client is None:
                self.open += 1
            if self.idle or self.open < self.size:
                self._wake()  # a waiter held back by this urgent one can go now
        if client is not None:
            return client
        try:
            client = smtp_client(self.relay, self.local_hostname)
            await client.connect()
            return client
        except BaseException:
            await self._forget()
            raise

    async def release(self, client: aiosmtplib.SMTP, healthy: bool) -> None:
        if healthy and client.is_connected:
            async with self.available:
                self.idle.append((time.monotonic(), client))
                self._wake()
            return
        try:
            client.close()
        finally:
            await self._forget()

    async def prune(self) -> None:
        """Say QUIT to sessions that have been idle too long."""
        now = time.monotonic()
        async with self.available:
            stale = [c for used, c in self.idle if now - used >= self.idle_close_s]
            self.idle = [(used, c) for used, c in self.idle if now - used < self.idle_close_s]
            self.open -= len(stale)
            if stale:
                self.available.notify_all()
        await _quit_all(stale)

    async def _forget(self) -> None:
        async with self.available:
            self.open -= 1
            self._wake()

    def _wake(self) -> None:
        # Condition.notify() wakes the longest waiter, which may be held back for an urgent one.
        if self.urgent_waiting:
            self.available.notify_all()
        else:
            self.available.notify()

    async def close(self) -> None:
        idle, self.idle = [c for _, c in self.idle], []
        await _quit_all(idle)


async def _quit_all(clients: list[aiosmtplib.SMTP]) -> None:
    for client in clients:
        try:
            await asyncio.wait_for(client.quit(), 2)
        except Exception:  # noqa: BLE001 - closing anyway
            client.close()


def check_settings(settings: Settings) -> None:
    """Refuse, with one ConfigurationError line, delivery settings a worker could not use."""
    mx.MxResolver(settings.mx_overrides, nameservers=settings.dns_servers)


class Worker:
    def __init__(
        self,
        store: EventStore,
        redis_url: str,
        settings: Settings,
        secret: bytes,
        *,
        vault: Vault | None = None,
        name: str | None = None,
        health: Health | None = None,
        duties: Mapping[str, Duty] | None = None,
    ) -> None:
        self.store = store
        self.duties = dict(duties or {})
        self.redis_url = redis_url
        self.settings = settings
        self.secret = secret
        self.tracking_base = settings.tracking_base  # None: no message is tracked
        # Relay passwords and DKIM keys, read from the vault when a sender is loaded.
        self.vault = vault or Vault(Keyring.load(settings.home, settings.secret_key, settings.secret_key_file))
        self.keys = Keys(settings.redis_prefix)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.schedule = RetrySchedule(settings.retry_base_s, settings.retry_factor, settings.retry_max_attempts)
        self.pools: dict[tuple, RelayPool] = {}
        self.mx = mx.MxResolver(settings.mx_overrides, nameservers=settings.dns_servers)
        self.senders: dict[tuple[str | None, str], tuple[float, Sender]] = {}
        self.templates: dict[tuple[str | None, str], tuple[float, templates.Template]] = {}
        self.results: list[Result] = []  # finished sends not yet recorded
        self.in_flight: set[asyncio.Task] = set()
        self._slot_freed = asyncio.Event()
        self.sending: set[str] = set()  # job ids started here and not yet recorded
        self.held: set[tuple[Priority, bytes]] = set()  # their stream entries
        self._unclaimed: list[Entry] = []  # read from Redis, claim not committed yet
        self._uncertain: dict[str, int] = {}  # job id -> queue_seq of claims whose commit was not seen
        self._unacked: dict[Priority, list[bytes]] = {}  # entries to XACK + XDEL when Redis answers
        self._groups_ready = False
        self._check_own_pending = True  # at start, and after any Redis error
        self._stopping = False
        self.sent = 0
        self.batches = {"starts": 0, "started": 0, "finishes": 0, "finished": 0}  # transactions and jobs
        self._reads = 0
        self.log = log.bind(worker=self.name)
        self.health = health or Health("worker", self.name, self.log)

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        r = async_redis_client(self.redis_url)
        backoff = Backoff()
        flusher = asyncio.create_task(self._flush_loop(r, stop))
        self.log.info("worker.start", concurrency=self.settings.worker_concurrency)
        state = {"last_orphans": 0.0, "gathering_since": None}
        try:
            while not stop.is_set():
                self.health.beat()
                if flusher.done():
                    break  # it raised: a bug; let it out below
                try:
                    await self._step(r, state)
                    backoff.reset()
                except Exception as exc:
                    if not await self._outage(exc):
                        raise
                    await _wait(stop, backoff.next())
            self._stopping = True
            self.health.stopping()
            if self.in_flight:  # SIGTERM: finish what was started
                await asyncio.wait(self.in_flight)
            await flusher
        finally:
            if not flusher.done():
                flusher.cancel()
            for pool in self.pools.values():
                await pool.close()
            await r.aclose()
            self.log.info("worker.stopped", sent=self.sent, unrecorded=len(self.results), **self.batches)
        if self.results:
            raise ServiceUnavailable(
                f"{len(self.results)} finished send(s) could not be recorded: PostgreSQL did not answer within "
                f"{self.settings.worker_stop_timeout_s:g} s of the stop; their jobs are retried when their leases "
                "expire, so those messages may go out twice",
                service="postgres",
            )

    async def _outage(self, exc: BaseException) -> bool:
        """Report a lost server and clear what it broke; False if `exc` is not an outage."""
        if is_postgres_outage(exc):
            self.health.lost("postgres", exc)
            await asyncio.to_thread(recover_pool, self.store.pool)
            return True
        if is_redis_outage(exc):
            self.health.lost("redis", exc)
            self._check_own_pending = True
            return True
        return False

    async def _step(self, r: aredis.Redis, state: dict[str, Any]) -> None:
        """One turn of the main loop: claim what is waiting, or read more and start it."""
        if self._unclaimed:  # the database was away when these were read
            await self._start(self._unclaimed)
            return
        if not self._groups_ready:
            await self._ensure_groups(r)
        if self._check_own_pending:
            await self._claim_own_pending(r)
        if time.monotonic() - state["last_orphans"] > ORPHAN_CLAIM_EVERY_S:
            await self._claim_orphans(r)
            state["last_orphans"] = time.monotonic()
        # Jobs are started in batches: one transaction for a few slots is most of the cost
        # of starting them, so a busy worker waits briefly for a quarter of its slots.
        min_batch = max(1, self.settings.worker_concurrency // 4)
        free = self.settings.worker_concurrency - len(self.in_flight)
        if free < min_batch and self.in_flight:
            now = time.monotonic()
            state["gathering_since"] = state["gathering_since"] or now
            wait = (0.1 if free <= 0 else BATCH_GATHER_S) - (now - state["gathering_since"])
            if wait > 0:
                self._slot_freed.clear()
                try:
                    await asyncio.wait_for(self._slot_freed.wait(), wait)
                except TimeoutError:
                    pass
                return
            if free <= 0:
                state["gathering_since"] = None
                return
        state["gathering_since"] = None
        entries = await self._read(r, free)
        self.health.ok("redis")
        if entries:
            await self._start(entries)

    async def _ensure_groups(self, r: aredis.Redis) -> None:
        for p in Priority:
            await groups.ensure_group_async(r, self.keys.jobs(p), GROUP)
        self._groups_ready = True

    async def _xreadgroup(self, r: aredis.Redis, streams: dict[str, Any], **kw: Any) -> groups.StreamEntries:
        """XREADGROUP; a stream or group Redis lost (FLUSHALL, restart) is recreated next turn."""
        try:
            return await groups.read_async(r, GROUP, self.name, streams, **kw)
        except groups.StreamLost:
            self._groups_ready = False
            return []

    async def _read(self, r: aredis.Redis, free: int) -> list[Entry]:
        reserve = max(1, self.settings.worker_concurrency // 10)
        self._reads += 1
        order = [Priority.HIGH, Priority.NORMAL, Priority.LOW]
        if self._reads % LOW_EVERY == 0:
            order = [Priority.HIGH, Priority.LOW, Priority.NORMAL]
        for p in order:
            count = free if p is Priority.HIGH else free - reserve
            if count <= 0:
                continue
            res = await self._xreadgroup(r, {self.keys.jobs(p): ">"}, count=count)
            if res:
                return [(p, eid, f) for _, entries in res for eid, f in entries]
            if not self._groups_ready:
                return []
        # Nothing ready anywhere: wait briefly for whichever stream gets work first.
        res = await self._xreadgroup(r, {self.keys.jobs(p): ">" for p in Priority}, count=1, block=100)
        out: list[Entry] = []
        for key, entries in res:
            p = Priority(key.rsplit(":", 1)[1])
            out.extend((p, eid, f) for eid, f in entries)
        return out

    async def _claim_own_pending(self, r: aredis.Redis) -> None:
        """Entries Redis handed to this consumer name that this process is not working on.

        After a lost reply (the entries reached our pending list, not us), or left by an
        earlier process under the same name that was killed before it claimed them. Claiming
        them now beats waiting for XAUTOCLAIM's idle time.
        """
        found: list[Entry] = []
        for p in Priority:
            after: str | bytes = "0"
            while True:
                res = await self._xreadgroup(r, {self.keys.jobs(p): after}, count=500)
                entries = res[0][1] if res else []
                if not entries:
                    break
                for eid, fields in entries:
                    if (p, eid) in self.held:
                        continue
                    if fields:
                        found.append((p, eid, fields))
                    else:  # deleted while pending: nothing to do but acknowledge
                        self._unacked.setdefault(p, []).append(eid)
                after = entries[-1][0]
        self._check_own_pending = False
        if found:
            self.log.info("worker.own_pending_reclaimed", count=len(found))
            await self._start(found)

    async def _claim_orphans(self, r: aredis.Redis) -> None:
        """Entries another worker read but never finished (it died before starting them).

        A job it had started is retried by the queuer when its lease expires, under a new
        entry; the old entry is then stale and only acknowledged here.
        """
        idle_ms = int(self.settings.job_lease_s * 1000)
        for p in Priority:
            try:
                async for page in groups.claim_stale_async(
                    r, self.keys.jobs(p), GROUP, self.name, min_idle_ms=idle_ms, count=100
                ):
                    live = [(p, eid, f) for eid, f in page.entries if (p, eid) not in self.held]
                    if page.deleted:
                        self._unacked.setdefault(p, []).extend(page.deleted)
                    if live:
                        self.log.info("worker.reclaimed", priority=str(p), count=len(live))
                        await self._start(live)
            except groups.StreamLost:
                self._groups_ready = False

    async def _start(self, entries: list[Entry]) -> None:
        """Claim the jobs of these entries and start sending them; on an outage, keep them for later."""
        self._unclaimed = entries
        claimed, stale, refused = await asyncio.to_thread(self._claim, entries)
        self._unclaimed = []
        self.health.ok("postgres")
        self.batches["starts"] += 1
        self.batches["started"] += len(entries)
        for p, eid in stale:
            self._unacked.setdefault(p, []).append(eid)
        for res in refused:
            self.held.add((res.job.priority, res.job.entry_id))
            self.results.append(res)
        for job in claimed:
            self.sending.add(job.job_id)
            self.held.add((job.priority, job.entry_id))
            task = asyncio.create_task(self._send(job))
            self.in_flight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.in_flight.discard(task)
        self._slot_freed.set()

    # -- database work (in a thread) ----------------------------------------------------------

    def _claim(self, entries: list[Entry]):
        wanted = {}
        for p, eid, fields in entries:
            wanted[fields[b"job_id"].decode()] = (p, eid, int(fields[b"queue_seq"]))
        lease = (datetime.now(UTC) + timedelta(seconds=self.settings.job_lease_s)).isoformat()
        claimed, stale, refused, events = [], [], [], []
        try:
            with inline.writing(self.store) as w, w.conn.cursor(row_factory=dict_row) as cur:
                rows = cur.execute(q.CLAIM_JOBS, (list(wanted),)).fetchall()
                found = {str(r["id"]): r for r in rows}
                for job_id, (p, eid, seq) in wanted.items():
                    row = found.get(job_id)
                    if row is None or row["queue_seq"] != seq:
                        stale.append((p, eid))  # already handled, or queued again under a newer entry
                        continue
                    state, attempts, worker = row["state"], row["attempts"], row["worker"]
                    md = Metadata(correlation_id=row["correlation_id"], tenant=row["tenant"])
                    if state == "queued":
                        attempt = attempts + 1
                        events.append(
                            JobStarted(job_id=job_id, attempt=attempt, worker=self.name, lease_until=lease).to_new(md)
                        )
                    elif (
                        state == "active"
                        and worker == self.name
                        and self._uncertain.get(job_id) == seq
                        and job_id not in self.sending
                    ):
                        attempt = attempts  # this worker's own claim, committed though we did not see it
                    else:
                        stale.append((p, eid))
                        continue
                    campaign_id = row["campaign_id"]
                    job = Claimed(
                        p,
                        eid,
                        job_id,
                        attempt,
                        row["email"],
                        row["sender"],
                        row["template"],
                        row["variables"] or {},
                        str(campaign_id) if campaign_id else None,
                        row["attributes"] or {},
                        row["correlation_id"],
                        row["tenant"],
                        row["subject"],
                        bytes(row["subject_key"]) if row["subject_key"] is not None else None,
                        row["kind"],
                        row["args"] or {},
                        tracking=bool(row["tracking"]),
                    )
                    if job.kind != "send":
                        claimed.append(job)  # a duty: nobody to consent, nothing to suppress
                        continue
                    refusal = refusal_reason(
                        job,
                        suppressed=row["suppressed"],
                        contact_status=row["contact_status"],
                        campaign_status=row["campaign_status"],
                        stopped=row["stopped"],
                    )
                    if refusal is not None:
                        why, kind = refusal
                        refused.append(
                            Result(job, Verdict(Outcome.FAILED, FailureKind.PERMANENT, False), None, why, kind)
                        )
                        continue
                    claimed.append(job)
                if events:
                    w.record([(streams.job(e.data["job_id"]), e) for e in events])
        except POSTGRES_OUTAGE:
            for job_id, (_, _, seq) in wanted.items():
                self._uncertain[job_id] = seq  # if the commit happened after all, the retry resumes it
            raise
        for job_id in wanted:
            self._uncertain.pop(job_id, None)
        return claimed, stale, refused

    def _result_events(self, res: Result, now: datetime) -> list[tuple[str, NewEvent]]:
        """The events recording one result: the job's outcome, and a suppression for a bad mailbox."""
        if res.events is not None:
            return res.events
        j, v = res.job, res.verdict
        if j.email is not None:
            res.reply = without_address(res.reply, j.email)  # the job names the person; its reply need not
        extra = []
        ev: JobCompleted | JobFailed | JobRetryScheduled
        if v.outcome is Outcome.DELIVERED:
            code = res.code if res.code is not None else 250
            ev = JobCompleted(job_id=j.job_id, attempt=j.attempt, code=code, reply=res.reply, size=res.size)
        elif v.outcome is Outcome.RETRY:
            delay = self.schedule.delay(j.attempt, v.retry_after_s)
            if delay is None:
                ev = JobFailed(
                    job_id=j.job_id, attempt=j.attempt, code=res.code, reply=res.reply, kind="retries_exhausted"
                )
            else:
                due = (now + timedelta(seconds=delay)).isoformat()
                ev = JobRetryScheduled(job_id=j.job_id, attempt=j.attempt, code=res.code, reply=res.reply, due_at=due)
        else:
            kind = res.kind or v.kind.value or "permanent"
            ev = JobFailed(job_id=j.job_id, attempt=j.attempt, code=res.code, reply=res.reply, kind=kind)
            if v.suppress and j.email is not None and j.subject_key is not None:
                sealed = personal.seal(j.subject_key, str(j.tenant), j.subject, {"email": j.email})
                extra = [
                    (
                        streams.suppression(j.subject),
                        SuppressionAdded(
                            subject=j.subject, sealed=sealed, reason="bounce", detail=res.reply[:200]
                        ).to_new(j.metadata),
                    ),
                    (
                        streams.contact(j.subject),
                        ContactStatusChanged(subject=j.subject, status="bounced", reason=res.reply[:200]).to_new(
                            j.metadata
                        ),
                    ),
                ]
        res.events = [(streams.job(j.job_id), ev.to_new(j.metadata)), *extra]
        return res.events

    def _finish(self, results: list[Result]) -> None:
        now = datetime.now(UTC)
        planned = [self._result_events(res, now) for res in results]
        with inline.writing(self.store) as w:
            conn = w.conn
            ids = [res.job.job_id for res in results]
            mine = {
                str(j): attempts
                for j, state, worker, attempts in conn.execute(q.STILL_MINE, (ids,)).fetchall()
                if state == "active" and worker == self.name
            }
            keep = [i for i, res in enumerate(results) if mine.get(res.job.job_id) == res.job.attempt]
            if len(keep) < len(results):
                dropped = [i for i in range(len(results)) if i not in set(keep)]
                recorded = {
                    str(eid) for (eid,) in conn.execute(q.EVENTS_RECORDED, ([planned[i][0][1].id for i in dropped],))
                }
                lost = [results[i].job.job_id for i in dropped if str(planned[i][0][1].id) not in recorded]
                if lost:
                    self.log.warning(
                        "worker.lease_lost",
                        jobs=lost,
                        detail="these jobs were handed to another worker while this one was sending",
                    )
            if keep:
                w.record([item for i in keep for item in planned[i]])

    # -- sending ------------------------------------------------------------------------------

    @staticmethod
    def _fresh(cache: dict, key: tuple[str | None, str]) -> Any:
        """A cache hit that needs no database (checked on the event loop, without a thread hop)."""
        hit = cache.get(key)
        return hit[1] if hit is not None and time.monotonic() - hit[0] <= 30 else None

    def _load_sender(self, conn: Any, name: str, *, tenant: str | None) -> Sender:
        return load_sender(conn, name, tenant=tenant, vault=self.vault)

    def _cached(self, cache: dict, key: tuple[str | None, str], load) -> Any:
        hit = cache.get(key)
        if hit is None or time.monotonic() - hit[0] > 30:
            tenant, name = key
            with self.store.pool.connection() as conn:
                hit = cache[key] = (time.monotonic(), load(conn, name, tenant=tenant))
        return hit[1]

    async def _load(self, cache: dict, key: tuple[str | None, str], load) -> Any:
        """A sender or template, waiting for PostgreSQL if it is away (a stale copy will do meanwhile)."""
        hit = self._fresh(cache, key)
        if hit is not None:
            return hit
        backoff = Backoff()
        while True:
            try:
                return await asyncio.to_thread(self._cached, cache, key, load)
            except POSTGRES_OUTAGE as exc:
                self.health.lost("postgres", exc)
                if key in cache:
                    return cache[key][1]
                if self._stopping:
                    raise _Unavailable(f"PostgreSQL unavailable while loading {key[1]!r}: {exc}") from exc
                await asyncio.sleep(backoff.next())

    async def _send(self, job: Claimed) -> None:
        """Send one job and queue its result; a job never stays unrecorded, whatever goes wrong."""
        try:
            if job.kind != "send":
                await self._run_duty(job)
            else:
                await self._deliver(job)
        except _Unavailable as exc:
            self.results.append(Result(job, transient(str(exc)), None, str(exc)[:1000]))
        except Exception as exc:
            self.log.exception("worker.send_crashed", job=job.job_id)
            self.results.append(
                Result(job, transient(f"internal error: {exc!r}"), None, f"internal error: {exc!r}"[:1000])
            )

    async def _run_duty(self, job: Claimed) -> None:
        """A duty runs in a thread; what it did is its JobCompleted's reply (code 0). One that
        raises is retried on the retry schedule, like a deferred message."""
        run = self.duties.get(job.kind)
        if run is None:
            why = f"this worker runs no duty of kind {job.kind!r}"
            self.results.append(
                Result(job, Verdict(Outcome.FAILED, FailureKind.PERMANENT, False), None, why, "unknown_duty")
            )
            return
        try:
            summary = await asyncio.to_thread(run, job.args)
        except Exception as exc:  # noqa: BLE001 - the duty is retried; the worker goes on
            self.log.warning("worker.duty_failed", job=job.job_id, duty=job.kind, error=str(exc)[:300])
            self.results.append(Result(job, transient(f"{type(exc).__name__}: {exc}"), None, f"{exc}"[:1000]))
            return
        self.results.append(Result(job, Verdict(Outcome.DELIVERED, FailureKind.NONE, False), 0, summary[:1000]))

    async def _deliver(self, job: Claimed) -> None:
        code: int | None = None
        to = job.email
        assert to is not None, "a job without its recipient is refused before it is sent"
        try:
            sender = await self._load(self.senders, (job.tenant, job.sender), self._load_sender)
            tpl = await self._load(self.templates, (job.tenant, job.template), templates.load)
            context = {
                **job.attributes,
                "email": to,
                **consent.links(
                    self.secret,
                    to=to,
                    tenant=job.tenant or DEFAULT_TENANT,
                    campaign_id=job.campaign_id,
                    sender_domain=sender.domain,
                    unsubscribe_base_url=self.settings.unsubscribe_base_url,
                    preferences_base_url=self.settings.preferences_base_url,
                ),
                **job.variables,
            }
            rendered = templates.render(tpl, context)
            if job.tracking and self.tracking_base is not None:
                rendered = self._tracked(job, rendered, keep=[context[v] for v in consent.LINK_VARIABLES])
            out = mime.build(
                job_id=job.job_id,
                sender=sender,
                to=to,
                rendered=rendered,
                secret=self.secret,
                campaign_id=job.campaign_id,
                unsubscribe_base_url=self.settings.unsubscribe_base_url,
            )
        except _Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken template or sender fails this job only
            failed = Verdict(Outcome.FAILED, FailureKind.MESSAGE, False)
            self.results.append(Result(job, failed, None, f"cannot build the message: {exc}", "message"))
            return
        try:
            targets = await self._targets(sender.relay, to)
        except mx.NoRoute as exc:
            self.results.append(
                Result(job, Verdict(Outcome.FAILED, FailureKind.PERMANENT, False), None, str(exc), "no_route")
            )
            return
        except mx.LookupFailed as exc:
            self.results.append(Result(job, transient(str(exc)), None, str(exc)))
            return
        client = pool = None
        errors = []
        for target in targets:  # MX hosts in preference order; a relay is a list of one
            pool = self._pool(target)
            try:
                client = await pool.acquire(urgent=job.priority is Priority.HIGH)
                break
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                errors.append(f"connecting to {target.host}:{target.port}: {exc}")
        if client is None or pool is None:
            why = "; ".join(errors)
            self.results.append(Result(job, transient(why), None, f"connect failed: {why}"[:1000]))
            return
        healthy = False
        try:
            reply = await smtp.transact(client, out.mail_from, out.rcpt_to, out.data)
            code, text, healthy = reply.code, reply.message, True
            verdict = classify(code, text)
        except aiosmtplib.SMTPNotSupported as exc:  # a non-ASCII address and a server without SMTPUTF8
            code, text, healthy = None, str(exc), True
            verdict = Verdict(Outcome.FAILED, FailureKind.PERMANENT, False)
        except aiosmtplib.SMTPResponseException as exc:  # refused; the envelope was reset if the session lives
            code, text, healthy = exc.code, exc.message, client.is_connected
            verdict = classify(code, text)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            text = f"{type(exc).__name__}: {exc}"
            verdict = transient(text)
        finally:
            await pool.release(client, healthy)
        if verdict.outcome is Outcome.DELIVERED:
            self.sent += 1
        self.results.append(Result(job, verdict, code, " ".join(str(text).split())[:1000], size=len(out.data)))

    def _tracked(self, job: Claimed, rendered: templates.Rendered, keep: list[str]) -> templates.Rendered:
        """The message with its links rewritten and the open pixel added (mail/tracking.py); the
        unsubscribe and preferences links (`keep`) stay direct."""
        assert self.tracking_base is not None
        base, key, tenant = self.tracking_base, self.secret, job.tenant or DEFAULT_TENANT
        job_id, sent_at = uuid.UUID(job.job_id), int(time.time())

        def click(index: int, url: str, links: int) -> str:
            return tracking.click_url(base, key, tenant, job_id, sent_at=sent_at, links=links, link=index, url=url)

        pixel = tracking.open_url(base, key, tenant, job_id, sent_at=sent_at)
        out = tracking.rewrite_message(rendered.html, rendered.text, click, pixel, keep=[k for k in keep if k])
        return templates.Rendered(rendered.subject, out.html, out.text)

    async def _targets(self, relay: SmtpRelay, email: str) -> list[SmtpRelay]:
        if not relay.direct:
            return [relay]
        hosts = await self.mx.hosts(email.rpartition("@")[2])
        # Hosts from DNS take the relay's port (25 unless direct://?port=N); overrides name their own.
        return [relay.at(host, port or relay.port) for host, port in hosts]

    def _pool(self, target: SmtpRelay) -> RelayPool:
        pool = self.pools.get(target.key)
        if pool is None:
            size = (
                self.settings.worker_connections_per_mx if target.direct else self.settings.worker_connections_per_relay
            )
            pool = self.pools[target.key] = RelayPool(
                target, size, self.settings.ehlo_hostname, self.settings.worker_idle_close_s
            )
        return pool

    # -- finishing ----------------------------------------------------------------------------

    async def _flush_loop(self, r: aredis.Redis, stop: asyncio.Event) -> None:
        """Record finished sends, acknowledge their entries, renew leases - each retried on its own.

        Ends once stopping with nothing in flight and everything recorded, or when
        MAILFLOW_WORKER_STOP_TIMEOUT_S has passed since the last send finished.
        """
        renew_every = max(self.settings.job_lease_s / 3, 0.05)
        renewed = pruned = time.monotonic()
        renew_now = False
        backoff = Backoff()
        delay = self.settings.worker_flush_interval_s
        idle_since: float | None = None
        while True:
            if stop.is_set() and not self.in_flight:
                idle_since = idle_since or time.monotonic()
                if not self.results:
                    break
                if time.monotonic() - idle_since > self.settings.worker_stop_timeout_s:
                    self.log.error(
                        "worker.results_unrecorded",
                        count=len(self.results),
                        detail="PostgreSQL did not answer before the stop timeout",
                    )
                    break
            await asyncio.sleep(delay)
            delay = self.settings.worker_flush_interval_s
            failed = False
            try:
                await self._record()
                if renew_now or time.monotonic() - renewed > renew_every:
                    await asyncio.to_thread(self._renew_leases)
                    renewed, renew_now = time.monotonic(), False
            except Exception as exc:
                if not await self._outage(exc):
                    raise
                failed = renew_now = True  # renew the moment the database is back
            try:
                await self._ack_done(r)
            except Exception as exc:
                if not await self._outage(exc):
                    raise
                failed = True
            if failed:
                delay = backoff.next()
            else:
                backoff.reset()
            self.health.set(in_flight=len(self.in_flight), unrecorded=len(self.results))
            if time.monotonic() - pruned > 5.0:
                for key, pool in list(self.pools.items()):
                    await pool.prune()
                    if pool.relay.direct and pool.open == 0:
                        del self.pools[key]  # an MX host not used lately
                pruned = time.monotonic()
        try:  # a last try at the acknowledgements; entries left pending are picked up by this name's next run
            await asyncio.wait_for(self._ack_done(r), 2)
        except Exception:  # noqa: BLE001
            pass

    def _renew_leases(self) -> None:
        """Keep the lease of every job this worker is still sending (a slow relay is not a dead worker)."""
        ids = list(self.sending)
        if not ids:
            return
        until = datetime.now(UTC) + timedelta(seconds=self.settings.job_lease_s)
        with self.store.pool.connection() as conn:
            conn.execute(q.RENEW_LEASES, (until, ids, self.name))
        self.health.ok("postgres")

    async def _record(self) -> None:
        """Write the finished sends; if PostgreSQL fails, they stay queued in memory for the next try."""
        if not self.results:
            return
        batch, self.results = self.results, []
        try:
            await asyncio.to_thread(self._finish, batch)
        except BaseException:
            self.results[:0] = batch
            raise
        self.health.ok("postgres")
        self.batches["finishes"] += 1
        self.batches["finished"] += len(batch)
        for res in batch:
            self.sending.discard(res.job.job_id)
            key = (res.job.priority, res.job.entry_id)
            self.held.discard(key)
            self._unacked.setdefault(key[0], []).append(key[1])

    async def _ack_done(self, r: aredis.Redis) -> None:
        """XACK + XDEL the entries of recorded (or stale) jobs; kept for the next try if Redis fails."""
        if not self._unacked:
            return
        todo, self._unacked = self._unacked, {}
        pipe = r.pipeline(transaction=False)
        for p, ids in todo.items():
            groups.queue_ack(pipe, self.keys.jobs(p), GROUP, ids, delete=True)
        try:
            await pipe.execute()
        except BaseException:
            for p, ids in todo.items():
                self._unacked.setdefault(p, [])[:0] = ids
            raise
        self.health.ok("redis")


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
