"""Jobs that are not emails: periodic duties scheduled from the periodic table, queued, leased,
run and retried by a worker like mail (queuer and worker in threads, real PostgreSQL and Redis)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mailflow.events.envelope import Envelope, Metadata
from mailflow.infra.services import connect, pool_conninfo
from mailflow.infra.tenancy import Scope
from mailflow.outbound import periodic
from mailflow.projectors.facts import Facts
from mailflow.runtime.duties import duties

from .history import recorded
from .test_outbound_pipeline import run_pipeline

pytestmark = pytest.mark.process


def run(operator_rt, settings, table, until):
    run_pipeline(operator_rt, settings, until, redis_url=settings.redis_url, duties=table)


def some_facts(operator_store, hour: datetime) -> None:
    job = str(uuid.uuid4())
    created = {"job_id": job, "idempotency_key": job, "priority": "high", "subject": "s", "sealed": "x"}
    created |= {"sender": "news", "template": "t", "domain": "example.org"}
    md = Metadata(tenant="acme")
    events = [
        Envelope(uuid.uuid4(), 1, "acme/job", 1, "JobCreated", 2, created, md, hour),
        Envelope(uuid.uuid4(), 2, "acme/job", 2, "JobStarted", 1, {"job_id": job, "attempt": 1}, md, hour),
    ]
    with connect(pool_conninfo(operator_store.pool), scope=Scope.operator()) as conn, conn.transaction():
        Facts().apply(conn, recorded(operator_store, events))


def duty_jobs(db) -> dict[str, tuple[str, str | None]]:
    rows = db.execute("SELECT kind, state, last_reply FROM jobs WHERE tenant = '_system'").fetchall()
    return {k: (state, reply) for k, state, reply in rows}


def test_the_aggregation_is_a_low_priority_job_that_a_worker_runs_like_mail(operator_rt, operator_store, settings, db):
    on = settings.model_copy(update={"periodic_duties": True, "queuer_interval_s": 0.05})
    hour = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    some_facts(operator_store, hour)
    run(operator_rt, on, duties(operator_store, on), lambda: duty_jobs(db).get("aggregate", ("",))[0] == "completed")
    state, reply = duty_jobs(db)["aggregate"]
    assert reply == "aggregated 1 hour(s) into 1 row(s)" + reply.split("row(s)")[1]
    assert db.execute("SELECT hour, kind, n FROM facts_hourly").fetchall() == [(hour, "sent", 1)]
    (job_id,) = db.execute("SELECT id FROM jobs WHERE kind = 'aggregate'").fetchone()
    types = [
        t
        for (t,) in db.execute("SELECT type FROM events WHERE stream = %s ORDER BY version", (f"_system/job-{job_id}",))
    ]
    assert types == ["JobCreated", "JobQueued", "JobStarted", "JobCompleted"]  # the same states as mail
    next_due, last_job = db.execute("SELECT next_due, last_job FROM periodic WHERE name = 'aggregate'").fetchone()
    assert last_job == job_id and next_due > datetime.now(UTC)
    # every 5 minutes, on the 5-minute marks: the current hour so far is rolled up too
    assert next_due.minute % 5 == 0 and next_due.second == 0 and next_due - datetime.now(UTC) <= timedelta(minutes=5)


def test_a_duty_that_raises_is_retried_and_one_nobody_runs_fails_with_a_reason(operator_rt, settings, db):
    on = settings.model_copy(update={"periodic_duties": True, "queuer_interval_s": 0.05, "retry_base_s": 0.2})
    calls = []

    def flaky(args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("the database was busy")
        return "done"

    table = {"aggregate": flaky, "cleanup": lambda args: "clean"}  # nothing runs dns_check
    run(
        operator_rt,
        on,
        table,
        lambda: (
            {k: s for k, (s, _) in duty_jobs(db).items()}
            == {"aggregate": "completed", "cleanup": "completed", "dns_check": "failed"}
        ),
    )
    assert len(calls) == 2 and calls[0]["duty"] == "aggregate" and "due" in calls[0]
    retried = db.execute("SELECT data->>'reply' FROM events WHERE type = 'JobRetryScheduled'").fetchall()
    assert retried == [("the database was busy",)]
    assert duty_jobs(db)["dns_check"] == ("failed", "this worker runs no duty of kind 'dns_check'")


def test_a_duty_whose_last_job_has_not_ended_is_not_scheduled_again(operator_store, db):
    now = datetime.now(UTC)
    first = {s.name: s for s in periodic.schedule_due(operator_store, now)}
    assert all(s.job_id for s in first.values()) and set(first) == {"aggregate", "cleanup", "dns_check"}
    assert periodic.schedule_due(operator_store, now) == []  # not due again in this period
    later = now + timedelta(hours=2)
    again = {s.name: s for s in periodic.schedule_due(operator_store, later)}
    assert {n: s.job_id for n, s in again.items()} == dict.fromkeys(first)  # all still pending: none made
    assert db.execute("SELECT count(*) FROM jobs WHERE tenant = '_system'").fetchone() == (3,)
    assert again["aggregate"].next_due > later
