"""Transactional sends through the queuer and a worker to a real SMTP server with faults."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mailflow.infra.services import connect, redis_client
from mailflow.outbound import sending, templates
from mailflow.outbound.contacts import import_csv_text
from mailflow.outbound.queuer import Queuer
from mailflow.outbound.senders import Sender
from mailflow.outbound.worker import Worker
from mailflow.testing.sink import Sink, SinkServer

from .conftest import wait_until

pytestmark = pytest.mark.process

SECRET = b"pipeline-test"


def setup_catalog(store, relay_url: str) -> None:
    sending.save_sender(store, Sender("tx", "noreply@example.org", "Example", relay_url))
    templates.save(
        store,
        templates.Template(
            "reset", "Reset for {{ name }}", "<p>Hi {{ name }}, code {{ code }}</p>", "Hi {{ name }}, code {{ code }}"
        ),
    )


def run_pipeline(rt, settings, until, timeout=30.0, redis_url=None, duties=None, secret=SECRET):
    """Queuer and one worker (with these duties, signing with `secret`) in threads until `until()` holds."""
    stop = threading.Event()
    redis_url = redis_url or rt.services.redis_url
    queuer = Queuer(rt.store, redis_url, settings)
    worker = Worker(rt.store, redis_url, settings, secret, name="w1", duties=duties)
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
        rcpts = [
            "ann@example.net",
            "bounce-1@example.net",
            "policy-1@example.net",
            "tempfail-1@example.net",
            "drop-1@example.net",
        ]
        ids = {}
        for to in rcpts:
            ids[to], created = sending.send_transactional(
                rt.store, sender="tx", template="reset", to=to, variables={"name": "X", "code": "123"}
            )
            assert created
        run_pipeline(
            rt,
            settings,
            lambda: all(s in ("completed", "failed") for s in states(db_url).values()) and len(states(db_url)) == 5,
        )
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
            to: [
                t
                for (t,) in c.execute(
                    "SELECT type FROM events WHERE stream = %s ORDER BY version", (f"default/job-{ids[to]}",)
                )
            ]
            for to in rcpts
        }
        kinds = dict(c.execute("SELECT email, failure_kind FROM jobs WHERE state = 'failed'").fetchall())
        suppressed = [e for (e,) in c.execute("SELECT email FROM suppressions")]
        replies = dict(c.execute("SELECT email, last_reply FROM jobs").fetchall())
    assert history["ann@example.net"] == ["JobCreated", "JobQueued", "JobStarted", "JobCompleted"]
    assert history["tempfail-1@example.net"] == [
        "JobCreated",
        "JobQueued",
        "JobStarted",
        "JobRetryScheduled",
        "JobQueued",
        "JobStarted",
        "JobCompleted",
    ]
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
    a = sending.send_transactional(
        rt.store,
        sender="tx",
        template="reset",
        to="a@example.net",
        variables={"name": "A", "code": 1},
        idempotency_key="order-42",
    )
    b = sending.send_transactional(
        rt.store,
        sender="tx",
        template="reset",
        to="a@example.net",
        variables={"name": "A", "code": 1},
        idempotency_key="order-42",
    )
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
            sending.send_transactional(
                rt.store, sender="tx", template="reset", to=to, variables={"name": "N", "code": 1}
            )
        run_pipeline(rt, settings, lambda: sorted(states(db_url).values()) == ["completed", "failed"])
    assert sink.delivered_to() == {"ok@example.net": 1}
    with connect(db_url) as c:
        assert c.execute("SELECT failure_kind FROM jobs WHERE email = 'gone@example.net'").fetchone()[0] == "suppressed"


def queued_transactional(rt, settings, n: int, local: str):
    """n transactional jobs, queued by one pass of a queuer: (redis client, queuer, high stream key)."""
    with SinkServer(Sink()) as server:
        setup_catalog(rt.store, server.url)
    for i in range(n):
        sending.send_transactional(
            rt.store, sender="tx", template="reset", to=f"{local}{i}@example.net", variables={"name": "N", "code": 1}
        )
    r = redis_client(rt.services.redis_url)
    q = Queuer(rt.store, rt.services.redis_url, settings)
    assert q.tick(r) == n
    return r, q, rt.keys.jobs("high")


def test_a_queued_job_lost_by_redis_is_queued_again_exactly_once(rt, settings, db_url):
    """Crash between PostgreSQL and Redis, or FLUSHALL: the queuer refills from PostgreSQL."""
    r, q, key = queued_transactional(rt, settings, 3, "u")
    assert r.xlen(key) == 3
    assert q.reconcile(r) == 0  # a restart: nothing is added twice
    assert r.xlen(key) == 3
    r.delete(key, rt.keys.jobs_epoch)  # Redis lost everything
    q.tick(r)
    entries = r.xrange(key)
    with connect(db_url) as c:
        seqs = sorted(s for (s,) in c.execute("SELECT queue_seq FROM jobs WHERE state = 'queued'"))
    assert sorted(int(e[0].split(b"-")[0]) for e in entries) == seqs and len(seqs) == 3


def test_entries_lost_without_the_epoch_key_going_are_found_by_the_periodic_check(rt, settings, db_url):
    """Redis restored from an older snapshot keeps the epoch key but not the latest entries:
    the periodic length check finds the stream short and the queuer adds them again."""
    settings = settings.model_copy(update={"queuer_reconcile_interval_s": 0.2})
    r, q, key = queued_transactional(rt, settings, 3, "p")
    first, second = [eid for eid, _ in r.xrange(key)][:2]
    r.xdel(key, first, second)
    q.tick(r)
    assert r.xlen(key) == 1  # not yet: the epoch key is still there, the check is not due
    time.sleep(0.25)
    q.tick(r)
    assert r.xlen(key) == 3 and q.stats.republished == 2
    r.close()


def test_an_entry_of_an_earlier_attempt_does_not_stand_for_the_job_queued_again(rt, settings, db_url):
    """A job queued again (after its lease expired) has a new queue_seq; an old entry of it still
    in the stream (pending for a dead worker) is stale to every worker, so it must not hide the
    loss of the current one."""
    with SinkServer(Sink()) as server:
        setup_catalog(rt.store, server.url)
    jid, _ = sending.send_transactional(
        rt.store, sender="tx", template="reset", to="again@example.net", variables={"name": "N", "code": 1}
    )
    r = redis_client(rt.services.redis_url)
    q = Queuer(rt.store, rt.services.redis_url, settings)
    assert q.tick(r) == 1
    key = rt.keys.jobs("high")
    [(eid, fields)] = r.xrange(key)
    seq = int(fields[b"queue_seq"])
    r.xdel(key, eid)  # the current entry is lost ...
    r.xadd(key, {"job_id": jid, "queue_seq": str(seq - 1)}, id=f"{seq}-1")  # ... an earlier attempt's is not
    assert q.reconcile(r) == 1
    assert sorted(int(f[b"queue_seq"]) for _, f in r.xrange(key)) == [seq - 1, seq]
    assert q.reconcile(r) == 0
    r.close()


def test_a_flush_between_marking_jobs_queued_and_adding_them_to_redis_loses_none(
    rt, settings, db_url, private_redis_like_tested, monkeypatch
):
    """Issue 7: FLUSHALL after a batch's JobQueued committed and before its XADD. The XADD
    re-creates the stream holding only that batch; the batches queued before it, wiped by
    the flush, must still reach a worker (a watermark on the stream's last ID skips them)."""
    pr = private_redis_like_tested
    settings = settings.model_copy(
        update={"redis_url": pr.url, "queuer_batch_size": 20, "queuer_interval_s": 0.02, "rate_limits": {"*": 100000}}
    )
    sink = Sink()
    with SinkServer(sink) as server:
        setup_catalog(rt.store, server.url)
        for i in range(60):
            sending.send_transactional(
                rt.store, sender="tx", template="reset", to=f"f{i}@example.net", variables={"name": "N", "code": i}
            )
        r = redis_client(pr.url)
        key = rt.keys.jobs("high")
        q = Queuer(rt.store, pr.url, settings)
        assert q.tick(r) == 20 and r.xlen(key) == 20  # the first batch is in the stream, not yet taken

        flushed = []
        xadd = Queuer._xadd

        def flush_then_xadd(self, r, key, jobs):
            if not flushed:
                r.flushall()  # Redis loses everything between the commit and the XADD
                flushed.append(len(jobs))
            xadd(self, r, key, jobs)

        monkeypatch.setattr(Queuer, "_xadd", flush_then_xadd)
        assert q.tick(r) == 20
        monkeypatch.undo()
        assert flushed == [20] and r.xlen(key) == 20  # only the second batch survived in Redis
        q.tick(r)  # the third batch, and what the queuer makes of the flush
        with connect(db_url) as c:
            queued = {str(j) for (j,) in c.execute("SELECT id FROM jobs WHERE state = 'queued'")}
        held = {f[b"job_id"].decode() for _, f in r.xrange(key)}
        assert len(queued) == 60 and queued - held == set(), f"{len(queued - held)} queued jobs are in no stream"

        run_pipeline(rt, settings, lambda: sorted(set(states(db_url).values())) == ["completed"], redis_url=pr.url)
        r.close()
    assert sink.delivered_to() == {f"f{i}@example.net": 1 for i in range(60)}


def load_contacts(store, n: int, domain: str = "example.net", extra: str = "") -> None:
    rows = "\n".join(f"user{i}@{domain},User {i},NL" for i in range(n))
    import_csv_text(store, "email,name,country\n" + rows + "\n" + extra)


def test_a_campaign_sends_once_to_its_snapshot_and_completes(rt, settings, db_url):
    from mailflow.outbound import campaigns, segments, suppressions

    settings = settings.model_copy(update={"retry_base_s": 0.2, "queuer_interval_s": 0.02})
    sink = Sink(tempfail_times=1)
    with SinkServer(sink) as server:
        setup_catalog(rt.store, server.url)
        templates.save(rt.store, templates.Template("news", "News for {{ name }}", "<p>Hello {{ name }}</p>"))
        load_contacts(
            rt.store, 40, extra="bounce-7@example.net,B,NL\ntempfail-3@example.net,T,NL\nunsub@example.net,U,NL\n"
        )
        suppressions.add(rt.store, "user5@example.net", reason="complaint")
        segments.define(rt.store, "dutch", {"attributes.country": "NL"})
        cid = campaigns.create(rt.store, name="spring", sender="tx", template="news", segment="dutch")
        assert campaigns.start(rt.store, cid) == 42  # 43 Dutch contacts, one suppressed
        assert campaigns.start(rt.store, cid) == 0  # starting twice changes nothing
        load_contacts(rt.store, 1, domain="late.example")  # signs up after the start
        suppressions.add(rt.store, "user9@example.net", reason="unsubscribed")  # leaves before being sent to

        def done():
            with connect(db_url) as c:
                return c.execute("SELECT status FROM campaigns WHERE id = %s", (cid,)).fetchone()[0] == "completed"

        run_pipeline(rt, settings, done)
        with connect(db_url) as c:
            st = campaigns.status(c, cid)
    got = sink.delivered_to()
    assert all(n == 1 for n in got.values()), "a recipient got the campaign twice"
    assert "user5@example.net" not in got and "user9@example.net" not in got and "user0@late.example" not in got
    assert "bounce-7@example.net" not in got and got["tempfail-3@example.net"] == 1
    assert len(got) == 40  # 42 jobs - bounce - unsubscribed-later
    assert st["jobs"]["completed"] == 40 and st["jobs"]["failed"] == 2 and st["total"] == 42
    assert {f["kind"] for f in st["failures"]} == {"bad_mailbox", "suppressed"}
    assert st["retries"] >= 1
    msg = next(m for m in sink.received if m["To"] == "user1@example.net")
    assert msg["List-Unsubscribe-Post"] is None or msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["List-Unsubscribe"].strip().startswith("<mailto:unsubscribe+")


def test_transactional_mail_overtakes_a_running_campaign(rt, settings, db_url):
    from mailflow.outbound import campaigns, segments

    settings = settings.model_copy(
        update={"worker_concurrency": 4, "queuer_interval_s": 0.02, "worker_connections_per_relay": 4}
    )
    sink = Sink(delay_s=0.02)  # each message takes a while: the campaign needs ~1.5 s
    with SinkServer(sink) as server:
        setup_catalog(rt.store, server.url)
        templates.save(rt.store, templates.Template("news", "News", "<p>Hello {{ name }}</p>"))
        load_contacts(rt.store, 300)
        segments.define(rt.store, "all", {})
        cid = campaigns.create(rt.store, name="bulk", sender="tx", template="news", segment="all")
        campaigns.start(rt.store, cid)
        sent_tx = threading.Event()

        def until():
            with connect(db_url) as c:
                accepted = c.execute(
                    "SELECT count(*) FROM jobs WHERE campaign_id = %s AND state = 'completed'", (cid,)
                ).fetchone()[0]
                if accepted >= 30 and not sent_tx.is_set():
                    sending.send_transactional(
                        rt.store,
                        sender="tx",
                        template="reset",
                        to="vip@example.net",
                        variables={"name": "V", "code": 9},
                    )
                    sent_tx.set()
                return (
                    c.execute("SELECT count(*) FROM jobs WHERE state NOT IN ('completed', 'failed')").fetchone()[0] == 0
                    and sent_tx.is_set()
                )

        run_pipeline(rt, settings, until, timeout=60)
    with connect(db_url) as c:
        tx_accepted = c.execute("SELECT accepted_at FROM jobs WHERE email = 'vip@example.net'").fetchone()[0]
        after = c.execute(
            "SELECT count(*) FROM jobs WHERE campaign_id = %s AND accepted_at > %s", (cid, tx_accepted)
        ).fetchone()[0]
        tx_latency = c.execute(
            "SELECT extract(epoch FROM accepted_at - created_at) FROM jobs WHERE email = 'vip@example.net'"
        ).fetchone()[0]
    # It did not wait for the campaign: most of the campaign was accepted after it.
    assert after > 150, f"only {after} campaign messages were accepted after the transactional one"
    assert float(tx_latency) < 2.0


def test_entries_left_unstarted_by_a_dead_worker_are_reclaimed_and_sent_once(rt, settings, db_url):
    """A worker that read entries and died before starting them: another worker takes them over."""
    settings = settings.model_copy(update={"job_lease_s": 0.5, "queuer_interval_s": 0.02})
    sink = Sink()
    with SinkServer(sink) as server:
        setup_catalog(rt.store, server.url)
        for i in range(3):
            sending.send_transactional(
                rt.store, sender="tx", template="reset", to=f"o{i}@example.net", variables={"name": "N", "code": 1}
            )
        r = redis_client(rt.services.redis_url)
        Queuer(rt.store, rt.services.redis_url, settings).tick(r)
        key = rt.keys.jobs("high")
        r.xgroup_create(key, "workers", id="0", mkstream=True)
        assert len(r.xreadgroup("workers", "dead-worker", {key: ">"}, count=10)[0][1]) == 3  # read, then "killed"
        run_pipeline(rt, settings, lambda: sorted(states(db_url).values()) == ["completed"] * 3)
        assert r.xpending(key, "workers")["pending"] == 0
    assert sink.delivered_to() == {f"o{i}@example.net": 1 for i in range(3)}


def test_inline_read_models_rebuilt_from_the_log_equal_the_live_ones(rt, settings, db_url, env):
    """jobs and the catalogue are kept in the command's transaction; replaying the log gives the same."""
    import json

    from mailflow.outbound import campaigns, segments

    from .conftest import run_cli

    settings = settings.model_copy(update={"retry_base_s": 0.2, "queuer_interval_s": 0.02})
    with SinkServer(Sink(tempfail_times=1)) as server:
        setup_catalog(rt.store, server.url)
        templates.save(rt.store, templates.Template("news", "News for {{ name }}", "<p>Hello {{ name }}</p>"))
        load_contacts(rt.store, 30, extra="bounce-1@example.net,B,NL\ntempfail-1@example.net,T,NL\n")
        segments.define(rt.store, "all", {})
        cid = campaigns.create(rt.store, name="c", sender="tx", template="news", segment="all")
        campaigns.start(rt.store, cid)

        def done():
            with connect(db_url) as c:
                return c.execute("SELECT status FROM campaigns WHERE id = %s", (cid,)).fetchone()[0] == "completed"

        run_pipeline(rt, settings, done)
    tables = ("jobs", "contacts", "suppressions", "segments", "templates", "senders", "campaigns")

    def read():  # every column of every row, timestamps and generated ids included
        with connect(db_url) as c:
            return {t: c.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}

    before = read()
    assert [r[3] for r in before["jobs"]].count("failed") == 1 and before["suppressions"]
    for name in ("jobs", "catalog"):
        res = run_cli(env, "projections", "rebuild", name, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["applied"] > 0
    assert read() == before
    assert run_cli(env, "consume", "jobs").returncode == 2


def test_a_crash_while_sending_is_recorded_as_an_attempt_not_left_active(rt, settings, db_url, monkeypatch):
    """A bug in the send path must not leave a job active with its lease renewed forever."""
    from mailflow.outbound import worker as worker_module

    async def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(worker_module.smtp, "transact", boom)
    settings = settings.model_copy(update={"retry_base_s": 0.05, "retry_max_attempts": 2, "queuer_interval_s": 0.02})
    with SinkServer(Sink()) as server:
        setup_catalog(rt.store, server.url)
        sending.send_transactional(
            rt.store, sender="tx", template="reset", to="ann@example.net", variables={"name": "A", "code": 1}
        )
        run_pipeline(rt, settings, lambda: states(db_url) == {"ann@example.net": "failed"})
    with connect(db_url) as c:
        attempts, kind, reply = c.execute("SELECT attempts, failure_kind, last_reply FROM jobs").fetchone()
    assert (attempts, kind) == (2, "retries_exhausted") and "internal error: RuntimeError('boom')" in reply
