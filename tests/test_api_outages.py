"""The API while PostgreSQL drops its connections under load: every answer is a success or a 503
problem with Retry-After - never a 500 - the service answers again right after, and a send
retried with its Idempotency-Key through the faults makes exactly one job."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from mailflow.outbound import campaigns, segments, sending, templates
from mailflow.outbound.senders import Sender

from .api_fixtures import ApiServer, Tenant

pytestmark = pytest.mark.integration

KILLS = 6


def _kill_server_connections(db) -> int:
    """What a PostgreSQL restart or failover does to the server's pool and key listener."""
    rows = db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    ).fetchall()
    return len(rows)


def _assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "1"
    assert r.json()["type"].endswith("/service-unavailable") and r.json()["request_id"]


def _hammer(c: httpx.Client, path: str, stop: threading.Event, answers: list[httpx.Response]) -> None:
    while not stop.is_set():
        answers.append(c.get(path))


def test_killed_connections_under_load_answer_503_never_500_and_recover(api: ApiServer, acme_api: Tenant, db):
    token = acme_api.key_with("campaigns:read", "contacts:read")
    sending.save_sender(acme_api.store, Sender("news", "news@acme.example", "Acme", "smtp://127.0.0.1:9"))
    templates.save(acme_api.store, templates.Template("hello", "Hello", "<p>hi</p>", "hi"))
    segments.define(acme_api.store, "all", {})
    campaign_id = campaigns.create(acme_api.store, name="spring", sender="news", template="hello", segment="all")
    rng = random.Random(12)
    answers: list[httpx.Response] = []
    stop = threading.Event()
    with api.client(token) as a, api.client(token) as b, api.client(token) as c:
        assert a.get("/jobs").status_code == 200
        loaders = [
            threading.Thread(target=_hammer, args=(a, "/jobs", stop, answers)),
            threading.Thread(target=_hammer, args=(b, "/suppressions", stop, answers)),
            # read on the event loop's own pool (Ctx.read_one)
            threading.Thread(target=_hammer, args=(c, f"/campaigns/{campaign_id}", stop, answers)),
        ]
        for t in loaders:
            t.start()
        try:
            killed = 0
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.05, 0.4))  # at a random moment of a steady load
                killed += _kill_server_connections(db)
        finally:
            time.sleep(0.3)
            stop.set()
            for t in loaders:
                t.join(10)
        assert killed >= KILLS  # the faults happened
        statuses = {r.status_code for r in answers}
        assert statuses <= {200, 503}, [r.text for r in answers if r.status_code not in (200, 503)][:3]
        for r in answers:
            if r.status_code == 503:
                _assert_unavailable(r)
        # The broken connections were met on both pools (or the test proves nothing), and
        # cleared at once:
        for path in ("/jobs", f"/campaigns/{campaign_id}"):
            mine = [r.status_code for r in answers if r.url.path.endswith(path)]
            assert 503 in mine and mine[-1] == 200, path
        # One more fault, then one retry after Retry-After is all a client needs.
        _kill_server_connections(db)
        first = a.get("/jobs")
        if first.status_code == 503:
            time.sleep(float(first.headers["retry-after"]))
        assert a.get("/jobs").status_code == 200


def test_a_send_retried_through_faults_with_its_idempotency_key_makes_one_job(api: ApiServer, acme_api: Tenant, db):
    sending.save_sender(acme_api.store, Sender("tx", "noreply@acme.example", "Acme", "smtp://127.0.0.1:9"))
    templates.save(acme_api.store, templates.Template("hi", "Hi {{ name }}", "<p>hi</p>", "hi"))
    body = {"sender": "tx", "template": "hi", "to": "ann@example.net", "variables": {"name": "Ann"}}
    rng = random.Random(7)
    job_ids = set()
    with api.client(acme_api.key_with("messages:send", "messages:read"), **{"Idempotency-Key": "hi-ann"}) as c:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.0, 0.05))
            _kill_server_connections(db)
            for _attempt in range(20):  # what a well-behaved client does with 503 and 409
                r = c.post("/messages", json=body)
                if r.status_code in (503, 409):
                    assert r.headers["content-type"] == "application/problem+json"
                    time.sleep(float(r.headers["retry-after"]))
                    continue
                assert r.status_code == 202, r.text
                job_ids.add(r.json()["job_id"])
                break
            else:
                pytest.fail("the send was never answered")
    assert len(job_ids) == 1
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    [job_id] = job_ids
    assert db.execute("SELECT count(*) FROM events WHERE stream = %s", (f"acme/job-{job_id}",)).fetchone()[0] == 1
