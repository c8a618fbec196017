"""Health that tells the truth: outages told once, status files, sd_notify, `mailflow health`."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from mailflow.infra.health import Backoff, Health, read_statuses, status_dir

from .conftest import run_cli, wait_until

pytestmark = pytest.mark.process


def test_backoff_grows_to_its_cap_with_jitter_and_starts_over_after_a_success():
    b = Backoff(base=0.1, cap=2.0)
    delays = [b.next() for _ in range(12)]
    assert all(0.05 <= d <= 2.0 for d in delays)
    assert max(delays[6:]) > 0.4  # grown, not stuck at the base
    ceilings = [min(2.0, 0.1 * 2**i) for i in range(12)]
    assert all(d <= c for d, c in zip(delays, ceilings))
    b.reset()
    assert b.next() <= 0.1


def test_a_failure_right_after_the_restore_is_the_same_outage_and_a_later_one_is_new():
    h = Health("worker", "w1", structlog.get_logger("t"), flap_s=0.5)
    with capture_logs() as logs:
        assert h.lost("postgres", ConnectionError("terminating connection")) is True
        h.ok("postgres")
        # A thread with a connection opened before the restart fails a moment later.
        assert h.lost("postgres", ConnectionError("server closed the connection")) is False
        assert h.down("postgres")  # the status still tells the truth meanwhile
        h.ok("postgres")
        time.sleep(0.6)
        assert h.lost("postgres", ConnectionError("refused")) is True  # a new outage
        h.ok("postgres")
    told = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert told == ["worker.postgres_unavailable", "worker.postgres_restored"] * 2
    assert h.outage_count["postgres"] == 2 and h.healthy


def test_an_outage_is_told_once_when_it_starts_and_once_when_it_ends_with_its_length():
    h = Health("worker", "w1", structlog.get_logger("t"))
    with capture_logs() as logs:
        assert h.lost("postgres", ConnectionError("server closed the connection")) is True
        for _ in range(50):  # every retry fails again
            assert h.lost("postgres", ConnectionError("refused")) is False
        assert h.down("postgres") and not h.healthy
        time.sleep(0.2)
        h.ok("postgres")
        h.ok("postgres")
        h.ok("redis")  # never lost: nothing to say
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("worker.postgres_unavailable", "warning"),
        ("worker.postgres_restored", "warning"),
    ]
    assert "server closed the connection" in logs[0]["error"]
    assert logs[1]["outage_s"] >= 0.2 and "server closed" in logs[1]["first_error"]
    assert h.healthy and h.outage_count["postgres"] == 1


def test_the_status_file_follows_the_outage_and_a_clean_stop_removes_it(tmp_path):
    h = Health("queuer", "host-1", structlog.get_logger("t"), status_dir=status_dir(tmp_path), interval_s=0.05).start()
    path = status_dir(tmp_path) / "queuer-host-1.json"
    read = lambda: orjson.loads(path.read_bytes())  # noqa: E731
    assert read()["state"] == "running" and read()["services"]["redis"]["ok"] is True
    h.lost("redis", "Connection refused")
    wait_until(lambda: read()["state"] == "degraded", 2, what="the file to say degraded")
    st = read()
    assert st["services"]["redis"]["ok"] is False and "refused" in st["services"]["redis"]["error"]
    assert st["services"]["postgres"]["ok"] is True and st["pid"] == os.getpid()
    [listed] = read_statuses(tmp_path)
    assert listed["alive"] is True and listed["state"] == "degraded"
    h.ok("redis")
    wait_until(lambda: read()["state"] == "running", 2, what="the file to say running again")
    assert read()["services"]["redis"]["outages"] == 1
    h.close(0)
    assert not path.exists()


def test_a_failed_process_leaves_its_last_status_and_a_killed_one_is_shown_as_gone(tmp_path):
    h = Health("worker", "w9", structlog.get_logger("t"), status_dir=status_dir(tmp_path)).start()
    h.close(3)
    [st] = read_statuses(tmp_path)
    assert st["state"] == "failed" and st["exit_code"] == 3 and st["alive"] is False
    # A file whose process vanished without a last word (kill -9): same pid start time check.
    other = status_dir(tmp_path) / "relay-x.json"
    other.write_bytes(
        orjson.dumps(
            {
                "role": "relay",
                "name": "x",
                "pid": 2**22 + 12345,
                "host": socket.gethostname(),
                "state": "running",
                "services": {},
            }
        )
    )
    by_name = {s["name"]: s for s in read_statuses(tmp_path)}
    assert by_name["x"]["state"] == "gone" and by_name["x"]["alive"] is False
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    assert "x" not in {s["name"] for s in read_statuses(tmp_path)} and not other.exists()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _messages(sock: socket.socket, until: str, timeout: float = 10) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if any(until in m for m in got):
            return got
    raise AssertionError(f"no {until!r} in {got}")


def test_systemd_hears_ready_status_and_the_watchdog_only_while_the_loop_turns(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "300000")  # 0.3 s: pinged every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    h = Health("relay", "r1", structlog.get_logger("t")).start()
    got = _messages(notify_socket, "READY=1")
    assert "STATUS=running" in got[0]
    h.beat()
    assert any("WATCHDOG=1" in m for m in _messages(notify_socket, "WATCHDOG=1"))
    h.lost("postgres", "gone")
    assert any("degraded: postgres unavailable" in m for m in _messages(notify_socket, "degraded"))
    time.sleep(0.5)  # the loop stopped beating: no more watchdog pings from now on
    notify_socket.setblocking(False)
    try:
        while True:
            notify_socket.recv(4096)
    except BlockingIOError:
        pass
    notify_socket.settimeout(0.2)
    later = []
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        try:
            later.append(notify_socket.recv(4096).decode())
        except TimeoutError:
            pass
    assert later and not any("WATCHDOG=1" in m for m in later), later
    h.stopping()
    h.close(0)


def test_a_relay_process_is_ready_for_systemd_and_listed_by_mailflow_health_until_it_is_killed(
    procs, env, notify_socket
):
    assert run_cli(env, "health").returncode == 1  # nothing runs yet
    relay = procs.start("relay", env=dict(env, NOTIFY_SOCKET=os.environ["NOTIFY_SOCKET"]))
    assert "READY=1" in "".join(_messages(notify_socket, "READY=1", 30))

    def listed():
        res = run_cli(env, "health", "--json")
        rows = json.loads(res.stdout)
        return res if rows and rows[0]["state"] == "running" else None

    res = wait_until(listed, 30, interval=0.3, what="mailflow health to list the relay")
    assert res.returncode == 0
    [row] = json.loads(res.stdout)
    assert row["role"] == "relay" and row["pid"] == relay.pid and row["leader"] is True
    assert row["services"]["postgres"]["ok"] and row["services"]["redis"]["ok"]
    human = run_cli(env, "health")
    assert human.returncode == 0 and "relay-" in human.stdout and "running" in human.stdout
    assert all(len(line) <= 80 for line in human.stdout.splitlines())
    relay.send_signal(signal.SIGKILL)
    relay.wait(10)
    after = run_cli(env, "health", "--json")
    assert after.returncode == 1 and json.loads(after.stdout)[0]["state"] == "gone"
