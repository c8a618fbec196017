"""Long-running processes: what each knows of its servers, told once per outage, and a status others read.

A process that loses PostgreSQL or Redis keeps running. It retries its unit of work with
a jittered exponential backoff and reports the outage twice, at warning level: when it
begins (`<role>.postgres_unavailable`, with the first error) and when it ends
(`<role>.postgres_restored`, with how long it lasted). Failed retries in between log
nothing, so a minute-long restart is two lines, not sixty.

The same facts are published for supervisors:
- a status file, `MAILFLOW_HOME/run/<role>-<name>.json`, rewritten on every change and
  every few seconds (`mailflow health` reads them; `mailflow up` names a dying child's
  last state);
- under systemd (`Type=notify`), sd_notify messages: READY=1 once the process runs,
  STATUS=<one line>, WATCHDOG=1 while its main loop is alive (a loop stuck for longer
  than `WatchdogSec` gets the process restarted), STOPPING=1 on SIGTERM.

sd_notify is a datagram on a unix socket; no maintained Python library is worth a
dependency for it (python-systemd needs libsystemd headers to build), so it is here.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog

from mailflow.infra.lifecycle import pid_alive

SERVICES = ("postgres", "redis")
STATUS_INTERVAL_S = 2.0


class Backoff:
    """Jittered exponential delays for retrying against a server that is away: 0.1 s, 0.2 s ... 2 s.

    Full jitter (a random delay up to the current ceiling) keeps a fleet of processes
    that lost the same server from coming back in lockstep.
    """

    def __init__(self, base: float = 0.1, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.failures)
        self.failures += 1
        return random.uniform(self.base / 2, max(ceiling, self.base))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class _Outage:
    since_wall: str
    since: float
    error: str
    flapping: bool = False  # failed again right after it was told restored


# A failure this soon after a service was told restored is the same outage going on (a
# connection opened before the restart, a server still settling), not a new one.
FLAP_S = 3.0


def _one_line(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


def sd_notify(message: str) -> bool:
    """Send one sd_notify datagram to systemd (or whoever set NOTIFY_SOCKET); False if nobody listens."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def status_dir(home: Path) -> Path:
    return home / "run"


class Health:
    """One process's view of its servers; thread-safe (the worker reports from threads and its loop).

    Without `status_dir` it only logs (in-process runners in tests and benchmarks).
    """

    def __init__(
        self,
        role: str,
        name: str,
        log: structlog.typing.FilteringBoundLogger,
        *,
        status_dir: Path | None = None,
        interval_s: float = STATUS_INTERVAL_S,
        flap_s: float = FLAP_S,
    ) -> None:
        self.role = role
        self.name = name
        self.log = log
        self.interval_s = interval_s
        self.path = status_dir / f"{role}-{name}.json".replace("/", "_") if status_dir else None
        self.started_at = _now()
        self.state = "starting"
        self.detail: dict[str, Any] = {}
        self.outages: dict[str, _Outage] = {}
        self.flap_s = flap_s
        self._restored: dict[str, tuple[float, _Outage]] = {}  # when each service was last told back
        self.outage_count = dict.fromkeys(SERVICES, 0)
        self._beat = time.monotonic()
        self._proc_start = _proc_start(os.getpid())
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        watchdog_us = os.environ.get("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_s = int(watchdog_us) / 1e6 if watchdog_us.isdigit() and mine else None
        if self.watchdog_s:
            self.interval_s = min(self.interval_s, self.watchdog_s / 3)

    # -- what the process reports -------------------------------------------------------

    def lost(self, service: str, exc: BaseException | str) -> bool:
        """`service` failed; the first failure of an outage is logged. True if this one began it."""
        with self._lock:
            if service in self.outages:
                return False
            restored = self._restored.get(service)
            if restored is not None and time.monotonic() - restored[0] < self.flap_s:
                # Told restored a moment ago: the same outage, still settling. It goes on
                # quietly (down in the status file) and ends quietly.
                self.outages[service] = _Outage(restored[1].since_wall, restored[1].since, restored[1].error, True)
                self._changed.set()
                return False
            self.outages[service] = _Outage(_now(), time.monotonic(), _one_line(exc))
            self.outage_count[service] = self.outage_count.get(service, 0) + 1
        self.log.warning(
            f"{self.role}.{service}_unavailable",
            error=_one_line(exc),
            detail="retrying with backoff; nothing is lost meanwhile",
        )
        self._changed.set()
        return True

    def ok(self, service: str) -> None:
        """`service` answered; ends its outage if there was one (cheap when there was none)."""
        if service not in self.outages:
            return
        with self._lock:
            outage = self.outages.pop(service, None)
            if outage is not None:
                self._restored[service] = (time.monotonic(), outage)
        if outage is None:
            return
        if outage.flapping:
            self.log.info(f"{self.role}.{service}_settled", outage_s=round(time.monotonic() - outage.since, 3))
            self._changed.set()
            return
        self.log.warning(
            f"{self.role}.{service}_restored",
            outage_s=round(time.monotonic() - outage.since, 3),
            since=outage.since_wall,
            first_error=outage.error,
        )
        self._changed.set()

    def down(self, service: str) -> bool:
        return service in self.outages

    @property
    def healthy(self) -> bool:
        return not self.outages

    def beat(self) -> None:
        """The main loop is alive (feeds the systemd watchdog)."""
        self._beat = time.monotonic()

    def set(self, *, now: bool = False, **detail: Any) -> None:
        """Role-specific facts for the status (leader or standby, jobs in flight ...).

        Published with the next periodic write unless `now` (a worker updates its counts
        twenty times a second; a change of leader is worth telling at once).
        """
        with self._lock:
            changed = any(self.detail.get(k) != v for k, v in detail.items())
            self.detail.update(detail)
        if now and changed:
            self._changed.set()

    # -- publishing ----------------------------------------------------------------------

    def start(self) -> Health:
        """Start publishing (status file, sd_notify READY/STATUS/WATCHDOG)."""
        self.state = "running"
        if self._thread is None and (self.path is not None or os.environ.get("NOTIFY_SOCKET")):
            self._publish()
            sd_notify("READY=1\nSTATUS=" + self.summary())
            self._thread = threading.Thread(target=self._run, name=f"mailflow-health-{self.role}", daemon=True)
            self._thread.start()
        return self

    def stopping(self) -> None:
        self.state = "stopping"
        sd_notify("STOPPING=1\nSTATUS=stopping")
        self._changed.set()

    def close(self, exit_code: int = 0) -> None:
        """The process is done. A clean stop removes its status file; a failure leaves its last
        status (state `failed`, the exit code) for a supervisor to read."""
        self.state = "stopped" if exit_code == 0 else "failed"
        self.detail["exit_code"] = exit_code
        self._closed.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if exit_code == 0 and self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            return
        self._publish()

    def summary(self) -> str:
        """One line for `systemctl status`: `running; postgres unavailable for 3.2 s (...)`."""
        with self._lock:
            outages = dict(self.outages)
        if not outages:
            return self.state
        now = time.monotonic()
        parts = [f"{svc} unavailable for {now - o.since:.1f} s ({o.error[:80]})" for svc, o in outages.items()]
        return f"{self.state}, degraded: " + "; ".join(parts)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            services = {
                svc: (
                    {
                        "ok": False,
                        "down_since": o.since_wall,
                        "down_s": round(now - o.since, 1),
                        "error": o.error,
                        "outages": self.outage_count.get(svc, 0),
                    }
                    if (o := self.outages.get(svc))
                    else {"ok": True, "outages": self.outage_count.get(svc, 0)}
                )
                for svc in SERVICES
            }
            detail = dict(self.detail)
        state = self.state if self.state != "running" or not self.outages else "degraded"
        return {
            "role": self.role,
            "name": self.name,
            "pid": os.getpid(),
            "proc_start": self._proc_start,
            "host": socket.gethostname(),
            "state": state,
            "started_at": self.started_at,
            "updated_at": _now(),
            "loop_idle_s": round(now - self._beat, 1),
            "services": services,
            **detail,
        }

    def _publish(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(orjson.dumps(self.snapshot(), option=orjson.OPT_INDENT_2))
            os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._changed.wait(self.interval_s)
            self._changed.clear()
            if self._closed.is_set():
                return
            self._publish()
            message = "STATUS=" + self.summary()
            if self.watchdog_s and time.monotonic() - self._beat < self.watchdog_s:
                message += "\nWATCHDOG=1"
            sd_notify(message)


def read_statuses(home: Path, forget_after_s: float = 3600.0) -> list[dict[str, Any]]:
    """Every status file under MAILFLOW_HOME/run, each marked `alive` (its pid runs on this host).

    The file of a process that ended or vanished more than `forget_after_s` ago is removed.
    """
    out: list[dict[str, Any]] = []
    folder = status_dir(home)
    if not folder.is_dir():
        return out
    host = socket.gethostname()
    for path in sorted(folder.glob("*.json")):
        try:
            st = orjson.loads(path.read_bytes())
            age = time.time() - path.stat().st_mtime
        except (OSError, orjson.JSONDecodeError):
            continue
        pid = int(st.get("pid") or 0)
        st["alive"] = (
            st.get("host") == host
            and pid_alive(pid)
            and _proc_start(pid) == st.get("proc_start")
            and st.get("state") not in ("stopped", "failed")
        )
        if not st["alive"] and st.get("state") not in ("stopped", "failed"):
            st["state"] = "gone"  # killed without a last word (kill -9, OOM)
        if not st["alive"] and age > forget_after_s and st.get("host") == host:
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        out.append(st)
    return out


def _proc_start(pid: int) -> int | None:
    """When the process started (clock ticks since boot, Linux), so a reused pid is not taken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
