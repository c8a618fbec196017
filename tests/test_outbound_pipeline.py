"""Transactional sends through the queuer and a worker to a real SMTP server with faults."""

from __future__ import annotations

import asyncio
import threading

from mailflow.outbound import sending, templates
from mailflow.outbound.contacts import import_csv_text
from mailflow.outbound.queuer import Queuer
from mailflow.outbound.senders import Sender
from mailflow.outbound.worker import Worker
from mailflow.services import connect, redis_client

from .conftest import wait_until
from .smtp_sink import Sink, SinkServer

SECRET = b"pipeline-test"


def setup_catalog(store, relay_url: str) -> None:
    sending.save_sender(store, Sender("tx", "noreply@example.org", "Example", relay_url))
    templates.save(store, templates.Template("reset", "Reset for {{ name }}", "<p>Hi {{ name }}, code {{ code }}</p>", "Hi {{ name }}, code {{ code }}"))


def run_pipeline(rt, settings, until, timeout=30.0):
    """Queuer and one worker in threads until `until()` holds."""
    stop = threading.Event()
    queuer = Queuer(rt.store, rt.services.redis_url, settings)
    worker = Worker(rt.store, rt.services.redis_url, settings, SECRET, name="w1")
    loop = asyncio.new_event_loop()
    astop = asyncio.Event()

    def work():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(worker.run(astop))

    threads = [threading.Thread(target=queuer.run, args=(stop,)), threading.Thread(target=work)]
    for t in threads:
        t.start()
    try:
        wait_until(until, timeout=timeout, what="jobs to finish")
    finally:
        stop.set()
        loop.call_soon_threadsafe(astop.set)
        for t in threads:
            t.join(15)
    return queuer, worker


def states(db_url):
    with connect(db_url) as c:
        return dict(c.execute("SELECT email, state FROM jobs").fetchall())


def test_each_reply_decides_the_jobs_fate_and_every_attempt_is_an_event(rt, settings, db_url):
    settings = settings.model_copy(update={"retry_base_s": 0.2, "queuer_interval_s": 0.02})
    sink = Sink(tempfail_times=1)
    with SinkServer(sink) as server:
        setup_catalog(rt.store, server.url)
        rcpts = ["ann@example.net", "bounce-1@example.net", "policy-1@example.net", "tempfail-1@example.net", "drop-1@example.net"]
        ids = {}
        for to in rcpts:
            ids[to], created = sending.send_transactional(rt.store, sender="tx", template="reset", to=to, variables={"name": "X", "code": "123"})
            assert created
        run_pipeline(rt, settings, lambda: all(s in ("completed", "failed") for s in states(db_url).values()) and len(states(db_url)) == 5)
    final = states(db_url)
    assert final == {
        "ann@example.net": "completed",
        "bounce-1@example.net": "failed",
        "policy-1@example.net": "failed",
        "tempfail-1@example.net": "completed",
        "drop-1@example.net": "completed",
    }
    # Nothing sent twice; the bounced and refused ones were never accepted.
    assert sink.delivered_to() == {"ann@example.net": 1, "tempfail-1@example.net": 1, "drop-1@example.net": 1}
    with connect(db_url) as c:
        history = {
            to: [t for (t,) in c.execute("SELECT type FROM events WHERE stream = %s ORDER BY version", (f"job-{ids[to]}",))]
            for to in rcpts
        }
        kinds = dict(c.execute("SELECT email, failure_kind FROM jobs WHERE state = 'failed'").fetchall())
        suppressed = [e for (e,) in c.execute("SELECT email FROM suppressions")]
        replies = dict(c.execute("SELECT email, last_reply FROM jobs").fetchall())
    assert history["ann@example.net"] == ["JobCreated", "JobQueued", "JobStarted", "JobCompleted"]
    assert history["tempfail-1@example.net"] == [
        "JobCreated", "JobQueued", "JobStarted", "JobRetryScheduled", "JobQueued", "JobStarted", "JobCompleted"]
    assert history["drop-1@example.net"][3] == "JobRetryScheduled"
    assert kinds == {"bounce-1@example.net": "bad_mailbox", "policy-1@example.net": "policy"}
    assert suppressed == ["bounce-1@example.net"]  # 5.1.1 suppresses; 5.7.1 does not
    assert "5.1.1" in replies["bounce-1@example.net"] and "queued" in replies["ann@example.net"]
    # The message itself: stable Message-ID naming the job, VERP return path.
    [msg] = [m for m in sink.received if m["To"] == "ann@example.net"]
    assert msg["Message-ID"] == f"<{ids['ann@example.net']}@example.org>"
    assert msg["Subject"] == "Reset for X"
    [(mail_from, _)] = [e for e in sink.envelopes if e[1] == "ann@example.net"]
    assert mail_from.startswith("bounces+") and mail_from.endswith("@example.org")


def test_the_same_idempotency_key_never_creates_a_second_job(rt, settings, db_url):
    with SinkServer(Sink()) as server:
        setup_catalog(rt.store, server.url)
    a = sending.send_transactional(rt.store, sender="tx", template="reset", to="a@example.net", variables={"name": "A", "code": 1}, idempotency_key="order-42")
    b = sending.send_transactional(rt.store, sender="tx", template="reset", to="a@example.net", variables={"name": "A", "code": 1}, idempotency_key="order-42")
    assert a[0] == b[0] and (a[1], b[1]) == (True, False)
    with connect(db_url) as c:
        assert c.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


def test_suppressed_addresses_receive_nothing(rt, settings, db_url):
    from mailflow.outbound import suppressions

    sink = Sink()
    with SinkServer(sink) as server:
        setup_catalog(rt.store, server.url)
        import_csv_text(rt.store, "email,name\nunsub@example.net,U\n")
        suppressions.add(rt.store, "gone@example.net", reason="complaint")
        for to in ("gone@example.net", "ok@example.net"):
            sending.send_transactional(rt.store, sender="tx", template="reset", to=to, variables={"name": "N", "code": 1})
        run_pipeline(rt, settings, lambda: sorted(states(db_url).values()) == ["completed", "failed"])
    assert sink.delivered_to() == {"ok@example.net": 1}
    with connect(db_url) as c:
        assert c.execute("SELECT failure_kind FROM jobs WHERE email = 'gone@example.net'").fetchone()[0] == "suppressed"


def test_a_queued_job_lost_by_redis_is_queued_again_exactly_once(rt, settings, db_url):
    """Crash between PostgreSQL and Redis, or FLUSHALL: the queuer refills from PostgreSQL."""
    with SinkServer(Sink()) as server:
        setup_catalog(rt.store, server.url)
    for i in range(3):
        sending.send_transactional(rt.store, sender="tx", template="reset", to=f"u{i}@example.net", variables={"name": "N", "code": 1})
    r = redis_client(rt.services.redis_url)
    q = Queuer(rt.store, rt.services.redis_url, settings)
    assert q.tick(r) == 3
    key = rt.keys.jobs("high")
    assert r.xlen(key) == 3
    q.republish(r)  # a restart: nothing is added twice
    assert r.xlen(key) == 3
    r.delete(key, rt.keys.jobs_epoch)  # Redis lost everything
    q.tick(r)
    entries = r.xrange(key)
    with connect(db_url) as c:
        seqs = sorted(s for (s,) in c.execute("SELECT queue_seq FROM jobs WHERE state = 'queued'"))
    assert sorted(int(e[0].split(b"-")[0]) for e in entries) == seqs and len(seqs) == 3
