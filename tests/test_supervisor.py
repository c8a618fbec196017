"""`mailflow up`: the pipeline as child processes; a child that dies is restarted, and the log says which and why."""

from __future__ import annotations

import json
import os
import signal

from mailflow.runtime.supervisor import _error_line, describe_exit

from .conftest import run_cli, wait_until


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
    up = procs.start("up", "--workers", "1", env=env)
    wait_until(lambda: up.poll() is None and set(_children(procs, up)) == {"relay", "consumer-event_counts", "queuer", "worker-1"}
               and all(any(r.get("event") == e for r in _records(procs, up)) for e in ("relay.leader", "queuer.leader", "worker.start")),
               60, what="every child of `mailflow up` to run")
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
    res = wait_until(lambda: (r := run_cli(env, "health", "--json")).returncode == 0 and any(
        s["role"] == "up" and any(c["name"] == "worker-1" and c["restarts"] == 1 for c in s.get("children", []))
        for s in json.loads(r.stdout)) and r, 30, interval=0.5, what="mailflow health to show the restart")
    assert {s["role"] for s in json.loads(res.stdout)} >= {"up", "relay", "queuer", "worker", "consumer"}
    pids = _children(procs, up).values()
    up.send_signal(signal.SIGTERM)
    assert up.wait(60) == 0, procs.log_of(up)[-3000:]
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
    assert _error_line('{"event": "worker.send_crashed", "level": "error", "error": "boom"}') == "worker.send_crashed: boom"
    assert _error_line('{"event": "worker.start", "level": "info"}') is None
    assert _error_line("error: cannot connect to PostgreSQL at postgresql://x:***@h/db: refused\n").startswith("error: cannot")
    assert _error_line("Traceback (most recent call last):") is not None
    assert _error_line("   \n") is None
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exit code 3"
