"""Issue 7: the worker and the queuer through a lost PostgreSQL - deterministic cases the chaos test hits by chance.

- SMTP transactions in flight while PostgreSQL is down are recorded when it is back, once.
- A claim or a record whose COMMIT succeeded but whose reply was lost is recognised on the
  retry: the job is neither stranded until its lease expires nor recorded twice.
- Early in a queuer's term, leases that expired only lately are left to their workers.
- A leader whose lock connection dies stops leading (a standby may take over).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from structlog.testing import capture_logs

from mailflow.config import Settings, settings_env
from mailflow.consumers import inline
from mailflow.infra.migrate import migrate
from mailflow.infra.services import connect, redis_client
from mailflow.outbound import sending, templates
from mailflow.outbound import worker as worker_module
from mailflow.outbound.events import JobStarted
from mailflow.outbound.queuer import Queuer
from mailflow.outbound.senders import Sender
from mailflow.outbound.worker import Worker
from mailflow.runtime.wiring import Runtime
from mailflow.testing.sink import Sink, SinkServer

from .conftest import wait_until
from .servers import Blip, PrivatePostgres
from .test_outbound_processes import graph_violations

pytestmark = pytest.mark.process

SECRET = b"outage-test"


@pytest.fixture
def private_pg():
    pg = PrivatePostgres().init()
    pg.start()
    with connect(pg.url) as admin:
        admin.execute("CREATE DATABASE mailflow")
    with connect(pg.url_for("mailflow")) as c:
        migrate(c)
    yield pg
    pg.destroy()


class Pipeline:
    """A queuer and one worker in threads of this process."""

    def __init__(self, rt: Runtime, settings: Settings) -> None:
        self.queuer = Queuer(rt.store, settings.redis_url, settings)
        self.worker = Worker(rt.store, settings.redis_url, settings, SECRET, name="w1")
        self.stop = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.astop = asyncio.Event()
        self.threads = [
            threading.Thread(target=self.queuer.run, args=(self.stop,)),
            threading.Thread(target=self._work),
        ]

    def _work(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.worker.run(self.astop))

    def __enter__(self) -> Pipeline:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.loop.call_soon_threadsafe(self.astop.set)
        for t in self.threads:
            t.join(30)


def _settings(db_url: str, redis_url: str, prefix: str, tmp_path, **kw) -> Settings:
    base = dict(
        database_url=db_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        home=tmp_path / "home",
        job_lease_s=30.0,
        retry_base_s=0.5,
        rate_limits={"*": 100000},
        queuer_interval_s=0.02,
        periodic_duties=False,  # these tests count the mail jobs
    )
    return Settings(**{**base, **kw})


def _catalog(store, relay_url: str) -> None:
    sending.save_sender(store, Sender("tx", "noreply@example.org", "", relay_url))
    templates.save(store, templates.Template("hello", "Hello", "<p>Hi {{ name }}</p>"))


def _send(store, n: int) -> list[str]:
    return [
        sending.send_transactional(
            store, sender="tx", template="hello", to=f"u{i}@example.net", variables={"name": str(i)}
        )[0]
        for i in range(n)
    ]


def _history(db_url: str, jid: str) -> list[tuple[str, dict]]:
    with connect(db_url) as c:
        return c.execute(
            "SELECT type, data FROM events WHERE stream = %s ORDER BY version", (f"default/job-{jid}",)
        ).fetchall()


def _states(db_url: str) -> dict[str, str]:
    with connect(db_url) as c:
        return {str(j): s for j, s in c.execute("SELECT id, state FROM jobs").fetchall()}


def test_sends_in_flight_while_postgresql_is_down_are_recorded_when_it_is_back_and_sent_once(
    private_pg, redis_url, prefix, tmp_path
):
    db_url = private_pg.url_for("mailflow")
    settings = _settings(db_url, redis_url, prefix, tmp_path)
    rt = Runtime(settings, pool_size=8)
    sink = Sink(delay_s=2.0)  # each message is accepted 2 s after its DATA
    try:
        with SinkServer(sink) as server, capture_logs() as logs:
            _catalog(rt.store, server.url)
            jobs = _send(rt.store, 4)
            with Pipeline(rt, settings):
                wait_until(lambda: sum(sink.data_attempts.values()) == 4, 20, what="every message to be in DATA")
                private_pg.stop("fast")  # the workers' bookkeeping has no database now
                wait_until(lambda: len(sink.received) == 4, 10, what="the sends to finish without PostgreSQL")
                time.sleep(6.5)  # outcomes wait in memory; longer than the pool's 5 s wait, so it is an outage
                private_pg.start()
                wait_until(
                    lambda: set(_states(db_url).values()) == {"completed"}, 20, what="the outcomes to be recorded"
                )
        assert sink.delivered_to() == {f"u{i}@example.net": 1 for i in range(4)}
        for jid in jobs:
            hist = _history(db_url, jid)
            assert [t for t, _ in hist] == ["JobCreated", "JobQueued", "JobStarted", "JobCompleted"], hist
            assert graph_violations(hist) == []
        told = [e["event"] for e in logs if str(e.get("event", "")).startswith("worker.postgres_")]
        assert told == ["worker.postgres_unavailable", "worker.postgres_restored"], told
        restored = next(e for e in logs if e.get("event") == "worker.postgres_restored")
        assert restored["outage_s"] >= 1.0
    finally:
        rt.close()


@contextlib.contextmanager
def _commit_reply_lost_once(monkeypatch, method: str):
    """During Worker.<method>: the transaction commits, then the caller sees the connection fail.

    What a PostgreSQL that dies between writing the commit record and answering does.
    """
    inside = threading.local()
    lost: list[str] = []
    original_method = getattr(Worker, method)
    original_writing = inline.writing

    def tracked(self, *args):
        inside.on = True
        try:
            return original_method(self, *args)
        finally:
            inside.on = False

    @contextlib.contextmanager
    def writing(store):
        with original_writing(store) as conn:
            yield conn
        if getattr(inside, "on", False) and not lost:
            lost.append(method)
            raise psycopg.OperationalError("server closed the connection unexpectedly (after COMMIT)")

    monkeypatch.setattr(Worker, method, tracked)
    monkeypatch.setattr(worker_module.inline, "writing", writing)
    yield lost


@pytest.mark.parametrize("method", ["_claim", "_finish"])
def test_a_write_whose_commit_was_not_seen_is_neither_stranded_nor_repeated(
    method, db_url, redis_url, prefix, tmp_path, monkeypatch
):
    settings = _settings(db_url, redis_url, prefix, tmp_path, job_lease_s=60.0)
    rt = Runtime(settings, pool_size=8)
    sink = Sink()
    try:
        with SinkServer(sink) as server, capture_logs() as logs:
            _catalog(rt.store, server.url)
            with _commit_reply_lost_once(monkeypatch, method) as lost:
                jobs = _send(rt.store, 3)
                started = time.monotonic()
                with Pipeline(rt, settings):
                    # Well within the 60 s lease: nothing waits for it to expire.
                    wait_until(lambda: set(_states(db_url).values()) == {"completed"}, 15, what="every job to complete")
                took = time.monotonic() - started
        assert lost == [method], "the fault was not injected"
        assert sink.delivered_to() == {f"u{i}@example.net": 1 for i in range(3)}
        for jid in jobs:
            assert [t for t, _ in _history(db_url, jid)] == ["JobCreated", "JobQueued", "JobStarted", "JobCompleted"]
        assert not [e for e in logs if e.get("event") == "worker.lease_lost"]
        assert took < 15
    finally:
        rt.close()


def _active_with_lease(store, jid: str, lease_until: datetime) -> None:
    with inline.writing(store) as w:
        w.record(
            [
                (
                    f"job-{jid}",
                    JobStarted(job_id=jid, attempt=1, worker="gone", lease_until=lease_until.isoformat()).to_new(),
                )
            ]
        )


def test_early_in_a_queuers_term_lately_expired_leases_are_left_to_their_workers(rt, settings, db_url):
    settings = settings.model_copy(update={"job_lease_s": 20.0, "rate_limits": {"*": 100000}})
    with SinkServer(Sink()) as server:
        _catalog(rt.store, server.url)
    recent, old = _send(rt.store, 2)
    q = Queuer(rt.store, settings.redis_url, settings)
    r = redis_client(settings.redis_url)
    assert q.tick(r) == 2
    now = datetime.now(UTC)
    _active_with_lease(rt.store, recent, now - timedelta(seconds=2))  # its worker may be coming back from an outage
    _active_with_lease(rt.store, old, now - timedelta(seconds=60))  # long dead
    q._term_began = time.monotonic()  # a term that just began (grace: min(20 / 2, 15) = 10 s)
    assert q.reclaim_expired() == 1
    assert _states(db_url) == {recent: "active", old: "retry"}
    q._term_began = time.monotonic() - q.lease_grace_s  # the grace is over
    assert q.reclaim_expired() == 1
    assert _states(db_url)[recent] == "retry"
    r.close()


def test_a_leader_whose_lock_connection_dies_stops_leading_and_one_queuer_leads_after(procs, env, db):
    def holders() -> list[int]:
        return [
            p
            for (p,) in db.execute(
                # pg_locks is the cluster's: other tests' queuers (other databases) hold the same key
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = 7300010 AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()
        ]

    a = procs.start("queuer", env=env)
    wait_until(lambda: a.poll() is None and '"queuer.leader"' in procs.log_of(a), 30, what="the first queuer to lead")
    b = procs.start("queuer", env=env)
    wait_until(lambda: b.poll() is None and '"queuer.standby"' in procs.log_of(b), 30, what="the second to stand by")
    [lock_pid] = holders()
    db.execute("SELECT pg_terminate_backend(%s)", (lock_pid,))
    wait_until(lambda: "leader lock connection was lost" in procs.log_of(a), 10, what="the leader to notice")
    wait_until(lambda: len(holders()) == 1 and holders()[0] != lock_pid, 10, what="a new leader")
    leading = [p for p in (a, b) if procs.log_of(p).count('"queuer.leader"') > (1 if p is a else 0)]
    assert len(leading) == 1, "exactly one queuer took the lock again"
    assert a.poll() is None and b.poll() is None


def test_a_network_blip_to_postgresql_and_redis_stops_no_process_and_loses_no_job(
    private_pg, private_redis_like_tested, procs, tmp_path
):
    """Both servers stay up; the network to them stops carrying packets for 8 s (nothing is
    closed), then carries on. Blocked reads time out, connections are made again."""
    import json
    import os

    from mailflow.outbound import campaigns, segments
    from mailflow.outbound.contacts import import_csv_text

    pg_blip = Blip("127.0.0.1", private_pg.port)
    redis_blip = Blip(str(private_redis_like_tested.sock))
    direct = _settings(private_pg.url_for("mailflow"), private_redis_like_tested.url, "blip", tmp_path)
    via_blips = direct.model_copy(
        update={
            "database_url": f"postgresql://postgres@127.0.0.1:{pg_blip.port}/mailflow",
            "redis_url": f"redis://127.0.0.1:{redis_blip.port}/0",
            "secret_key": "blip",
            "log_format": "json",
            "worker_concurrency": 16,
            "job_lease_s": 60.0,
        }
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFLOW_")}
    env.update(settings_env(via_blips))
    rt = Runtime(direct, pool_size=4)
    sink = Sink(delay_s=0.1)
    n = 300
    try:
        with SinkServer(sink) as server:
            _catalog(rt.store, server.url)
            templates.save(rt.store, templates.Template("news", "News", "<p>Hello {{ name }}</p>"))
            import_csv_text(rt.store, "email,name\n" + "\n".join(f"r{i}@example.net,R{i}" for i in range(n)) + "\n")
            segments.define(rt.store, "all", {})
            cid = campaigns.create(rt.store, name="blip", sender="tx", template="news", segment="all")
            queuer = procs.start("queuer", env=env)
            worker = procs.start("worker", "--name", "w1", env=env)
            campaigns.start(rt.store, cid)
            done = lambda: sum(1 for s in _states(direct.database_url).values() if s == "completed")  # noqa: E731
            wait_until(lambda: done() >= 40, 60, what="the campaign to be under way")
            pg_blip.freeze()
            redis_blip.freeze()
            time.sleep(8)
            assert queuer.poll() is None and worker.poll() is None
            pg_blip.thaw()
            redis_blip.thaw()
            wait_until(
                lambda: queuer.poll() is None and worker.poll() is None and done() == n,
                90,
                what="every job to complete after the blip",
            )
            for p in (queuer, worker):
                p.send_signal(__import__("signal").SIGTERM)
                assert p.wait(30) == 0, procs.log_of(p)[-3000:]
        assert sink.delivered_to() == {f"r{i}@example.net": 1 for i in range(n)}
        # Whatever each process ran into first (a Redis read timing out, or a statement that just
        # waited for the frozen PostgreSQL), an outage it saw is told once and its end once.
        for p, role in ((queuer, "queuer"), (worker, "worker")):
            events = [json.loads(line).get("event") for line in procs.log_of(p).splitlines() if line.startswith("{")]
            for svc in ("postgres", "redis"):
                lost, back = events.count(f"{role}.{svc}_unavailable"), events.count(f"{role}.{svc}_restored")
                assert lost <= 1 and back == lost, (role, svc, events)
    finally:
        pg_blip.close()
        redis_blip.close()
        rt.close()


def test_mailflow_web_says_503_while_postgresql_is_down_and_200_again_after_without_restarting(
    private_pg, procs, env, tmp_path
):
    import httpx

    from .servers import free_port

    port = free_port()
    web_env = dict(env, MAILFLOW_DATABASE_URL=private_pg.url_for("mailflow"))
    web = procs.start("web", "--port", str(port), env=web_env)

    def health() -> tuple[int, dict] | None:
        try:
            res = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=8)
        except httpx.HTTPError:
            return None
        return res.status_code, res.json()

    wait_until(lambda: web.poll() is None and (h := health()) and h[0] == 200, 30, what="`mailflow web` to be healthy")
    private_pg.stop("fast")
    status, body = wait_until(lambda: (h := health()) and h[0] == 503 and h, 20, what="/healthz to say 503")
    assert body["ok"] is False and body["database"] == "unavailable" and body["error"]
    private_pg.start()
    wait_until(lambda: web.poll() is None and (h := health()) and h[0] == 200, 20, what="/healthz to say 200 again")
    lines = [line for line in procs.log_of(web).splitlines() if '"web.postgres_' in line]
    assert len(lines) == 2 and "unavailable" in lines[0] and "restored" in lines[1], lines
    assert web.poll() is None


@pytest.mark.parametrize("what", ["database", "role"])
def test_a_long_running_process_with_a_wrong_database_or_role_stops_at_once_with_one_line(env, pg_admin_url, what):
    """Waiting is for servers that are away; a name that does not exist will not appear by waiting."""
    import subprocess
    import sys

    bad = psycopg.conninfo.make_conninfo(
        pg_admin_url, **({"dbname": "no_such_db"} if what == "database" else {"user": "no_such_role"})
    )
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "mailflow", "queuer"],
        env=dict(env, MAILFLOW_DATABASE_URL=bad),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 3 and time.monotonic() - started < 30
    [line] = res.stderr.splitlines()
    assert (
        line.startswith("error: cannot connect to PostgreSQL")
        and f"no_such_{'db' if what == 'database' else 'role'}" in line
    )
    assert "queuer.postgres_unavailable" not in res.stdout
