"""Chaos: a campaign with a real backlog, a slow SMTP peer and faults at random moments, repeated.

The pipeline runs as separate OS processes - relay, the event_counts consumer, a leading and
a standby queuer, two workers - against a PostgreSQL cluster and a Redis server of this
test's own. While a campaign drains into an SMTP sink that takes 0.4 s per message and
answers 451 to about 3% of recipients, and transactional mail keeps coming, every kind of
fault is injected at least once, in a random order, at random moments: kill -9 of each
process kind (restarted as systemd would), FLUSHALL, a Redis restart without persistence,
`pg_ctl restart -m fast`, `pg_ctl restart -m immediate` (a crash) and PostgreSQL down for
seconds. Then the truths:

- every job ends completed or failed, the campaign completes, no process exited on its own
  and every one stops with exit 0 on SIGTERM;
- every completed job's message reached the sink; duplicates are no more than the messages
  a killed worker had in flight, and only those;
- every job's history follows the state graph, and the jobs table, the catalogue and
  event_counts equal a rebuild from the log;
- transactional mail met its 30 s SLA, also when created around a PostgreSQL restart;
- each outage was reported once per process (`*_unavailable`, then `*_restored`), and a
  worker's status file said so while PostgreSQL was down.

Marked `chaos`: `.ci/run` runs it once (`pytest -m chaos`); run it in a loop with
MAILFLOW_CHAOS_ITERATIONS=20 (MAILFLOW_CHAOS_SEED makes a run repeatable,
MAILFLOW_CHAOS_REPORT=file appends one JSON line per iteration).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter

import psycopg
import pytest
import redis

from mailflow.config import Settings, settings_env
from mailflow.errors import ServiceUnavailable
from mailflow.infra.health import read_statuses
from mailflow.infra.migrate import migrate
from mailflow.infra.services import connect
from mailflow.outbound import campaigns, contacts, segments, sending, templates
from mailflow.outbound.contacts import import_csv_text
from mailflow.outbound.senders import Sender
from mailflow.runtime.projections import inline_projections
from mailflow.runtime.wiring import Runtime
from mailflow.tenants import registry
from mailflow.testing.sink import FaultRates, Sink, SinkServer

from .conftest import Processes, run_cli, wait_until
from .servers import PrivatePostgres
from .test_outbound_processes import graph_violations, receptions
from .test_processes import counts_table, counts_truth

pytestmark = [pytest.mark.chaos, pytest.mark.process]

ITERATIONS = int(os.environ.get("MAILFLOW_CHAOS_ITERATIONS", "1"))
SEED = os.environ.get("MAILFLOW_CHAOS_SEED")
RECIPIENTS = int(os.environ.get("MAILFLOW_CHAOS_RECIPIENTS", "2000"))
BETA_RECIPIENTS = RECIPIENTS // 4  # a second tenant's campaign, sent beside the first
ERASED = (("default", "reader11@example.net"), ("beta", "reader12@example.net"))
LEASE_S = 12.0
SLA_HIGH_S = 30.0
KILLS = ("kill_worker", "kill_queuer", "kill_relay", "kill_consumer")
FAULTS = (*KILLS, "flushall", "redis_restart", "pg_restart_fast", "pg_restart_immediate", "pg_outage")
PG_FAULTS = ("pg_restart_fast", "pg_restart_immediate", "pg_outage")


class Fleet:
    """The pipeline's processes by name; a killed one is started again under the same name."""

    def __init__(self, procs: Processes, env: dict[str, str]) -> None:
        self.procs = procs
        self.env = env
        self.args: dict[str, tuple[str, ...]] = {}
        self.live: dict[str, subprocess.Popen[bytes]] = {}
        self.history: list[tuple[str, subprocess.Popen[bytes], float]] = []  # every process ever started

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self.args[name] = args or self.args[name]
        p = self.procs.start(*self.args[name], env=self.env)
        self.live[name] = p
        self.history.append((name, p, time.monotonic()))
        return p

    def kill(self, name: str) -> None:
        p = self.live.pop(name)
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def check(self) -> None:
        for name, p in self.live.items():
            if p.poll() is not None:
                raise AssertionError(
                    f"{name} exited on its own with code {p.returncode}:\n{self.procs.log_of(p)[-4000:]}"
                )

    def log_events(self, p: subprocess.Popen[bytes]) -> list[dict]:
        out = []
        for line in self.procs.log_of(p).splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop_all(self, timeout: float = 60) -> dict[str, int]:
        for p in self.live.values():
            p.send_signal(signal.SIGTERM)
        return {name: p.wait(timeout) for name, p in self.live.items()}


class Transactional(threading.Thread):
    """Receipts every second or two while the campaign runs, each retried until PostgreSQL takes it
    (the same idempotency key, so a commit that was not seen does not make two)."""

    def __init__(self, store, rng: random.Random) -> None:
        super().__init__(daemon=True, name="chaos-transactional")
        self.store = store
        self.rng = rng
        self.jobs: list[str] = []
        self.stop = threading.Event()
        self.now = threading.Event()
        self.error: BaseException | None = None

    def send_one(self) -> None:
        n = len(self.jobs)
        deadline = time.monotonic() + 60
        while True:
            try:
                jid, _ = sending.send_transactional(
                    self.store,
                    sender="tx",
                    template="receipt",
                    to=f"buyer{n}@example.com",
                    variables={"order": f"A-{n}"},
                    idempotency_key=f"chaos-receipt-{n}",
                )
                self.jobs.append(jid)
                return
            except (psycopg.Error, OSError) as exc:  # PostgreSQL is away: try again, as any client would
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not create a transactional job for 60 s: {exc}") from exc
                time.sleep(0.1)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.now.wait(self.rng.uniform(0.8, 2.5))
                self.now.clear()
                self.send_one()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def erase_through_faults(store, email: str) -> None:
    """`contacts erase` as an operator would run it mid-incident: again until PostgreSQL takes it
    (erasing twice is not an error, so a commit that was not seen does no harm)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            contacts.erase(store, email, actor="chaos")
            return
        except (psycopg.Error, OSError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not erase {email} for 60 s: {exc}") from exc
            time.sleep(0.1)


class Db:
    """The test's own queries, through PostgreSQL restarts: reconnect and ask again."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.Connection | None = None

    def execute(self, sql: str, params: object = None) -> list[tuple]:
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = connect(self.url)
                return self.conn.execute(sql, params).fetchall()
            except (psycopg.OperationalError, ServiceUnavailable):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _pause(fleet: Fleet, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        fleet.check()
        time.sleep(0.05)


def _table(db: psycopg.Connection, name: str) -> list[tuple]:
    return sorted(map(tuple, db.execute(f"SELECT * FROM {name}").fetchall()), key=repr)


def _states(db: Db | psycopg.Connection) -> Counter:
    rows = db.execute("SELECT state, count(*) FROM jobs GROUP BY 1")
    return Counter(dict(rows if isinstance(rows, list) else rows.fetchall()))


@pytest.mark.parametrize("iteration", range(ITERATIONS))
def test_a_campaign_under_random_faults_loses_nothing_and_sends_twice_only_what_was_in_flight(
    iteration, private_redis_like_tested, tmp_path, record_property
):
    seed = int(SEED) + iteration if SEED else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"\nchaos iteration {iteration}: seed {seed}, {RECIPIENTS} recipients")
    pr = private_redis_like_tested
    pg = PrivatePostgres().init()
    pg.start()
    sink = Sink(delay_s=0.4, tempfail_times=1, rates=FaultRates(tempfail=30))
    procs = Processes({}, tmp_path)
    try:
        with connect(pg.url) as admin:
            admin.execute("CREATE DATABASE mailflow")
        db_url = pg.url_for("mailflow")
        with connect(db_url) as c:
            migrate(c)
        settings = Settings(
            database_url=db_url,
            redis_url=pr.url,
            redis_prefix="chaos",
            home=tmp_path / "home",
            job_lease_s=LEASE_S,
            retry_base_s=0.5,
            rate_limits={"*": 100000},
            queuer_interval_s=0.05,
            worker_concurrency=32,
            worker_connections_per_relay=8,
            consumer_block_ms=500,
            consumer_claim_idle_ms=5000,
            relay_poll_interval_s=0.5,
            secret_key="chaos-test",
            log_format="json",
            periodic_duties=False,  # the checks below count the campaign's jobs
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFLOW_")}
        env.update(settings_env(settings))
        procs.env = env
        rt = Runtime(settings, pool_size=8)
        try:
            report = _run(rt, settings, pg, pr, sink, procs, env, rng, seed, iteration)
        except BaseException as exc:
            _report({"iteration": iteration, "seed": seed, "failed": f"{type(exc).__name__}: {exc}"[:3000]})
            raise
    finally:
        procs.stop_all()
        pg.destroy()
    print(json.dumps(report))
    for k in ("duplicates", "in_flight_at_kills", "max_tx_latency_s", "max_tx_latency_near_pg_restart_s"):
        record_property(k, report[k])
    _report(report)


def _report(line: dict) -> None:
    if os.environ.get("MAILFLOW_CHAOS_REPORT"):
        with open(os.environ["MAILFLOW_CHAOS_REPORT"], "a") as fh:
            fh.write(json.dumps(line) + "\n")


def _run(rt, settings, pg, pr, sink, procs, env, rng, seed, iteration) -> dict:
    store = rt.store
    faults: list[dict] = []
    in_flight: set[str] = set()
    db = Db(settings.database_url)
    with SinkServer(sink) as server:
        relay_url = server.relay_url(timeout_s=10)
        sending.save_sender(store, Sender("news", "news@example.org", "News", relay_url))
        sending.save_sender(store, Sender("tx", "shop@example.org", "Shop", relay_url))
        templates.save(store, templates.Template("news", "News for {{ name }}", "<p>Hello {{ name }}</p>"))
        templates.save(store, templates.Template("receipt", "Order {{ order }}", "<p>Thanks, order {{ order }}</p>"))
        rows = "\n".join(f"reader{i}@example.net,Reader {i}" for i in range(RECIPIENTS))
        assert import_csv_text(store, "email,name\n" + rows + "\n").imported == RECIPIENTS
        segments.define(store, "all", {})
        cid = campaigns.create(store, name="chaos", sender="news", template="news", segment="all")
        # A second tenant sends through the same processes, with its own sender of the same name.
        operator = Runtime(settings, pool_size=2, operator=True)
        registry.create(operator.store, "beta")
        beta = operator.store.for_tenant("beta")
        sending.save_sender(beta, Sender("news", "news@beta.example", "Beta", relay_url))
        templates.save(beta, templates.Template("news", "Beta news for {{ name }}", "<p>Hi {{ name }}</p>"))
        rows = "\n".join(f"reader{i}@example.net,Beta {i}" for i in range(BETA_RECIPIENTS))
        assert import_csv_text(beta, "email,name\n" + rows + "\n").imported == BETA_RECIPIENTS
        segments.define(beta, "all", {})
        beta_cid = campaigns.create(beta, name="chaos", sender="news", template="news", segment="all")

        fleet = Fleet(procs, env)
        fleet.start("relay", "relay")
        fleet.start("consumer", "consume", "event_counts", "--consumer-id", "c1")
        fleet.start("queuer-a", "queuer")
        fleet.start("queuer-b", "queuer")
        fleet.start("w1", "worker", "--name", "w1")
        fleet.start("w2", "worker", "--name", "w2")
        wait_until(
            lambda: (
                fleet.check() is None
                and all(
                    any(e.get("event") == "worker.start" for e in fleet.log_events(fleet.live[w])) for w in ("w1", "w2")
                )
            ),
            60,
            what="the workers to start",
        )
        assert campaigns.start(store, cid) == RECIPIENTS
        assert campaigns.start(beta, beta_cid) == BETA_RECIPIENTS
        tx = Transactional(store, random.Random(seed + 1))
        tx.start()
        wait_until(
            lambda: fleet.check() is None and _states(db)["completed"] >= RECIPIENTS * 0.03,
            60,
            what="the campaign to be under way",
        )

        schedule = list(FAULTS) + rng.choices(FAULTS, k=3)
        rng.shuffle(schedule)
        # People erased while their mail is being sent, between two faults chosen at random.
        erase_at = dict(zip(rng.sample(range(len(schedule)), 2), ERASED))
        started = time.monotonic()
        for i, kind in enumerate(schedule):
            _pause(fleet, rng.uniform(1.0, 4.0))
            if i in erase_at:
                tenant, email = erase_at[i]
                erase_through_faults(store if tenant == "default" else beta, email)
            done = _states(db)
            fault = {
                "kind": kind,
                "t": round(time.monotonic() - started, 1),
                "terminal": done["completed"] + done["failed"],
            }
            t0 = time.monotonic()
            if kind in KILLS:
                role = kind.removeprefix("kill_")
                name = rng.choice(
                    sorted(n for n in fleet.live if n.startswith({"worker": "w", "queuer": "queuer"}.get(role, role)))
                )
                fleet.kill(name)
                fault["process"] = name
                if role == "worker":
                    held = {
                        str(j)
                        for (j,) in db.execute("SELECT id FROM jobs WHERE state = 'active' AND worker = %s", (name,))
                    }
                    in_flight |= held
                    fault["in_flight"] = len(held)
                _pause(fleet, rng.uniform(0.3, 2.0))  # systemd's RestartSec
                fleet.start(name)
            elif kind == "flushall":
                fault["queued"] = _states(db)["queued"]
                redis.Redis.from_url(pr.url).flushall()
            elif kind == "redis_restart":
                pr.stop()
                _pause(fleet, rng.uniform(0.5, 3.0))
                pr.start()
            else:
                tx.now.set()  # a receipt created just before
                _pause(fleet, 0.2)
                if kind == "pg_outage":
                    pg.stop("fast")
                    down = rng.uniform(3.0, 6.0)
                    _pause(fleet, 2.5)
                    degraded = [
                        st["name"]
                        for st in read_statuses(settings.home)
                        if st["role"] == "worker" and not st["services"]["postgres"]["ok"]
                    ]
                    fault["workers_reporting_outage"] = sorted(degraded)
                    _pause(fleet, down - 2.5)
                    pg.start()
                else:
                    pg.restart("fast" if kind == "pg_restart_fast" else "immediate")
                tx.now.set()  # and one just after
            fault["took_s"] = round(time.monotonic() - t0, 2)
            fault["t_end"] = round(time.monotonic() - started, 1)
            faults.append(fault)
            print(f"  {fault}")

        tx.stop.set()
        tx.now.set()
        tx.join(70)
        assert tx.error is None, tx.error
        total = RECIPIENTS + BETA_RECIPIENTS + len(tx.jobs)

        def finished() -> bool:
            fleet.check()
            st = _states(db)
            return st["completed"] + st["failed"] == total

        try:
            wait_until(finished, 240, interval=0.2, what="every job to end")
        except AssertionError:
            stuck = db.execute(
                "SELECT state, worker, count(*) FROM jobs WHERE state NOT IN ('completed', 'failed') GROUP BY 1, 2"
            )
            raise AssertionError(f"unfinished jobs after the faults: {stuck}; faults: {faults}") from None
        wait_until(
            lambda: (
                [r[0] for r in db.execute("SELECT status FROM campaigns WHERE id IN (%s, %s)", (cid, beta_cid))]
                == ["completed", "completed"]
            ),
            20,
            what="both tenants' campaigns to complete",
        )
        head = store.sync()
        wait_until(
            lambda: (
                fleet.check() is None
                and db.execute("SELECT position FROM consumer_checkpoints WHERE consumer = 'event_counts'")[0][0]
                == head
            ),
            60,
            what="event_counts to reach the head",
        )
        elapsed = time.monotonic() - started
        codes = fleet.stop_all()
        assert codes == dict.fromkeys(codes, 0), f"exit codes after SIGTERM: {codes}"
        db.close()

    # -- the truths (PostgreSQL is left alone from here on) -------------------------------------
    with connect(settings.database_url) as db:
        # Every recipient accepts in the end, except an erased person whose job had not been sent
        # when the erasure came: that job ends failed, for that reason and no other.
        st = _states(db)
        failed = db.execute(
            "SELECT j.id, j.tenant, j.last_reply, j.failure_kind, e.subject IS NOT NULL FROM jobs j"
            " LEFT JOIN erased_subjects e ON (e.tenant, e.subject) = (j.tenant, j.subject) WHERE j.state = 'failed'"
        ).fetchall()
        assert all(r[2:] == (contacts.ERASED_REPLY, "suppressed", True) for r in failed), f"failed jobs: {failed}"
        assert st == Counter(completed=total - len(failed), failed=len(failed)), f"job states {dict(st)}"
        got = receptions(sink)
        completed = {str(j) for (j,) in db.execute("SELECT id FROM jobs WHERE state = 'completed'").fetchall()}
        missing = completed - set(got)
        assert not missing, f"{len(missing)} completed job(s) whose message the sink never received"
        # Each tenant's mail went out from its own sender, to the same addresses.
        tenant_of = {str(j): t for j, t in db.execute("SELECT id, tenant FROM jobs").fetchall()}
        with sink.lock:
            froms = {(tenant_of[str(m["Message-ID"]).strip("<>").split("@")[0]], str(m["From"])) for m in sink.received}
        assert {f for t, f in froms if t == "beta"} == {"Beta <news@beta.example>"}
        assert {f for t, f in froms if t == "default"} == {"News <news@example.org>", "Shop <shop@example.org>"}
        # The erased: their jobs ended and kept their rows, without the address; nothing about
        # them can be opened any more.
        for tenant, email in ERASED:
            left = db.execute(
                "SELECT (SELECT count(*) FROM jobs WHERE tenant = %s AND email = %s)"
                " + (SELECT count(*) FROM contacts WHERE tenant = %s AND email = %s)",
                (tenant, email, tenant, email),
            ).fetchone()[0]
            assert left == 0, f"{email} is still in {tenant}'s rows after its erasure"
        assert db.execute("SELECT count(*) FROM erased_subjects").fetchone()[0] == len(ERASED)
        assert db.execute(
            "SELECT count(*) FROM jobs j JOIN erased_subjects e ON (e.tenant, e.subject) = (j.tenant, j.subject)"
            " WHERE j.email IS NULL AND j.state IN ('completed', 'failed')"
        ).fetchone()[0] == len(ERASED)
        dups = {jid: n - 1 for jid, n in got.items() if n > 1}
        n_dups = sum(dups.values())
        assert n_dups <= len(in_flight), f"{n_dups} duplicates, {len(in_flight)} in flight at the kills"
        assert set(dups) <= in_flight, f"duplicated but not in flight at a kill: {set(dups) - in_flight}"

        rows = db.execute(
            "SELECT j.id, e.type, e.data FROM jobs j JOIN events e ON e.stream = j.tenant || '/job-' || j.id::text"
            " ORDER BY j.id, e.version"
        ).fetchall()
        hist: dict[str, list] = {}
        for jid, etype, data in rows:
            hist.setdefault(str(jid), []).append((etype, data))
        bad = {jid: v for jid, evs in hist.items() if (v := graph_violations(evs))}
        assert bad == {}, f"state graph violated: {list(bad.items())[:5]}"

        for name, proj in inline_projections().items():
            before = {t: _table(db, t) for t in proj.tables}
            proj.rebuild(operator.store)
            assert {t: _table(db, t) for t in proj.tables} == before, f"{name} differs from its rebuild"
        counted = counts_table(db)
        assert sum(counted.values()) == head and counted == counts_truth(db), "event_counts differs from the log"
        res = run_cli(env, "projections", "rebuild", "event_counts", "--json")
        assert res.returncode == 0, res.stderr
        assert counts_table(db) == counted
        assert db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
        operator.close()

        latency = {
            str(j): float(s)
            for j, s in db.execute(
                "SELECT id, extract(epoch FROM accepted_at - created_at) FROM jobs WHERE id = ANY(%s::uuid[])",
                (tx.jobs,),
            ).fetchall()
        }
        created = {
            str(j): c
            for j, c in db.execute(
                "SELECT id, extract(epoch FROM created_at) FROM jobs WHERE id = ANY(%s::uuid[])", (tx.jobs,)
            ).fetchall()
        }
        t_start_wall = time.time() - (time.monotonic() - started)

        def near(kinds: tuple[str, ...]) -> list[float]:
            """Latencies of the receipts created from 3 s before such a fault to 3 s after it ended."""
            windows = [(f["t"], f["t_end"]) for f in faults if f["kind"] in kinds]
            return [
                latency[j]
                for j in tx.jobs
                if any(a - 3 <= float(created[j]) - t_start_wall <= b + 3 for a, b in windows)
            ]

        near_restart = near(("pg_restart_fast", "pg_restart_immediate"))
        near_outage = near(("pg_outage",))
        max_tx = max(latency.values())
        assert max_tx < SLA_HIGH_S, f"a transactional message took {max_tx:.1f} s (SLA {SLA_HIGH_S:.0f} s)"

        # Outages: told once per process and outage, and ended; the workers' status said so meanwhile.
        lived: Counter = Counter()
        for name, p, began in fleet.history:
            evs = fleet.log_events(p)
            for svc, kinds in (("postgres", PG_FAULTS), ("redis", ("redis_restart",))):
                lost = [e for e in evs if str(e.get("event", "")).endswith(f".{svc}_unavailable")]
                back = [e for e in evs if str(e.get("event", "")).endswith(f".{svc}_restored")]
                n_faults = sum(1 for f in faults if f["kind"] in kinds and began - started <= f["t_end"])
                assert len(lost) <= n_faults, f"{name}: {len(lost)} {svc} outages reported for {n_faults} faults"
                if p.returncode == 0:  # lived to the end: every outage it saw ended
                    assert len(back) == len(lost), f"{name}: {len(lost)} {svc} outages, {len(back)} ended"
                lived[svc] += len(lost)
        for f in faults:
            if f["kind"] == "pg_outage":
                assert f["workers_reporting_outage"], f"no worker's status showed PostgreSQL down: {f}"
        republished = sum(
            e.get("count", 0)
            for _, p, _ in fleet.history
            for e in fleet.log_events(p)
            if e.get("event") == "queuer.republished"
        )
        retries = int(db.execute("SELECT count(*) FROM events WHERE type = 'JobRetryScheduled'").fetchone()[0])

    return {
        "iteration": iteration,
        "seed": seed,
        "recipients": RECIPIENTS,
        "transactional": len(tx.jobs),
        "seconds": round(elapsed, 1),
        "faults": [f["kind"] for f in faults],
        "duplicates": n_dups,
        "in_flight_at_kills": len(in_flight),
        "max_tx_latency_s": round(max_tx, 2),
        "max_tx_latency_near_pg_restart_s": round(max(near_restart, default=0.0), 2),
        "tx_near_pg_restart": len(near_restart),
        "max_tx_latency_near_pg_outage_s": round(max(near_outage, default=0.0), 2),
        "tx_near_pg_outage": len(near_outage),
        "pg_outages_s": [f["took_s"] for f in faults if f["kind"] == "pg_outage"],
        "republished": republished,
        "outages_reported": dict(lived),
        "retries": retries,
    }
