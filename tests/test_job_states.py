"""The job state graph, enforced where jobs are written: the jobs table and the worker's record of results."""

from __future__ import annotations

import pytest

from mailflow.consumers import inline
from mailflow.events.envelope import Metadata
from mailflow.infra.services import connect
from mailflow.outbound import campaigns, segments, sending
from mailflow.outbound.events import JobCompleted, JobQueued, JobRetryScheduled, JobStarted
from mailflow.outbound.jobs import ALLOWED, IllegalTransition, JobState, Priority, sources
from mailflow.outbound.replies import FailureKind, Outcome, Verdict
from mailflow.outbound.worker import Claimed, Result, Worker

from .test_outbound_pipeline import load_contacts, setup_catalog

pytestmark = pytest.mark.integration

S = JobState


def test_the_graph_is_the_documented_one_plus_cancelling_jobs_that_never_started():
    legal = {(a, b) for a, targets in ALLOWED.items() for b in targets}
    assert legal == {
        (S.PENDING, S.QUEUED),
        (S.QUEUED, S.ACTIVE),
        (S.ACTIVE, S.COMPLETED),
        (S.ACTIVE, S.FAILED),
        (S.ACTIVE, S.RETRY),
        (S.RETRY, S.QUEUED),
        (S.PENDING, S.FAILED),
        (S.RETRY, S.FAILED),  # a cancelled campaign's unsent jobs
    }
    assert sources(S.ACTIVE) == ["queued"]
    assert sources(S.FAILED) == ["active", "pending", "retry"]


def _job(rt) -> str:
    setup_catalog(rt.store, "smtp://127.0.0.1:1?tls=none")
    job_id, _ = sending.send_transactional(
        rt.store, sender="tx", template="reset", to="ann@example.org", variables={"name": "Ann", "code": 1}
    )
    return job_id


def _record(rt, *events) -> None:
    with inline.writing(rt.store) as w:
        w.record([(f"job-{e.data['job_id']}", e) for e in events])


def _state(db_url, job_id) -> tuple[str, int, str | None]:
    with connect(db_url) as c:
        return c.execute("SELECT state, attempts, worker FROM jobs WHERE id = %s", (job_id,)).fetchone()


def _count(db_url, job_id) -> int:
    with connect(db_url) as c:
        return c.execute("SELECT count(*) FROM events WHERE stream = %s", (f"default/job-{job_id}",)).fetchone()[0]


@pytest.mark.parametrize(
    "event",
    [
        lambda j: JobStarted(job_id=j, attempt=1, worker="w", lease_until="2030-01-01T00:00:00+00:00"),
        lambda j: JobCompleted(job_id=j, attempt=0, code=250, reply="ok"),
        lambda j: JobRetryScheduled(job_id=j, attempt=0, reply="x", due_at="2030-01-01T00:00:00+00:00"),
    ],
    ids=["start-pending", "complete-pending", "retry-pending"],
)
def test_the_jobs_table_refuses_a_move_the_graph_does_not_allow_and_nothing_is_recorded(rt, db_url, event):
    job_id = _job(rt)
    before = _count(db_url, job_id)
    with pytest.raises(IllegalTransition, match="cannot go from pending"):
        _record(rt, event(job_id).to_new())
    assert _state(db_url, job_id)[0] == "pending"
    assert _count(db_url, job_id) == before  # the append rolled back with the refused update


def _handed_from_a_to_b(rt, job_id: str) -> None:
    """Worker a started attempt 1, its lease expired, and worker b holds attempt 2."""
    lease = "2030-01-01T00:00:00+00:00"
    _record(
        rt,
        JobQueued(job_id=job_id, queue_seq=1).to_new(),
        JobStarted(job_id=job_id, attempt=1, worker="a", lease_until=lease).to_new(),
        JobRetryScheduled(job_id=job_id, attempt=1, reply="lease expired", due_at=lease).to_new(),
        JobQueued(job_id=job_id, queue_seq=2).to_new(),
        JobStarted(job_id=job_id, attempt=2, worker="b", lease_until=lease).to_new(),
    )


def test_a_result_for_an_earlier_attempt_is_refused_by_the_jobs_table(rt, db_url):
    job_id = _job(rt)
    _handed_from_a_to_b(rt, job_id)
    with pytest.raises(IllegalTransition):
        _record(rt, JobCompleted(job_id=job_id, attempt=1, code=250, reply="ok").to_new())
    assert _state(db_url, job_id) == ("active", 2, "b")


def test_a_worker_does_not_record_the_result_of_a_job_handed_to_another_worker(rt, settings, db_url):
    """Worker a sent attempt 1 slowly; its lease expired and worker b holds attempt 2. When a
    records its result, the job's history and state stay b's, and a says so in its log."""
    job_id = _job(rt)
    _handed_from_a_to_b(rt, job_id)
    before = _count(db_url, job_id)
    worker = Worker(rt.store, rt.services.redis_url, settings, b"secret", name="a")
    job = Claimed(Priority.HIGH, b"1-0", job_id, 1, "ann@example.org", "tx", "reset", {}, None, {})
    worker._finish([Result(job, Verdict(Outcome.DELIVERED, FailureKind.NONE, False), 250, "2.0.0 ok")])
    assert _state(db_url, job_id) == ("active", 2, "b")
    assert _count(db_url, job_id) == before


def test_cancelling_a_campaign_ends_its_unsent_jobs_and_the_queuer_never_queues_them(rt, db_url):
    setup_catalog(rt.store, "smtp://127.0.0.1:1?tls=none")
    load_contacts(rt.store, 3)
    segments.define(rt.store, "all", {})
    cid = campaigns.create(rt.store, name="spring", sender="tx", template="reset", segment="all")
    assert campaigns.start(rt.store, cid) == 3
    with connect(db_url) as c:
        first, second, _third = [
            str(r[0]) for r in c.execute("SELECT id FROM jobs WHERE campaign_id = %s ORDER BY email", (cid,))
        ]
    lease = "2030-01-01T00:00:00+00:00"
    md = Metadata(correlation_id=f"campaign-{cid}")
    # One job waits to retry, one was sent; the third is still pending.
    _record(
        rt,
        JobQueued(job_id=first, queue_seq=1).to_new(md),
        JobStarted(job_id=first, attempt=1, worker="w", lease_until=lease).to_new(md),
        JobRetryScheduled(job_id=first, attempt=1, reply="451 later", due_at=lease).to_new(md),
        JobQueued(job_id=second, queue_seq=2).to_new(md),
        JobStarted(job_id=second, attempt=1, worker="w", lease_until=lease).to_new(md),
        JobCompleted(job_id=second, attempt=1, code=250, reply="ok").to_new(md),
    )
    assert campaigns.cancel(rt.store, cid) == 2
    with connect(db_url) as c:
        rows = dict(
            c.execute(
                "SELECT state || ':' || coalesce(failure_kind, ''), count(*) FROM jobs "
                "WHERE campaign_id = %s GROUP BY 1",
                (cid,),
            ).fetchall()
        )
        kinds = [
            t
            for (t,) in c.execute(
                "SELECT type FROM events WHERE stream = %s ORDER BY version", (f"default/job-{first}",)
            )
        ]
    assert rows == {"failed:cancelled": 2, "completed:": 1}
    assert kinds[-1] == "JobFailed"
    with pytest.raises(campaigns.CampaignError):
        campaigns.cancel(rt.store, cid)


def test_job_events_after_creation_keep_the_campaigns_correlation_id(rt, settings, db_url):
    from mailflow.testing.sink import Sink, SinkServer

    from .test_outbound_pipeline import run_pipeline

    settings = settings.model_copy(update={"queuer_interval_s": 0.02})
    with SinkServer(Sink()) as server:
        setup_catalog(rt.store, f"smtp://127.0.0.1:{server.port}?tls=none")
        load_contacts(rt.store, 2)
        segments.define(rt.store, "all", {})
        cid = campaigns.create(rt.store, name="c", sender="tx", template="reset", segment="all")
        campaigns.start(rt.store, cid)

        def done():
            with connect(db_url) as c:
                return c.execute("SELECT count(*) FROM jobs WHERE state IN ('completed', 'failed')").fetchone()[0] == 2

        run_pipeline(rt, settings, done)
    with connect(db_url) as c:
        rows = c.execute(
            "SELECT type, metadata->>'correlation_id' FROM events WHERE stream LIKE 'default/job-%'"
        ).fetchall()
    assert {t for t, _ in rows} >= {"JobCreated", "JobQueued", "JobStarted"}
    assert {corr for _, corr in rows} == {f"campaign-{cid}"}


def test_a_paused_campaign_holds_its_retries_and_resuming_queues_them(rt, settings, db_url):
    from mailflow.infra.services import redis_client
    from mailflow.outbound.queuer import Queuer

    setup_catalog(rt.store, "smtp://127.0.0.1:1?tls=none")
    load_contacts(rt.store, 2)
    segments.define(rt.store, "all", {})
    cid = campaigns.create(rt.store, name="held", sender="tx", template="reset", segment="all")
    campaigns.start(rt.store, cid)
    with connect(db_url) as c:
        first = str(
            c.execute("SELECT id FROM jobs WHERE campaign_id = %s ORDER BY email LIMIT 1", (cid,)).fetchone()[0]
        )
    md = Metadata(correlation_id=f"campaign-{cid}")
    due_now = "2000-01-01T00:00:00+00:00"
    _record(
        rt,
        JobQueued(job_id=first, queue_seq=1).to_new(md),
        JobStarted(job_id=first, attempt=1, worker="w", lease_until="2030-01-01T00:00:00+00:00").to_new(md),
        JobRetryScheduled(job_id=first, attempt=1, reply="451 later", due_at=due_now).to_new(md),
    )
    campaigns.pause(rt.store, cid)
    queuer = Queuer(rt.store, rt.services.redis_url, settings)
    r = redis_client(rt.services.redis_url)
    assert queuer.tick(r) == 0
    assert _state(db_url, first)[0] == "retry"
    campaigns.resume(rt.store, cid)
    assert queuer.tick(r) == 2  # the retry and the job that was still pending
    assert _state(db_url, first)[0] == "queued"
