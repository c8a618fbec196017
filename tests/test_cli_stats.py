"""`mailflow stats`, `mailflow analytics aggregate|rebuild` and the duties in `mailflow queues`,
as an operator runs them (subprocesses on a real database)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mailflow.events.envelope import Envelope, Metadata
from mailflow.infra.services import connect, pool_conninfo
from mailflow.infra.tenancy import Scope
from mailflow.projectors.facts import Facts
from mailflow.tenants import registry

from .conftest import run_cli
from .history import recorded

pytestmark = pytest.mark.process


def hour_of(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def hours_of(times: list[datetime], since: datetime | None = None) -> int:
    """How many hours these moments fall in (since `since`): the aggregation takes every one,
    the current hour so far included."""
    return len({hour_of(t) for t in times if since is None or t >= hour_of(since)})


@pytest.fixture
def history(operator_rt, db) -> list[datetime]:
    """Acme sent five messages over the last day and a half; one bounced; rival sent one.
    The moments are taken when the test runs (the suite may run for longer than an hour)."""
    now = datetime.now(UTC)
    at_now = hour_of(now) + (now - hour_of(now)) / 2  # in the current hour, and not in the future
    times = [at_now - timedelta(hours=h) for h in (30, 5, 5, 2, 0)]
    registry.create(operator_rt.store, "acme")
    registry.create(operator_rt.store, "rival")
    events, position = [], 0
    for i, (tenant, at) in enumerate([("acme", t) for t in times] + [("rival", at_now)]):
        job = str(uuid.uuid4())
        created = {"job_id": job, "idempotency_key": job, "priority": "high", "subject": "s", "sealed": "x"}
        created |= {"sender": "news" if i % 2 else "billing", "template": "t", "domain": f"d{i % 2}.example"}
        md = Metadata(tenant=tenant)
        for etype, data in (
            ("JobCreated", created),
            ("JobStarted", {"job_id": job, "attempt": 1}),
            ("JobCompleted", {"job_id": job, "attempt": 1, "code": 250, "size": 1000}),
        ):
            position += 1
            events.append(Envelope(uuid.uuid4(), position, f"{tenant}/job-{job}", 1, etype, 1, data, md, at))
        if i == 1:
            position += 1
            bounce = {"job_id": job, "kind": "bounce", "hard": True}
            events.append(
                Envelope(uuid.uuid4(), position, f"{tenant}/job-{job}", 2, "FeedbackReceived", 1, bounce, md, at)
            )
    with connect(pool_conninfo(operator_rt.store.pool), scope=Scope.operator()) as conn, conn.transaction():
        Facts().apply(conn, recorded(operator_rt.store, events))
    return [*times, at_now]


def test_stats_counts_the_tenant_s_own_messages_per_bucket_and_in_total(env, history):
    acme = dict(env, MAILFLOW_TENANT="acme")
    res = run_cli(acme, "stats", "--since", "2d", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert {k: got["totals"][k] for k in ("sent", "delivered", "bounced")} == {"sent": 5, "delivered": 5, "bounced": 1}
    busy = {b["start"]: b["delivered"] for b in got["buckets"] if b["delivered"]}
    assert sorted(busy.values()) == [1, 1, 1, 2]  # the two messages of five hours ago in one hour
    assert got["delivered_latency_ms_avg"] == 0.0
    by_sender = json.loads(run_cli(acme, "stats", "--since", "2d", "--sender", "news", "--json").stdout)
    assert by_sender["totals"]["sent"] == 2
    rival = json.loads(run_cli(dict(env, MAILFLOW_TENANT="rival"), "stats", "--json").stdout)
    assert rival["totals"]["sent"] == 1  # acme's are not rival's
    daily = json.loads(run_cli(acme, "stats", "--since", "3d", "--by", "day", "--json").stdout)
    assert sum(b["sent"] for b in daily["buckets"]) == 5 and len(daily["buckets"]) in (4, 5)


def test_the_human_table_fits_80_columns_and_bad_input_is_one_line(env, history):
    acme = dict(env, MAILFLOW_TENANT="acme", COLUMNS="80")
    res = run_cli(acme, "stats", "--since", "2d")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, res.stdout
    assert lines[0].split()[:4] == ["hour", "sent", "deliv", "defer"]
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[1:5] == ["5", "5", "0", "1"]
    assert any(line.startswith("delivered per hour") for line in lines)
    bad = run_cli(acme, "stats", "--by", "week")
    assert bad.returncode != 0 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert "hour, day or month" in bad.stderr


def test_analytics_rebuild_gives_the_same_aggregates_as_the_hourly_job(env, history, db):
    res = run_cli(env, "analytics", "aggregate", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["hours"] == hours_of(history)
    tables = ("facts_hourly", "facts_daily", "facts_monthly")
    before = {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
    assert before["facts_hourly"]
    db.execute("UPDATE facts_hourly SET n = n + 100")  # aggregates gone wrong ...
    rebuilt = run_cli(env, "analytics", "rebuild", "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in tables} == before  # ... made right
    since = datetime.now(UTC) - timedelta(hours=6)
    human = run_cli(env, "analytics", "rebuild", "--since", "6h")
    expected = {hours_of(history, since), hours_of(history, datetime.now(UTC) - timedelta(hours=6))}
    assert human.returncode == 0 and any(f"aggregated {n} hour(s)" in human.stdout for n in expected), human.stdout


def test_queues_shows_the_periodic_duties_with_their_sla(env):
    res = run_cli(env, "queues", "--json")
    assert res.returncode == 0, res.stderr
    low = next(r for r in json.loads(res.stdout) if r["priority"] == "low")
    assert {d["name"]: d["sla_s"] for d in low["duties"]} == {"aggregate": 3600, "cleanup": 3600, "dns_check": 3600}
    human = run_cli(env, "queues").stdout
    assert any(
        line.startswith("aggregate") and "every 5m00s" in line and "SLA 1h00m" in line for line in human.splitlines()
    )
