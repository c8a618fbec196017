"""End to end: real `mailflow queuer` and `mailflow worker` processes against a real SMTP server.

The catalogue (sender, template, contacts, segment, campaign) is written in process through
the Python API; the pipeline runs as subprocesses, and every fault is real: kill -9 of a
worker or of the queuer mid-campaign, SIGTERM with sends in flight, a standby queuer taking
over, and an SMTP server answering 4xx, 5xx, slowly, or dropping the connection.

The truth every check compares with: what the SMTP sink received (per Message-ID, which
names the job), the jobs table, and the job events.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from mailflow.outbound import campaigns, segments, sending, templates
from mailflow.outbound.contacts import import_csv_text
from mailflow.outbound.senders import Sender
from mailflow.testing.sink import Sink, SinkServer

from .conftest import Processes, wait_until

pytestmark = pytest.mark.process

GROUP = "workers"
LEASE_S = 3


# -- helpers ------------------------------------------------------------------------------

# The installed `mailflow` script, as systemd runs it. (conftest's `python -m mailflow.cli`
# does not see the outbound commands: run as __main__, cli.py gets a second `app`, and
# cli_outbound registers its commands on the imported mailflow.cli.app instead.)
_SCRIPT = Path(sys.executable).with_name("mailflow")
MAILFLOW = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-c", "from mailflow.cli import main; main()"]


def mailflow_cmd(*args: str) -> list[str]:
    return [*MAILFLOW, *args]


class OutboundProcesses(Processes):
    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{args[0]}-{len(self.procs)}.log", "wb")
        p = subprocess.Popen(mailflow_cmd(*args), env=env or self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p


@pytest.fixture
def procs(env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    ps = OutboundProcesses(env, tmp_path)
    yield ps
    ps.stop_all()


def pipeline_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    e = dict(env)
    e.update(
        MAILFLOW_JOB_LEASE_S=str(LEASE_S),
        MAILFLOW_RETRY_BASE_S="0.2",
        MAILFLOW_RATE_LIMITS='{"*": 100000}',
        MAILFLOW_QUEUER_INTERVAL_S="0.02",
        MAILFLOW_WORKER_CONCURRENCY="8",
        MAILFLOW_WORKER_CONNECTIONS_PER_RELAY="4",
        # Every process signs with the same key (none of them races to create secret.key).
        MAILFLOW_SECRET_KEY="outbound-processes-test",
    )
    e.update(extra)
    return e


def setup_campaign(store, relay_url: str, locals_: list[str], name: str = "spring") -> str:
    """Sender, template, contacts <local>@example.net, segment `all`, a draft campaign."""
    sending.save_sender(store, Sender("news", "news@example.org", "Example News", relay_url))
    templates.save(
        store, templates.Template("news", "News for {{ name }}", "<p>Hello {{ name }}</p>", "Hello {{ name }}")
    )
    rows = "\n".join(f"{lp}@example.net,{lp.title()}" for lp in locals_)
    report = import_csv_text(store, "email,name\n" + rows + "\n")
    assert report.imported == len(locals_) and not report.rejected
    segments.define(store, "all", {})
    return campaigns.create(store, name=name, sender="news", template="news", segment="all")


def alive(procs: Processes, *ps: subprocess.Popen[bytes]) -> bool:
    """True if every process still runs; otherwise fail at once with the dead one's log."""
    for p in ps:
        if p.poll() is not None:
            raise AssertionError(
                f"`mailflow {' '.join(p.args[len(MAILFLOW) :])}` exited with code {p.returncode}:\n"
                + procs.log_of(p)[-4000:]
            )
    return True


def in_log(procs: Processes, p: subprocess.Popen[bytes], event: str) -> bool:
    return f'"event": "{event}"' in procs.log_of(p)


def log_events(procs: Processes, p: subprocess.Popen[bytes]) -> list[str]:
    out = []
    for line in procs.log_of(p).splitlines():
        try:
            out.append(json.loads(line)["event"])
        except (ValueError, KeyError, TypeError):
            pass
    return out


def start_workers(procs: Processes, env: dict[str, str], *names: str) -> list[subprocess.Popen[bytes]]:
    ws = [procs.start("worker", "--name", n, env=env) for n in names]
    wait_until(
        lambda: alive(procs, *ws) and all(in_log(procs, w, "worker.start") for w in ws), 30, what="workers to start"
    )
    return ws


def start_queuer(procs: Processes, env: dict[str, str]) -> subprocess.Popen[bytes]:
    q = procs.start("queuer", env=env)
    wait_until(lambda: alive(procs, q) and in_log(procs, q, "queuer.leader"), 30, what="the queuer to lead")
    return q


def stop(*ps: subprocess.Popen[bytes], timeout: float = 15) -> list[int]:
    """SIGTERM, wait, return the exit codes."""
    for p in ps:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    return [p.wait(timeout) for p in ps]


def job_states(db: psycopg.Connection, cid: str) -> Counter:
    return Counter(
        dict(db.execute("SELECT state, count(*) FROM jobs WHERE campaign_id = %s GROUP BY 1", (cid,)).fetchall())
    )


def active_of(db: psycopg.Connection, worker: str) -> set[str]:
    rows = db.execute("SELECT id FROM jobs WHERE state = 'active' AND worker = %s", (worker,)).fetchall()
    return {str(r[0]) for r in rows}


def stuck_report(db: psycopg.Connection, r: redis.Redis, prefix: str) -> str:
    """Unfinished jobs, and which worker's pending-entries list holds their stream entries."""
    rows = db.execute(
        "SELECT id, state, worker, queue_seq, attempts, lease_until FROM jobs"
        " WHERE state NOT IN ('completed', 'failed') ORDER BY queue_seq NULLS LAST LIMIT 20"
    ).fetchall()
    holders: dict[str, str] = {}
    for p in ("high", "normal", "low"):
        try:
            for e in r.xpending_range(f"{prefix}:jobs:{p}", GROUP, "-", "+", 10_000):
                holders[e["message_id"].decode().split("-")[0]] = e["consumer"].decode()
        except redis.ResponseError:
            pass
    lines = [
        f"  job {jid} {state} worker={w} queue_seq={seq} attempts={a} lease_until={lease}"
        f" stream entry pending for consumer={holders.get(str(seq))}"
        for jid, state, w, seq, a, lease in rows
    ]
    return "\n".join(lines) or "  (none)"


def wait_campaign_done(db, r, prefix, procs, ps, cid: str, total: int, timeout: float) -> Counter:
    """Until every job of the campaign is completed or failed; on timeout, say which are stuck and where."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive(procs, *ps)
        st = job_states(db, cid)
        if st["completed"] + st["failed"] == total:
            return st
        time.sleep(0.1)
    raise AssertionError(
        f"after {timeout} s the campaign still has unfinished jobs {dict(job_states(db, cid))}:\n"
        + stuck_report(db, r, prefix)
    )


def receptions(sink: Sink) -> Counter:
    """How many times the sink accepted each job's message (Message-ID <job id@domain>)."""
    with sink.lock:
        return Counter(str(m["Message-ID"]).strip("<>").split("@")[0] for m in sink.received)


def duplicates(sink: Sink) -> dict[str, int]:
    return {jid: n - 1 for jid, n in receptions(sink).items() if n > 1}


def history(db: psycopg.Connection, cid: str) -> dict[str, list[tuple[str, dict]]]:
    """Every job of the campaign: its events, in order."""
    rows = db.execute(
        "SELECT j.id, e.type, e.data FROM jobs j JOIN events e ON e.stream = j.tenant || '/job-' || j.id::text"
        " WHERE j.campaign_id = %s ORDER BY j.id, e.version",
        (cid,),
    ).fetchall()
    out: dict[str, list[tuple[str, dict]]] = {}
    for jid, etype, data in rows:
        out.setdefault(str(jid), []).append((etype, data if isinstance(data, dict) else json.loads(data)))
    return out


def graph_violations(events: list[tuple[str, dict]]) -> list[str]:
    """Invariant 5 over one job's events: pending -> queued -> active -> completed | failed |
    retry, retry -> queued; a finish belongs to the attempt that is active."""
    state, attempt, bad = None, 0, []
    for etype, data in events:
        if etype == "JobCreated" and state is None:
            state = "pending"
        elif etype == "JobQueued" and state in ("pending", "retry"):
            state = "queued"
        elif etype == "JobStarted" and state == "queued":
            state, attempt = "active", data["attempt"]
        elif (
            etype in ("JobCompleted", "JobFailed", "JobRetryScheduled")
            and state == "active"
            and data.get("attempt") == attempt
        ):
            state = {"JobCompleted": "completed", "JobFailed": "failed", "JobRetryScheduled": "retry"}[etype]
        else:
            bad.append(f"{etype}(attempt {data.get('attempt')}) while {state} (attempt {attempt})")
    return bad


# -- a. kill -9 a worker ------------------------------------------------------------------


def test_a_worker_killed_mid_campaign_loses_nothing_and_resends_only_what_was_in_flight(
    procs, env, store, db, r, prefix, record_property
):
    penv = pipeline_env(env)
    sink = Sink(delay_s=0.05)
    recipients = [f"user{i}" for i in range(300)]
    with SinkServer(sink) as server:
        cid = setup_campaign(store, server.url, recipients)
        queuer = start_queuer(procs, penv)
        w1, w2 = start_workers(procs, penv, "w1", "w2")
        assert campaigns.start(store, cid) == len(recipients)

        # Kill w1 while it has sends in flight, a good way into the campaign.
        wait_until(
            lambda: (
                alive(procs, queuer, w1, w2)
                and job_states(db, cid)["completed"] >= 60
                and len(active_of(db, "w1")) >= 2
            ),
            30,
            interval=0.01,
            what="w1 to be sending mid-campaign",
        )
        w1.kill()
        w1.wait(10)
        # w1 can change nothing any more; its leases (3 s) have not expired yet.
        in_flight = active_of(db, "w1")
        done_at_kill = job_states(db, cid)["completed"]
        w1b = procs.start("worker", "--name", "w1", env=penv)  # restarted under the same name, as systemd would

        try:
            wait_campaign_done(db, r, prefix, procs, [queuer, w1b, w2], cid, len(recipients), 20)
            wait_until(
                lambda: db.execute("SELECT status FROM campaigns WHERE id = %s", (cid,)).fetchone()[0] == "completed",
                10,
                what="the campaign to be marked completed",
            )
            unfinished = None
        except AssertionError as exc:  # still count the duplicates, then fail below
            unfinished = str(exc)
        stuck = stuck_report(db, r, prefix)
        leftover = r.xlen(f"{prefix}:jobs:normal")
        assert stop(queuer, w1b, w2) == [0, 0, 0]

    st = job_states(db, cid)
    got = sink.delivered_to()
    lost = sorted({f"{lp}@example.net" for lp in recipients} - set(got))
    dups = duplicates(sink)
    n_dups = sum(dups.values())
    reclaimed = db.execute(
        "SELECT count(*) FROM events WHERE type = 'JobRetryScheduled' AND data->>'reason' = 'lease_expired'"
    ).fetchone()[0]
    summary = (
        f"kill -9 of w1 after {done_at_kill} of {len(recipients)} accepted: {len(in_flight)} job(s) active for w1"
        f" at the kill, {reclaimed} lease(s) reclaimed, {n_dups} duplicate message(s), {len(lost)} recipient(s)"
        f" without the message, {leftover} entr(y/ies) left in the normal stream"
    )
    print("\n" + summary)
    record_property("worker_kill_active_at_kill", len(in_flight))
    record_property("worker_kill_duplicates", n_dups)
    record_property("worker_kill_lost", len(lost))
    assert n_dups <= len(in_flight), summary
    assert set(dups) <= in_flight, f"{summary}; duplicated jobs not in flight at the kill: {set(dups) - in_flight}"
    assert all(n == 1 for n in dups.values()), f"a job was sent more than twice: {dups}"
    assert unfinished is None and not lost, f"{summary}\n{unfinished}\nunfinished jobs now:\n{stuck}"
    assert st == {"completed": len(recipients)}, st
    # The in-flight ones were retried through the lease, each a JobRetryScheduled(lease_expired) event.
    hist = history(db, cid)
    for jid in in_flight:
        kinds = [(t, d.get("reason")) for t, d in hist[jid]]
        assert ("JobRetryScheduled", "lease_expired") in kinds or kinds[-1][0] == "JobCompleted", kinds
    assert {jid: v for jid, evs in hist.items() if (v := graph_violations(evs))} == {}


def test_stream_entries_of_a_worker_killed_before_it_claimed_them_are_not_lost(procs, env, store, db, r, prefix):
    """kill -9 between a worker's XREADGROUP and its claim (JobStarted) leaves entries in its
    pending list while the jobs are still `queued`. Invariant 7: they are reclaimed, never lost.
    The dead worker is played by a plain Redis client that reads entries as consumer `dead`
    and then stops: exactly what a worker killed at that moment leaves behind (the kill -9
    test above lands there too, now and then)."""
    penv = pipeline_env(env)
    sink = Sink()
    recipients = [f"user{i}" for i in range(20)]
    with SinkServer(sink) as server:
        cid = setup_campaign(store, server.url, recipients)
        queuer = start_queuer(procs, penv)
        campaigns.start(store, cid)
        key = f"{prefix}:jobs:normal"
        wait_until(lambda: alive(procs, queuer) and r.xlen(key) == len(recipients), 20, what="every job in the stream")
        try:
            r.xgroup_create(key, GROUP, id="0", mkstream=True)  # what a worker does on start
        except redis.ResponseError as exc:
            assert "BUSYGROUP" in str(exc)
        [(_, taken)] = r.xreadgroup(GROUP, "dead", {key: ">"}, count=3)
        assert len(taken) == 3
        (w1,) = start_workers(procs, penv, "w1")
        wait_campaign_done(db, r, prefix, procs, [queuer, w1], cid, len(recipients), 3 * LEASE_S + 3)
        assert stop(queuer, w1) == [0, 0]
    assert set(sink.delivered_to()) == {f"{lp}@example.net" for lp in recipients}
    assert not duplicates(sink)


# -- b, d. kill -9 the queuer; a standby takes over ------------------------------------------


def test_queuer_killed_mid_campaign_and_replaced_loses_nothing_and_queues_nothing_twice(
    procs, env, store, db, r, prefix
):
    # Small batches and a shallow stream: the queuer is busy all through the campaign.
    penv = pipeline_env(env, MAILFLOW_QUEUER_BATCH_SIZE="10", MAILFLOW_QUEUE_MAX_DEPTH="10")
    sink = Sink(delay_s=0.03)
    recipients = [f"user{i}" for i in range(240)]
    with SinkServer(sink) as server:
        cid = setup_campaign(store, server.url, recipients)
        queuer = start_queuer(procs, penv)
        (w1,) = start_workers(procs, penv, "w1")
        campaigns.start(store, cid)
        target = 0
        for _ in range(3):  # kill -9, start another, three times
            target += 50
            wait_until(
                lambda: alive(procs, queuer, w1) and job_states(db, cid)["completed"] >= target,
                30,
                interval=0.01,
                what=f"{target} accepted",
            )
            queuer.kill()
            queuer.wait(10)
            queuer = procs.start("queuer", env=penv)
        wait_campaign_done(db, r, prefix, procs, [queuer, w1], cid, len(recipients), 40)
        assert stop(queuer, w1) == [0, 0]

    assert job_states(db, cid) == {"completed": len(recipients)}
    assert sink.delivered_to() == {f"{lp}@example.net": 1 for lp in recipients}
    assert not duplicates(sink)
    for jid, evs in history(db, cid).items():
        assert [t for t, _ in evs] == ["JobCreated", "JobQueued", "JobStarted", "JobCompleted"], (jid, evs)
    seqs = [s for (s,) in db.execute("SELECT queue_seq FROM jobs WHERE campaign_id = %s", (cid,)).fetchall()]
    assert len(set(seqs)) == len(recipients)


def test_a_standby_queuer_takes_over_when_the_leader_is_killed(procs, env, store, db, r, prefix):
    penv = pipeline_env(env)
    with SinkServer(Sink()) as server:
        sending.save_sender(store, Sender("tx", "noreply@example.org", "", server.url))
    templates.save(store, templates.Template("hello", "Hello", "<p>Hi {{ name }}</p>"))
    leader = start_queuer(procs, penv)
    standby = procs.start("queuer", env=penv)
    wait_until(lambda: alive(procs, leader, standby) and in_log(procs, standby, "queuer.standby"), 20, what="standby")

    def send_and_wait_queued(to: str) -> str:
        jid, _ = sending.send_transactional(store, sender="tx", template="hello", to=to, variables={"name": "A"})
        wait_until(
            lambda: db.execute("SELECT state FROM jobs WHERE id = %s", (jid,)).fetchone()[0] == "queued",
            10,
            what=f"{to} to be queued",
        )
        return jid

    first = send_and_wait_queued("a@example.net")
    assert not in_log(procs, standby, "queuer.leader")
    leader.kill()
    leader.wait(10)
    wait_until(
        lambda: alive(procs, standby) and in_log(procs, standby, "queuer.leader"), 15, what="the standby to lead"
    )
    second = send_and_wait_queued("b@example.net")
    events = log_events(procs, standby)
    assert events.index("queuer.standby") < events.index("queuer.leader")
    # The new leader queued the new job once and did not queue the old one again.
    entries = r.xrange(f"{prefix}:jobs:high")
    assert sorted(f[b"job_id"].decode() for _, f in entries) == sorted([first, second])
    assert stop(standby) == [0]


# -- c. SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_on_a_worker_finishes_its_sends_in_flight_and_exits_0(procs, env, store, db, r, prefix):
    penv = pipeline_env(env)
    sink = Sink(delay_s=0.25)
    recipients = [f"user{i}" for i in range(100)]
    with SinkServer(sink) as server:
        cid = setup_campaign(store, server.url, recipients)
        queuer = start_queuer(procs, penv)
        w1, w2 = start_workers(procs, penv, "w1", "w2")
        campaigns.start(store, cid)
        wait_until(
            lambda: (
                alive(procs, queuer, w1, w2)
                and job_states(db, cid)["completed"] >= 10
                and len(active_of(db, "w1")) >= 4
            ),
            30,
            interval=0.01,
            what="w1 to have sends in flight",
        )
        w1.send_signal(signal.SIGTERM)
        in_flight = active_of(db, "w1")  # read after the signal: none of these may be abandoned
        assert w1.wait(15) == 0, procs.log_of(w1)[-3000:]
        assert active_of(db, "w1") == set(), "w1 exited leaving active jobs"
        finished_by_w1 = dict(
            db.execute(
                "SELECT id::text, state FROM jobs WHERE id = ANY(%s::uuid[]) AND worker = 'w1'", (list(in_flight),)
            ).fetchall()
        )
        assert finished_by_w1 == dict.fromkeys(in_flight, "completed"), "w1 did not finish its in-flight sends itself"
        assert in_log(procs, w1, "worker.stopped")
        wait_campaign_done(db, r, prefix, procs, [queuer, w2], cid, len(recipients), 40)
        assert stop(queuer, w2) == [0, 0]

    assert job_states(db, cid) == {"completed": len(recipients)}
    assert sink.delivered_to() == {f"{lp}@example.net": 1 for lp in recipients}
    assert not duplicates(sink)
    reclaimed = db.execute("SELECT count(*) FROM events WHERE data->>'reason' = 'lease_expired'").fetchone()[0]
    assert reclaimed == 0, "a job was left for its lease to expire"
    assert {jid: v for jid, evs in history(db, cid).items() if (v := graph_violations(evs))} == {}


# -- e. SMTP faults with real processes --------------------------------------------------------------


def test_smtp_faults_end_every_job_with_every_attempt_recorded_and_reported(procs, env, store, db, r, prefix):
    penv = pipeline_env(env, MAILFLOW_RETRY_MAX_ATTEMPTS="3")
    sink = Sink(tempfail_times=1, delay_s=0.01, slow_s=0.6, stall_s=2.0)
    faults = ["bounce-1", "policy-1", "tempfail-1", "drop-1", "busy-1", "slow-1", "stall-1"]
    recipients = [f"user{i}" for i in range(20)] + faults
    with SinkServer(sink) as server:
        relay = f"smtp://127.0.0.1:{server.port}?tls=none&timeout=1"  # stall-* outlasts it; slow-* does not
        cid = setup_campaign(store, relay, recipients, name="faulty")
        queuer = start_queuer(procs, penv)
        w1, w2 = start_workers(procs, penv, "w1", "w2")
        campaigns.start(store, cid)
        wait_campaign_done(db, r, prefix, procs, [queuer, w1, w2], cid, len(recipients), 40)
        wait_until(
            lambda: db.execute("SELECT status FROM campaigns WHERE id = %s", (cid,)).fetchone()[0] == "completed",
            10,
            what="the campaign to be marked completed",
        )
        assert stop(queuer, w1, w2) == [0, 0, 0]

    ids = {e: str(j) for e, j in db.execute("SELECT email, id FROM jobs WHERE campaign_id = %s", (cid,)).fetchall()}
    # Every attempt is an event: through the CLI for the jobs tried more than once (in
    # parallel, each CLI start costs half a second), straight from the event log for the rest.
    retried = ["tempfail-1", "drop-1", "busy-1", "stall-1"]
    running = {
        lp: subprocess.Popen(
            mailflow_cmd("jobs", "show", ids[f"{lp}@example.net"], "--json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lp in retried
    }
    status = subprocess.Popen(
        mailflow_cmd("campaigns", "status", "faulty", "--json"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    shown = {}
    for lp, p in running.items():
        out, errout = p.communicate(timeout=60)
        assert p.returncode == 0, errout
        shown[lp] = json.loads(out)
    hist = history(db, cid)
    assert {jid: v for jid, evs in hist.items() if (v := graph_violations(evs))} == {}
    for lp in set(faults) - set(retried):
        shown[lp] = {"history": [{"type": t, "data": d} for t, d in hist[ids[f"{lp}@example.net"]]]}
    types = {lp: [e["type"] for e in s["history"]] for lp, s in shown.items()}
    once = ["JobCreated", "JobQueued", "JobStarted"]
    assert types["bounce-1"] == [*once, "JobFailed"]
    assert types["policy-1"] == [*once, "JobFailed"]
    assert types["slow-1"] == [*once, "JobCompleted"]
    assert types["tempfail-1"] == [*once, "JobRetryScheduled", "JobQueued", "JobStarted", "JobCompleted"]
    assert types["drop-1"] == [*once, "JobRetryScheduled", "JobQueued", "JobStarted", "JobCompleted"]
    for lp in ("busy-1", "stall-1"):  # three attempts, then given up
        assert types[lp] == [
            *once,
            "JobRetryScheduled",
            "JobQueued",
            "JobStarted",
            "JobRetryScheduled",
            "JobQueued",
            "JobStarted",
            "JobFailed",
        ], types[lp]
        started = [e["data"]["attempt"] for e in shown[lp]["history"] if e["type"] == "JobStarted"]
        assert started == [1, 2, 3]
        assert shown[lp]["job"]["attempts"] == 3 and shown[lp]["job"]["failure_kind"] == "retries_exhausted"
    last = {lp: s["history"][-1]["data"] for lp, s in shown.items()}
    assert (
        last["bounce-1"]["code"] == 550
        and last["bounce-1"]["kind"] == "bad_mailbox"
        and "5.1.1" in last["bounce-1"]["reply"]
    )
    assert last["policy-1"]["kind"] == "policy" and "5.7.1" in last["policy-1"]["reply"]
    assert last["busy-1"]["code"] == 451 and "4.2.1" in last["busy-1"]["reply"]
    assert "timeout" in last["stall-1"]["reply"].lower() or "timed out" in last["stall-1"]["reply"].lower(), last[
        "stall-1"
    ]
    retry = next(e["data"] for e in shown["tempfail-1"]["history"] if e["type"] == "JobRetryScheduled")
    assert retry["code"] == 451 and "4.3.0" in retry["reply"]

    # The campaign reports who did not get it, and why.
    out, errout = status.communicate(timeout=60)
    assert status.returncode == 0, errout
    st = json.loads(out)
    assert st["status"] == "completed"
    assert (
        st["jobs"]["completed"] == len(recipients) - 4 and st["jobs"]["failed"] == 4 and st["total"] == len(recipients)
    )
    failures = {f["kind"]: f for f in st["failures"]}
    assert {k: f["count"] for k, f in failures.items()} == {"bad_mailbox": 1, "policy": 1, "retries_exhausted": 2}
    assert "5.1.1" in failures["bad_mailbox"]["example"] and "5.7.1" in failures["policy"]["example"]
    assert failures["retries_exhausted"]["example"]
    assert st["retries"] >= 2 + 2 + 1 + 1  # busy 2, stall 2, tempfail 1, drop 1

    # Delivered exactly once where the server said 250 the one time it was asked.
    got = sink.delivered_to()
    for lp in [*recipients[:20], "tempfail-1", "drop-1", "slow-1"]:
        assert got[f"{lp}@example.net"] == 1, lp
    for lp in ("bounce-1", "policy-1", "busy-1"):
        assert f"{lp}@example.net" not in got
    assert sink.attempts["busy-1@example.net"] == 3


# -- leases ---------------------------------------------------------------------------------------


def test_a_send_slower_than_the_lease_is_not_sent_again_while_its_worker_lives(procs, env, store, db, r, prefix):
    """A live worker whose send outlasts MAILFLOW_JOB_LEASE_S (a slow relay, or a wait for one of
    its pooled connections) must not have the job sent a second time, and the late outcome of an
    attempt that is no longer the job's active one must not be applied as a transition."""
    penv = pipeline_env(env, MAILFLOW_JOB_LEASE_S="1.5")
    sink = Sink(delay_s=2.5)  # accepted after 2.5 s: longer than the lease, well within the relay timeout
    with SinkServer(sink) as server:
        sending.save_sender(
            store, Sender("tx", "noreply@example.org", "", f"smtp://127.0.0.1:{server.port}?tls=none&timeout=10")
        )
        templates.save(store, templates.Template("hello", "Hello", "<p>Hi {{ name }}</p>"))
        queuer = start_queuer(procs, penv)
        (w1,) = start_workers(procs, penv, "w1")
        jid, _ = sending.send_transactional(
            store, sender="tx", template="hello", to="slow@example.net", variables={"name": "S"}
        )
        wait_until(
            lambda: (
                alive(procs, queuer, w1)
                and db.execute("SELECT state FROM jobs WHERE id = %s", (jid,)).fetchone()[0] in ("completed", "failed")
            ),
            20,
            what="the job to finish",
        )
        assert stop(w1, queuer) == [0, 0]  # SIGTERM: whatever is still in flight finishes and is recorded
    evs = [
        (t, d if isinstance(d, dict) else json.loads(d))
        for t, d in db.execute(
            "SELECT type, data FROM events WHERE stream = %s ORDER BY version", (f"default/job-{jid}",)
        ).fetchall()
    ]
    trail = [f"{t}(attempt {d.get('attempt')}{', ' + d['reason'] if d.get('reason') else ''})" for t, d in evs]
    got = receptions(sink)[jid]
    assert got == 1, f"a live worker's slow send was sent {got} times; job history: {trail}"
    assert graph_violations(evs) == [], f"job history: {trail}"
