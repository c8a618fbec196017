"""Outbound room: the read side - jobs, campaigns and queues as typed views, for the CLI (and
the API) to format.

Each view reads its rows by column name into a frozen dataclass; `to_dict()` is its JSON form
(ids and times as strings), the one the CLI's --json prints. Ids can be given as a unique
prefix, as git takes commits: `short_ids()` picks the prefix length a listing shows and
`find_job()` / `campaigns.find()` take it back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import redis
from psycopg.rows import class_row, dict_row

from mailflow.errors import NotFoundError, UserError
from mailflow.events.envelope import Envelope
from mailflow.events.keys import Keys
from mailflow.events.store import EventStore
from mailflow.outbound import campaigns, feedback, streams
from mailflow.outbound import queries as q
from mailflow.outbound.jobs import SLA_SECONDS, TERMINAL, JobState, Priority

SHORT_ID_MIN = 8
"""Listings show ids this long at least (more when needed to tell the listed ones apart)."""
PREFIX_MIN = 4
"""The shortest id prefix a command accepts (as campaigns.find)."""


def _jsonable(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


class _View:
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


# -- ids ---------------------------------------------------------------------------------------


def short_ids(ids: Iterable[str]) -> dict[str, str]:
    """Each id's shortest prefix, one length for all, of at least SHORT_ID_MIN characters, that
    tells these ids apart (a prefix never ends on a dash)."""
    ids = list(dict.fromkeys(ids))
    longest = max((len(i) for i in ids), default=0)

    def usable(length: int) -> bool:
        prefixes = {i[:length] for i in ids}
        return len(prefixes) == len(ids) and not any(p.endswith("-") for p in prefixes)

    length = SHORT_ID_MIN
    while length < longest and not usable(length):
        length += 1
    return {i: i[:length] for i in ids}


def id_range(prefix: str) -> tuple[uuid.UUID, uuid.UUID]:
    """The lowest and highest uuid that start with `prefix` (hex digits, dashes optional)."""
    digits = prefix.replace("-", "").lower()
    if not 0 < len(digits) <= 32 or any(c not in "0123456789abcdef" for c in digits):
        raise UserError(f"{prefix!r} is not a job id or the start of one")
    return uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))


def find_job(conn: psycopg.Connection, ref: str) -> uuid.UUID:
    """A job id from its id or a unique prefix of it (at least PREFIX_MIN hex digits)."""
    low, high = id_range(ref.strip())
    if len(ref.replace("-", "")) < PREFIX_MIN:
        raise UserError(f"{ref!r} is too short to name a job; give at least {PREFIX_MIN} characters of its id")
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.JOBS_IN_ID_RANGE, {"low": low, "high": high}).fetchall()
    if len(rows) > 1:
        raise UserError(f"{ref!r} is the start of more than one job id; give more of it")
    if not rows:
        raise NotFoundError(f"no job {ref!r} (see `mailflow jobs list`)")
    return rows[0]["id"]


# -- jobs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSummary(_View):
    id: uuid.UUID
    priority: str
    state: str
    email: str | None  # None: the recipient was erased
    campaign_id: uuid.UUID | None
    attempts: int
    last_code: int | None
    failure_kind: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class Job(_View):
    id: uuid.UUID
    idempotency_key: str
    priority: str
    state: str
    email: str | None  # None: the recipient was erased
    sender: str
    template: str
    campaign_id: uuid.UUID | None
    attempts: int
    due_at: datetime
    queue_seq: int | None
    lease_until: datetime | None
    worker: str | None
    last_code: int | None
    last_reply: str | None
    failure_kind: str | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    accepted_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return JobState(self.state) in TERMINAL


@dataclass(frozen=True)
class JobWithHistory:
    job: Job
    history: list[Envelope]

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job.to_dict(), "history": [e.to_dict() for e in self.history]}


def list_jobs(
    conn: psycopg.Connection,
    *,
    state: JobState | None = None,
    priority: Priority | None = None,
    campaign_id: str | None = None,
    limit: int = 50,
) -> list[JobSummary]:
    """Jobs, newest first."""
    params = {
        "state": state and str(state),
        "priority": priority and str(priority),
        "campaign": campaign_id,
        "limit": limit,
    }
    with conn.cursor(row_factory=class_row(JobSummary)) as cur:
        return cur.execute(q.JOB_SUMMARIES, params).fetchall()


def get_job(conn: psycopg.Connection, job_id: uuid.UUID | str) -> Job:
    with conn.cursor(row_factory=class_row(Job)) as cur:
        job = cur.execute(q.GET_JOB, (job_id,)).fetchone()
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return job


def job_with_history(conn: psycopg.Connection, store: EventStore, ref: str) -> JobWithHistory:
    """A job (by id or unique id prefix) and every event of its stream, oldest first."""
    job = get_job(conn, find_job(conn, ref))
    return JobWithHistory(job, store.read_stream(streams.job(job.id)))


def wait_for_outcome(conn: psycopg.Connection, job_id: uuid.UUID | str, timeout: float, poll_s: float = 0.1) -> Job:
    """The job once it has finished (completed or failed), or as it is when `timeout` seconds
    have passed; with timeout 0, as it is now."""
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(conn, job_id)
        if job.finished or time.monotonic() >= deadline:
            return job
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


# -- campaigns ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignSummary(_View):
    id: uuid.UUID
    name: str
    status: str
    recipients: int
    sender: str
    template: str
    segment: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class FailureGroup:
    kind: str
    count: int
    example: str | None


@dataclass(frozen=True)
class CampaignReport:
    """Who did not get it, and why: jobs by state, retries, failures grouped by kind."""

    id: str
    name: str
    sender: str
    template: str
    segment: str
    status: str
    jobs: dict[str, int]
    total: int
    retries: int
    failures: list[FailureGroup]
    # What came back (outbound/feedback.py), people per kind: delivered (jobs accepted),
    # bounced_hard, bounced_soft, delayed, complained, replied, auto_replied, unsubscribed.
    came_back: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_campaigns(conn: psycopg.Connection, limit: int = 50) -> list[CampaignSummary]:
    """Campaigns, newest first."""
    with conn.cursor(row_factory=class_row(CampaignSummary)) as cur:
        return cur.execute(q.LIST_CAMPAIGNS, (limit,)).fetchall()


def campaign_report(conn: psycopg.Connection, ref: str) -> CampaignReport:
    """The report of a campaign given by name, id or unique id prefix."""
    cid = campaigns.find(conn, ref)
    st = campaigns.status(conn, cid)
    st["came_back"] = {"delivered": st["jobs"].get("completed", 0), **feedback.campaign_counts(conn, cid)}
    return CampaignReport(**{**st, "failures": [FailureGroup(**f) for f in st["failures"]]})


# -- queues ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueStats(_View):
    """One priority's queue: stream depth, jobs by state, waiting time and latency vs its SLA."""

    priority: str
    stream_depth: int
    pending: int
    retry: int
    queued: int
    active: int
    completed: int
    failed: int
    oldest_unfinished_s: float | None
    oldest_waiting_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    sla_s: float
    within_sla: bool | None


def sla_verdict(sla_s: float, p99_s: float | None, oldest_waiting_s: float | None) -> bool | None:
    """Met when the last hour's p99 latency and the oldest waiting job are both within the SLA;
    None (no verdict) when nothing was sent in the last hour and nothing waits."""
    if p99_s is None and oldest_waiting_s is None:
        return None
    return all(v is None or v <= sla_s for v in (p99_s, oldest_waiting_s))


def _seconds(v: Decimal | float | None) -> float | None:
    return None if v is None else round(float(v), 3)


def queue_stats(conn: psycopg.Connection, r: redis.Redis, keys: Keys) -> list[QueueStats]:
    """Per priority, high to low."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = {row["priority"]: row for row in cur.execute(q.QUEUE_LOAD).fetchall()}
    report = []
    for p in Priority:
        row = rows.get(str(p), {})
        counts = {s: int(row.get(s) or 0) for s in ("pending", "retry", "queued", "active", "completed", "failed")}
        p99, waiting = _seconds(row.get("latency_p99_s")), _seconds(row.get("oldest_waiting_s"))
        report.append(
            QueueStats(
                priority=str(p),
                stream_depth=int(r.xlen(keys.jobs(p))),
                **counts,
                oldest_unfinished_s=_seconds(row.get("oldest_unfinished_s")),
                oldest_waiting_s=waiting,
                latency_p50_s=_seconds(row.get("latency_p50_s")),
                latency_p99_s=p99,
                sla_s=SLA_SECONDS[p],
                within_sla=sla_verdict(SLA_SECONDS[p], p99, waiting),
            )
        )
    return report


@dataclass(frozen=True)
class DutyStats(_View):
    """A periodic duty (periodic.py): its schedule, and how its last job went against its SLA."""

    name: str
    kind: str
    priority: str
    every_s: float
    enabled: bool
    next_due: datetime
    last_due: datetime | None
    last_state: str | None
    last_finished_at: datetime | None
    last_reply: str | None
    sla_s: float
    within_sla: bool | None  # the last run ended within the SLA of its due time (None: never ran)


def duty_stats(conn: psycopg.Connection, now: datetime | None = None) -> list[DutyStats]:
    """Every periodic duty (an operator's connection: duties belong to no tenant)."""
    now = now or datetime.now(UTC)
    out = []
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(q.PERIODIC).fetchall():
            sla = SLA_SECONDS[Priority(row["priority"])]
            due, finished = row["last_due"], row["last_finished_at"]
            within = None if due is None else ((finished or now) - due).total_seconds() <= sla
            out.append(
                DutyStats(
                    row["name"],
                    row["kind"],
                    row["priority"],
                    row["every"].total_seconds(),
                    row["enabled"],
                    row["next_due"],
                    due,
                    row["last_state"],
                    finished,
                    row["last_reply"],
                    sla,
                    within,
                )
            )
    return out


# -- the catalogue --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderSummary(_View):
    """A sender as a listing shows it: the relay URL with its password masked."""

    name: str
    from_email: str
    from_name: str
    relay: str
    dkim: bool


def list_senders(conn: psycopg.Connection) -> list[SenderSummary]:
    from mailflow.config import mask_url

    with conn.cursor(row_factory=dict_row) as cur:
        return [
            SenderSummary(r["name"], r["from_email"], r["from_name"], mask_url(r["relay_url"]), bool(r["dkim"]))
            for r in cur.execute(q.LIST_SENDERS).fetchall()
        ]


@dataclass(frozen=True)
class SegmentSummary(_View):
    name: str
    filter: dict[str, Any]
    count: int  # contacts it matches now
    updated_at: datetime


def list_segments(conn: psycopg.Connection) -> list[SegmentSummary]:
    from mailflow.outbound import segments

    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.LIST_SEGMENTS).fetchall()
    return [
        SegmentSummary(r["name"], r["filter"], segments.preview(conn, r["filter"], sample=0).count, r["updated_at"])
        for r in rows
    ]


@dataclass(frozen=True)
class TemplateSummary(_View):
    name: str
    subject: str
    updated_at: datetime


def list_templates(conn: psycopg.Connection) -> list[TemplateSummary]:
    with conn.cursor(row_factory=class_row(TemplateSummary)) as cur:
        return cur.execute(q.LIST_TEMPLATES).fetchall()


@dataclass(frozen=True)
class Probe(_View):
    """What a sender's relay (or, for direct delivery, a domain's MX host) answered to EHLO."""

    sender: str
    host: str
    port: int
    tls: str
    direct: bool
    ehlo_code: int
    greeting: str
    extensions: list[str]
    ms: float


async def probe_sender(sender: Any, settings: Any, domain: str | None = None) -> Probe:
    """Connect to the sender's relay and EHLO; a relay or MX host that cannot be reached or
    found is a UserError naming it."""
    import aiosmtplib

    from mailflow.outbound import mx
    from mailflow.outbound.senders import smtp_client

    relay = sender.relay
    if relay.direct:
        target_domain = domain or sender.domain
        try:
            resolver = mx.MxResolver(settings.mx_overrides, nameservers=settings.dns_servers)
            host, port = (await resolver.hosts(target_domain))[0]
        except (mx.NoRoute, mx.LookupFailed) as exc:
            raise UserError(f"direct delivery to {target_domain}: {exc}") from exc
        relay = relay.at(host, port or relay.port)
    client = smtp_client(relay, settings.ehlo_hostname)
    started = time.perf_counter()
    try:
        await client.connect()
        code, message = await client.ehlo()
        extensions = sorted(client.esmtp_extensions)
        await client.quit()
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise UserError(f"relay {relay.host}:{relay.port} failed: {exc}") from exc
    return Probe(
        sender.name,
        relay.host,
        relay.port,
        relay.tls,
        relay.direct,
        code,
        " ".join(message.split())[:200],
        extensions,
        round((time.perf_counter() - started) * 1000, 1),
    )
