"""`mailflow up` and the demo: the pipeline as child processes; a child that dies is restarted, the log says
which and why, and a running pipeline says how it is doing."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from mailflow.outbound import sending, templates
from mailflow.outbound.senders import Sender
from mailflow.runtime.supervisor import (
    CONSUMERS,
    STOP_TIMEOUT_S,
    Child,
    _error_line,
    child_problems,
    describe_exit,
    progress_facts,
    relay_problems,
)
from mailflow.testing.sink import Sink, SinkServer

from .conftest import run_cli, wait_until
from .servers import free_port

pytestmark = pytest.mark.process


def _records(procs, p) -> list[dict]:
    out = []
    for line in procs.log_of(p).splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _children(procs, up) -> dict[str, int]:
    """The latest pid of each child, from the supervisor's own lines."""
    pids: dict[str, int] = {}
    for rec in _records(procs, up):
        if rec.get("event") == "supervisor.child_started":
            pids[rec["child"]] = rec["pid"]
    return pids


def _stopped(procs, up) -> int:
    """The supervisor's exit code after SIGTERM. It gives its children STOP_TIMEOUT_S, then
    kills them and says which one (supervisor.child_killed): wait that long, and show its log."""
    try:
        return up.wait(STOP_TIMEOUT_S + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mailflow up did not stop after SIGTERM; its log ends:\n{procs.log_of(up)[-4000:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not alive either.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _up(procs, env):
    up = procs.start("up", "--workers", "1", env=dict(env, MAILFLOW_INBOUND_PORT=str(free_port())))
    wait_until(
        lambda: (
            up.poll() is None
            and set(_children(procs, up))
            == {"relay", *(f"consumer-{c}" for c in CONSUMERS), "queuer", "worker-1", "inbound"}
            and all(
                any(r.get("event") == e for r in _records(procs, up))
                for e in ("relay.leader", "queuer.leader", "worker.start", "inbound.start")
            )
        ),
        60,
        what="every child of `mailflow up` to run",
    )
    return up


def test_a_child_killed_with_sigkill_is_restarted_and_the_log_says_which_and_why(procs, env):
    up = _up(procs, env)
    first = _children(procs, up)["worker-1"]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: _children(procs, up)["worker-1"] != first, 20, what="worker-1 to be restarted")
    [exited] = [r for r in _records(procs, up) if r.get("event") == "supervisor.child_exited"]
    assert exited["child"] == "worker-1" and exited["pid"] == first and exited["exit"] == "killed by SIGKILL"
    assert exited["level"] == "error" and exited["restart_in_s"] == 1.0 and exited["restarts"] == 1
    second = _children(procs, up)["worker-1"]
    wait_until(lambda: _alive(second), 10, what="the new worker to run")
    # `mailflow health` sees the supervisor with its children, the restart counted.
    res = wait_until(
        lambda: (
            (r := run_cli(env, "health", "--json")).returncode == 0
            and any(
                s["role"] == "up" and any(c["name"] == "worker-1" and c["restarts"] == 1 for c in s.get("children", []))
                for s in json.loads(r.stdout)
            )
            and r
        ),
        30,
        interval=0.5,
        what="mailflow health to show the restart",
    )
    assert {s["role"] for s in json.loads(res.stdout)} >= {"up", "relay", "queuer", "worker", "consumer", "inbound"}
    pids = _children(procs, up).values()
    up.send_signal(signal.SIGTERM)
    assert _stopped(procs, up) == 0, procs.log_of(up)[-3000:]
    assert not any(_alive(p) for p in pids)


def test_children_stop_by_themselves_when_the_supervisor_is_killed(procs, env):
    up = _up(procs, env)
    pids = list(_children(procs, up).values())
    up.send_signal(signal.SIGKILL)
    up.wait(10)
    wait_until(lambda: not any(_alive(p) for p in pids), 30, what="the orphaned children to stop")


def test_up_refuses_a_worker_setting_it_cannot_use_before_starting_anything(env):
    res = run_cli(dict(env, MAILFLOW_DNS_SERVERS='["dns.example.net"]'), "up")
    assert res.returncode == 2
    [line] = res.stderr.splitlines()
    assert line.startswith("error: bad setting MAILFLOW_DNS_SERVERS: ")
    assert "supervisor.child_started" not in res.stdout


def test_the_gist_of_a_childs_last_error_comes_from_its_log_lines():
    assert (
        _error_line('{"event": "worker.send_crashed", "level": "error", "error": "boom"}')
        == "worker.send_crashed: boom"
    )
    assert _error_line('{"event": "worker.start", "level": "info"}') is None
    assert _error_line("error: cannot connect to PostgreSQL at postgresql://x:***@h/db: refused\n").startswith(
        "error: cannot"
    )
    assert _error_line("Traceback (most recent call last):") is not None
    assert _error_line("   \n") is None
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exit code 3"


def test_a_second_demo_in_the_same_home_reports_only_its_own_jobs(env):
    runs = []
    for _ in range(2):
        res = run_cli(env, "demo", "--contacts", "30", "--transactional", "3", "--json", timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout))
    second = runs[1]
    assert second["recipients"] == 30 and sum(second["states"].values()) == 33
    by_priority = {row["priority"]: row for row in second["latency"]}
    # The latency table counts this run's jobs only: 30 campaign (normal) + 3 transactional (high).
    assert sum(row["completed"] for row in second["latency"]) == second["states"]["completed"]
    assert by_priority["high"]["completed"] + by_priority["high"].get("failed", 0) == 3
    assert by_priority["normal"]["completed"] + by_priority["normal"].get("failed", 0) == 30


def _progress(procs, up) -> list[dict]:
    return [r for r in _records(procs, up) if r.get("event") == "up.progress"]


def test_a_running_pipeline_logs_its_progress_and_counts_each_finished_job_once(procs, env, store):
    with SinkServer(Sink()) as server:
        sending.save_sender(store, Sender("tx", "noreply@example.org", "", server.url))
        templates.save(store, templates.Template("hello", "Hello", "<p>Hi {{ name }}</p>"))
        up = _up(procs, dict(env, MAILFLOW_SECRET_KEY="supervisor-test"))
        for i in range(5):
            sending.send_transactional(
                store, sender="tx", template="hello", to=f"user{i}@example.net", variables={"name": "A"}
            )
        lines = wait_until(
            lambda: (p := _progress(procs, up)) and sum(r["completed"] for r in p) >= 5 and p[-1]["waiting"] == 0 and p,
            45,
            interval=0.5,
            what="`up.progress` lines that count the five sends",
        )
    assert all(r["level"] == "info" for r in lines)
    assert sum(r["completed"] for r in lines) == 5 and sum(r["failed"] for r in lines) == 0
    assert any(r["messages_per_s"] > 0 for r in lines) and all(8 <= r["interval_s"] <= 15 for r in lines)


def test_up_warns_while_the_relay_has_lost_redis(procs, env, private_redis_like_tested):
    server = private_redis_like_tested
    up = _up(procs, dict(env, MAILFLOW_REDIS_URL=server.url))
    server.stop()
    try:
        warning = wait_until(
            lambda: next(
                (
                    r
                    for r in _records(procs, up)
                    if r.get("event") == "up.relay_unhealthy" and r.get("service") == "redis"
                ),
                None,
            ),
            40,
            interval=0.5,
            what="a warning that the relay lost Redis",
        )
    finally:
        server.start()
    assert warning["level"] == "warning" and warning["problem"] == "the relay lost redis" and warning["error"]


def test_problems_are_a_child_that_is_down_or_restarted_and_a_relay_that_is_gone_or_lost_a_server():
    running = Child("queuer", ["queuer"], proc=object(), restarts=2)  # type: ignore[arg-type]
    down = Child("worker-1", ["worker"], restarts=3, last_exit="killed by SIGKILL", restart_at=105.0)
    problems = child_problems([running, down], {"queuer": 1, "worker-1": 3}, now=100.0)
    assert [(e, f["child"], f["restarts_since_last"]) for e, f in problems] == [
        ("up.child_down", "queuer", 1),
        ("up.child_down", "worker-1", 0),
    ]
    assert problems[1][1]["restart_in_s"] == 5.0 and problems[1][1]["last_exit"] == "killed by SIGKILL"
    assert child_problems([running], {"queuer": 2}, now=100.0) == []

    healthy = {
        "role": "relay",
        "alive": True,
        "name": "r1",
        "services": {"postgres": {"ok": True}, "redis": {"ok": True}},
    }
    lost = dict(
        healthy,
        services={"postgres": {"ok": False, "down_s": 12.5, "error": "OperationalError: gone"}, "redis": {"ok": True}},
    )
    assert relay_problems([healthy, {"role": "worker", "alive": False}]) == []
    [(event, facts)] = relay_problems([lost])
    assert event == "up.relay_unhealthy" and facts["service"] == "postgres" and facts["down_s"] == 12.5
    [(_, gone)] = relay_problems([dict(healthy, alive=False, state="gone", updated_at="2026-01-01T00:00:00")])
    assert gone["problem"].startswith("no relay is running") and gone["last_state"] == "gone"
    assert relay_problems([])[0][1]["last_state"] is None
    assert progress_facts(30, 2, 7, 10.0) == {
        "completed": 30,
        "failed": 2,
        "waiting": 7,
        "interval_s": 10.0,
        "messages_per_s": 3.0,
    }
