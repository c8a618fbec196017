"""POST /api/v1/messages end to end: the request's job goes through the queuer and a worker to a
real SMTP server (aiosmtpd); a repeat with its Idempotency-Key sends nothing more; every event
the message caused, the worker's included, carries the request id as correlation id."""

from __future__ import annotations

import pytest

from mailflow.outbound import sending, templates
from mailflow.outbound.senders import Sender
from mailflow.testing.sink import Sink, SinkServer

from .test_outbound_pipeline import run_pipeline

pytestmark = pytest.mark.process


def test_a_message_sent_over_the_api_is_delivered_once_with_the_request_id_on_every_event(api, acme_api, settings, db):
    sink = Sink()
    with SinkServer(sink) as server:
        sending.save_sender(acme_api.store, Sender("tx", "noreply@acme.example", "Acme", server.url))
        templates.save(
            acme_api.store, templates.Template("reset", "Reset for {{ name }}", "<p>{{ code }}</p>", "{{ code }}")
        )
        body = {"sender": "tx", "template": "reset", "to": "ann@example.net", "variables": {"name": "Ann", "code": "7"}}
        headers = {"Idempotency-Key": "reset-ann-1", "X-Request-Id": "req-send-1"}
        with api.client(acme_api.key_with("messages:send", "messages:read"), **headers) as c:
            first = c.post("/messages", json=body)
            assert first.status_code == 202, first.text
            job_id = first.json()["job_id"]
            assert first.headers["location"] == f"/api/v1/messages/{job_id}"
            run_pipeline(
                api.rt,
                settings.model_copy(update={"queuer_interval_s": 0.02}),
                lambda: c.get(f"/messages/{job_id}").json()["job"]["state"] == "completed",
            )
            again = c.post("/messages", json=body)
            shown = c.get(f"/messages/{job_id}").json()
        # The repeat answers as the first did and creates nothing.
        assert again.status_code == 202 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        run_pipeline(api.rt, settings, lambda: True, timeout=1)
    assert sink.delivered_to() == {"ann@example.net": 1}
    [msg] = sink.received
    assert msg["Subject"] == "Reset for Ann" and msg["Message-ID"] == f"<{job_id}@acme.example>"
    assert [e["type"] for e in shown["history"]] == ["JobCreated", "JobQueued", "JobStarted", "JobCompleted"]
    rows = db.execute(
        "SELECT type, metadata FROM events WHERE stream = %s ORDER BY version", (f"acme/job-{job_id}",)
    ).fetchall()
    assert len(rows) == 4 and {md["correlation_id"] for _, md in rows} == {"req-send-1"}
    assert rows[0][1]["actor"].startswith("api-key:")
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


def test_a_send_the_catalogue_refuses_is_a_problem_and_creates_nothing(api, acme_api, db):
    with api.client(acme_api.key_with("messages:send")) as c:
        r = c.post("/messages", json={"sender": "nobody", "template": "none", "to": "ann@example.net"})
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        r = c.post("/messages", json={"sender": "tx", "template": "reset", "to": "not an address"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "to"
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
