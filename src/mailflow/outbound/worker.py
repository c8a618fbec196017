"""Outbound room: SMTP workers - take jobs from the priority streams and send them.

asyncio with aiosmtplib. High before normal before low, always: a few slots are kept for
high-priority work, and every few reads low goes before normal so it is never starved.
Jobs are started in batches (JobStarted with a lease, in one transaction), sent over SMTP
sessions that are reused for many messages, and finished in batches (JobCompleted,
JobFailed or JobRetryScheduled, with the remote reply) before their stream entries are
acknowledged. A worker killed mid-send leaves active jobs whose lease expires; the queuer
then retries them, so at most the messages in flight at the kill can go out twice.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import aiosmtplib
import redis
import redis.asyncio as aredis

from ..config import Settings
from ..events.keys import Keys
from ..events.store import EventStore
from ..log import get_logger
from ..projectors import catalog, inline
from ..projectors import jobs as jobs_projection
from . import mime, mx, queries as q, smtp, templates
from .contacts import STOPPED_STATUSES
from .events import ContactStatusChanged, JobCompleted, JobFailed, JobRetryScheduled, JobStarted, SuppressionAdded
from .jobs import Priority
from .replies import FailureKind, Outcome, RetrySchedule, Verdict, classify, transient
from .sending import load_sender
from .senders import Sender, SmtpRelay, smtp_client

GROUP = "workers"
LOW_EVERY = 8  # every 8th read offers low before normal
BATCH_GATHER_S = 0.01  # a busy worker waits this long at most for more free slots before starting jobs
log = get_logger("mailflow.worker")


@dataclass
class Claimed:
    priority: Priority
    entry_id: bytes
    job_id: str
    attempt: int
    email: str
    sender: str
    template: str
    variables: dict[str, Any]
    campaign_id: str | None
    attributes: dict[str, Any]


@dataclass
class Result:
    job: Claimed
    verdict: Verdict
    code: int | None
    reply: str
    kind: str | None = None  # overrides the verdict's failure kind (suppressed, message)


class RelayPool:
    """Open SMTP sessions to one relay (or one MX host), reused across messages, one at a time each.

    A session idle for `idle_close_s` is closed rather than reused: servers hang up on idle
    clients (RFC 5321 asks them to wait at least 5 minutes), and a message sent into a
    session the server has dropped would wait for a retry.
    """

    def __init__(self, relay: SmtpRelay, size: int, local_hostname: str | None = None, idle_close_s: float = 60.0) -> None:
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


class Worker:
    def __init__(self, store: EventStore, redis_url: str, settings: Settings, secret: bytes, *, name: str | None = None) -> None:
        self.store = store
        self.redis_url = redis_url
        self.settings = settings
        self.secret = secret
        self.keys = Keys(settings.redis_prefix)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.schedule = RetrySchedule(settings.retry_base_s, settings.retry_factor, settings.retry_max_attempts)
        self.pools: dict[tuple, RelayPool] = {}
        self.mx = mx.MxResolver(settings.mx_overrides, nameservers=settings.dns_servers)
        self.senders: dict[str, tuple[float, Sender]] = {}
        self.templates: dict[str, tuple[float, templates.Template]] = {}
        self.results: list[Result] = []
        self.in_flight: set[asyncio.Task] = set()
        self._slot_freed = asyncio.Event()
        self.sending: set[str] = set()  # job ids started here and not yet recorded
        self.sent = 0
        self.batches = {"starts": 0, "started": 0, "finishes": 0, "finished": 0}  # transactions and jobs
        self._reads = 0
        self.log = log.bind(worker=self.name)

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        r = aredis.from_url(self.redis_url, socket_timeout=30)
        try:
            for p in Priority:
                try:
                    await r.xgroup_create(self.keys.jobs(p), GROUP, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
            flusher = asyncio.create_task(self._flush_loop(r, stop))
            self.log.info("worker.start", concurrency=self.settings.worker_concurrency)
            last_claim = 0.0
            # Jobs are started in batches: one transaction for a few slots is most of the cost
            # of starting them, so a busy worker waits briefly for a quarter of its slots.
            min_batch = max(1, self.settings.worker_concurrency // 4)
            gathering_since: float | None = None
            while not stop.is_set():
                if time.monotonic() - last_claim > 5.0:
                    await self._claim_orphans(r)
                    last_claim = time.monotonic()
                free = self.settings.worker_concurrency - len(self.in_flight)
                if free < min_batch and self.in_flight:
                    now = time.monotonic()
                    gathering_since = gathering_since or now
                    wait = (0.1 if free <= 0 else BATCH_GATHER_S) - (now - gathering_since)
                    if wait > 0:
                        self._slot_freed.clear()
                        try:
                            await asyncio.wait_for(self._slot_freed.wait(), wait)
                        except asyncio.TimeoutError:
                            pass
                        continue
                    if free <= 0:
                        gathering_since = None
                        continue
                gathering_since = None
                try:
                    entries = await self._read(r, free)
                except redis.ResponseError as exc:
                    if "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc):
                        for p in Priority:
                            try:
                                await r.xgroup_create(self.keys.jobs(p), GROUP, id="0", mkstream=True)
                            except redis.ResponseError:
                                pass
                        continue
                    raise
                if entries:
                    await self._start(r, entries)
            if self.in_flight:  # SIGTERM: finish what was started
                await asyncio.wait(self.in_flight)
            await flusher
            await self._flush(r)
        finally:
            for pool in self.pools.values():
                await pool.close()
            await r.aclose()
            self.log.info("worker.stopped", sent=self.sent, **self.batches)

    async def _read(self, r: aredis.Redis, free: int) -> list[tuple[Priority, bytes, dict[bytes, bytes]]]:
        reserve = max(1, self.settings.worker_concurrency // 10)
        self._reads += 1
        order = [Priority.HIGH, Priority.NORMAL, Priority.LOW]
        if self._reads % LOW_EVERY == 0:
            order = [Priority.HIGH, Priority.LOW, Priority.NORMAL]
        for p in order:
            count = free if p is Priority.HIGH else free - reserve
            if count <= 0:
                continue
            res = await r.xreadgroup(GROUP, self.name, {self.keys.jobs(p): ">"}, count=count)
            if res:
                return [(p, eid, f) for _, entries in res for eid, f in entries]
        # Nothing ready anywhere: wait briefly for whichever stream gets work first.
        res = await r.xreadgroup(
            GROUP, self.name, {self.keys.jobs(p): ">" for p in Priority}, count=1, block=100
        )
        out = []
        for key, entries in res or []:
            p = Priority(key.decode().rsplit(":", 1)[1] if isinstance(key, bytes) else key.rsplit(":", 1)[1])
            out.extend((p, eid, f) for eid, f in entries)
        return out

    async def _claim_orphans(self, r: aredis.Redis) -> None:
        """Entries another worker read but never finished (it died before starting them).

        A job it had started is retried by the queuer when its lease expires, under a new
        entry; the old entry is then stale and only acknowledged here.
        """
        idle_ms = int(self.settings.job_lease_s * 1000)
        for p in Priority:
            cursor: bytes | str = "0-0"
            while True:
                try:
                    res = await r.xautoclaim(self.keys.jobs(p), GROUP, self.name, idle_ms, cursor, count=100)
                except redis.ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        break
                    raise
                cursor, claimed = res[0], res[1]
                live = [(p, eid, f) for eid, f in claimed if f]
                gone = [eid for eid, f in claimed if not f]
                if gone:
                    await self._ack(r, p, gone)
                if live:
                    self.log.info("worker.reclaimed", priority=str(p), count=len(live))
                    await self._start(r, live)
                if cursor in (b"0-0", "0-0"):
                    break

    async def _start(self, r: aredis.Redis, entries: list[tuple[Priority, bytes, dict[bytes, bytes]]]) -> None:
        claimed, stale, refused = await asyncio.to_thread(self._claim, entries)
        self.batches["starts"] += 1
        self.batches["started"] += len(entries)
        for p, eid in stale:
            await self._ack(r, p, [eid])
        for res in refused:
            self.results.append(res)
        for job in claimed:
            self.sending.add(job.job_id)
            task = asyncio.create_task(self._send(job))
            self.in_flight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.in_flight.discard(task)
        self._slot_freed.set()

    # -- database work (in a thread) ----------------------------------------------------------

    def _claim(self, entries):
        wanted = {}
        for p, eid, fields in entries:
            wanted[fields[b"job_id"].decode()] = (p, eid, int(fields[b"queue_seq"]))
        lease = (datetime.now(timezone.utc) + timedelta(seconds=self.settings.job_lease_s)).isoformat()
        claimed, stale, refused, events = [], [], [], []
        with inline.writing(self.store) as conn:
            rows = conn.execute(q.CLAIM_JOBS, (list(wanted),)).fetchall()
            found = {str(r[0]): r for r in rows}
            for job_id, (p, eid, seq) in wanted.items():
                row = found.get(job_id)
                if row is None or row[1] != "queued" or row[2] != seq:
                    stale.append((p, eid))  # already handled, or queued again under a newer entry
                    continue
                (_, _, _, attempts, email, sender, template, variables, campaign_id, suppressed, status, attrs) = row
                job = Claimed(p, eid, job_id, attempts + 1, email, sender, template, variables or {},
                              str(campaign_id) if campaign_id else None, attrs or {})
                events.append(JobStarted(job_id=job_id, attempt=job.attempt, worker=self.name, lease_until=lease).to_new())
                if suppressed or status in STOPPED_STATUSES:
                    why = f"suppressed ({suppressed})" if suppressed else f"contact is {status}"
                    refused.append(Result(job, Verdict(Outcome.FAILED, FailureKind.PERMANENT, False), None, why, "suppressed"))
                    continue
                claimed.append(job)
            if events:
                envs = self.store.append_many([(f"job-{e.data['job_id']}", e) for e in events], conn=conn)
                jobs_projection.apply(conn, envs)
        if events:
            self.store.notify()
        return claimed, stale, refused

    def _finish(self, results: list[Result]) -> None:
        now = datetime.now(timezone.utc)
        job_events: list = []
        catalog_events_by_result: dict[int, list] = {}
        for i, res in enumerate(results):
            j, v = res.job, res.verdict
            if v.outcome is Outcome.DELIVERED:
                ev = JobCompleted(job_id=j.job_id, attempt=j.attempt, code=res.code or 250, reply=res.reply)
            elif v.outcome is Outcome.RETRY:
                delay = self.schedule.delay(j.attempt, v.retry_after_s)
                if delay is None:
                    ev = JobFailed(job_id=j.job_id, attempt=j.attempt, code=res.code, reply=res.reply, kind="retries_exhausted")
                else:
                    due = (now + timedelta(seconds=delay)).isoformat()
                    ev = JobRetryScheduled(job_id=j.job_id, attempt=j.attempt, code=res.code, reply=res.reply, due_at=due)
            else:
                kind = res.kind or v.kind.value or "permanent"
                ev = JobFailed(job_id=j.job_id, attempt=j.attempt, code=res.code, reply=res.reply, kind=kind)
                if v.suppress:
                    catalog_events_by_result[i] = [
                        (f"suppression-{j.email}", SuppressionAdded(email=j.email, reason="bounce", detail=res.reply[:200]).to_new()),
                        (f"contact-{j.email}", ContactStatusChanged(email=j.email, status="bounced", reason=res.reply[:200]).to_new()),
                    ]
            job_events.append((f"job-{j.job_id}", ev.to_new()))
        with inline.writing(self.store) as conn:
            ids = [res.job.job_id for res in results]
            mine = {
                str(j): attempts
                for j, state, worker, attempts in conn.execute(q.STILL_MINE, (ids,)).fetchall()
                if state == "active" and worker == self.name
            }
            keep = [i for i, res in enumerate(results) if mine.get(res.job.job_id) == res.job.attempt]
            if len(keep) < len(results):
                lost = [res.job.job_id for i, res in enumerate(results) if i not in set(keep)]
                self.log.warning("worker.lease_lost", jobs=lost,
                                 detail="these jobs were handed to another worker while this one was sending")
            job_events = [job_events[i] for i in keep]
            catalog_events = [ce for i in keep for ce in catalog_events_by_result.get(i, [])]
            if job_events:
                envs = self.store.append_many(job_events + catalog_events, conn=conn)
                jobs_projection.apply(conn, envs[: len(job_events)])
                if catalog_events:
                    catalog.apply(conn, envs[len(job_events):])
        self.store.notify()

    # -- sending ------------------------------------------------------------------------------

    @staticmethod
    def _fresh(cache: dict, name: str) -> Any:
        """A cache hit that needs no database (checked on the event loop, without a thread hop)."""
        hit = cache.get(name)
        return hit[1] if hit is not None and time.monotonic() - hit[0] <= 30 else None

    def _cached(self, cache: dict, name: str, load) -> Any:
        hit = cache.get(name)
        if hit is None or time.monotonic() - hit[0] > 30:
            with self.store.pool.connection() as conn:
                hit = cache[name] = (time.monotonic(), load(conn, name))
        return hit[1]

    async def _send(self, job: Claimed) -> None:
        """Send one job and queue its result; a job never stays unrecorded, whatever goes wrong."""
        try:
            await self._deliver(job)
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the job active (and its lease renewed) forever
            self.log.exception("worker.send_crashed", job=job.job_id)
            self.results.append(Result(job, transient(f"internal error: {exc!r}"), None, f"internal error: {exc!r}"[:1000]))

    async def _deliver(self, job: Claimed) -> None:
        code: int | None = None
        try:
            sender = self._fresh(self.senders, job.sender) or await asyncio.to_thread(
                self._cached, self.senders, job.sender, load_sender
            )
            tpl = self._fresh(self.templates, job.template) or await asyncio.to_thread(
                self._cached, self.templates, job.template, templates.load
            )
            rendered = templates.render(tpl, {**job.attributes, "email": job.email, **job.variables})
            out = mime.build(
                job_id=job.job_id, sender=sender, to=job.email, rendered=rendered, secret=self.secret,
                campaign_id=job.campaign_id, unsubscribe_base_url=self.settings.unsubscribe_base_url,
            )
        except Exception as exc:  # noqa: BLE001 - a broken template or sender fails this job only
            failed = Verdict(Outcome.FAILED, FailureKind.MESSAGE, False)
            self.results.append(Result(job, failed, None, f"cannot build the message: {exc}", "message"))
            return
        try:
            targets = await self._targets(sender.relay, job.email)
        except mx.NoRoute as exc:
            self.results.append(Result(job, Verdict(Outcome.FAILED, FailureKind.PERMANENT, False), None, str(exc), "no_route"))
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
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
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
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            text = f"{type(exc).__name__}: {exc}"
            verdict = transient(text)
        finally:
            await pool.release(client, healthy)
        if verdict.outcome is Outcome.DELIVERED:
            self.sent += 1
        self.results.append(Result(job, verdict, code, " ".join(str(text).split())[:1000]))

    async def _targets(self, relay: SmtpRelay, email: str) -> list[SmtpRelay]:
        if not relay.direct:
            return [relay]
        hosts = await self.mx.hosts(email.rpartition("@")[2])
        # Hosts from DNS take the relay's port (25 unless direct://?port=N); overrides name their own.
        return [relay.at(host, port or relay.port) for host, port in hosts]

    def _pool(self, target: SmtpRelay) -> RelayPool:
        pool = self.pools.get(target.key)
        if pool is None:
            size = self.settings.worker_connections_per_mx if target.direct else self.settings.worker_connections_per_relay
            pool = self.pools[target.key] = RelayPool(
                target, size, self.settings.ehlo_hostname, self.settings.worker_idle_close_s
            )
        return pool

    # -- finishing ----------------------------------------------------------------------------

    async def _flush_loop(self, r: aredis.Redis, stop: asyncio.Event) -> None:
        renew_every = max(self.settings.job_lease_s / 3, 0.05)
        renewed = pruned = time.monotonic()
        while not stop.is_set() or self.in_flight:
            await asyncio.sleep(self.settings.worker_flush_interval_s)
            await self._flush(r)
            if time.monotonic() - renewed > renew_every:
                await asyncio.to_thread(self._renew_leases)
                renewed = time.monotonic()
            if time.monotonic() - pruned > 5.0:
                for key, pool in list(self.pools.items()):
                    await pool.prune()
                    if pool.relay.direct and pool.open == 0:
                        del self.pools[key]  # an MX host not used lately
                pruned = time.monotonic()

    def _renew_leases(self) -> None:
        """Keep the lease of every job this worker is still sending (a slow relay is not a dead worker)."""
        ids = list(self.sending)
        if not ids:
            return
        until = datetime.now(timezone.utc) + timedelta(seconds=self.settings.job_lease_s)
        with self.store.pool.connection() as conn:
            conn.execute(q.RENEW_LEASES, (until, ids, self.name))

    async def _flush(self, r: aredis.Redis) -> None:
        if not self.results:
            return
        batch, self.results = self.results, []
        await asyncio.to_thread(self._finish, batch)
        self.batches["finishes"] += 1
        self.batches["finished"] += len(batch)
        self.sending.difference_update(res.job.job_id for res in batch)
        by_priority: dict[Priority, list[bytes]] = {}
        for res in batch:
            by_priority.setdefault(res.job.priority, []).append(res.job.entry_id)
        for p, ids in by_priority.items():
            await self._ack(r, p, ids)

    async def _ack(self, r: aredis.Redis, p: Priority, ids: list[bytes]) -> None:
        key = self.keys.jobs(p)
        pipe = r.pipeline(transaction=False)
        pipe.xack(key, GROUP, *ids)
        pipe.xdel(key, *ids)
        await pipe.execute()
