"""Runtime: `mailflow up` and the demo - every long-running part of the pipeline as a supervised child process.

The relay, the event_counts consumer, the queuer and the SMTP workers each run as their
own `mailflow` process: a crash in one cannot take the others down, and together they use
every core. A child that exits without being asked to is restarted after a pause that
grows with repeated failures (1 s, doubling to 30 s; back to 1 s once it ran for a
minute), and the supervisor says which child died and why - exit code or signal, its last
error line, and how long it ran. A child that exits with a configuration error (exit
code 2) would fail the same way again: the supervisor stops everything and exits 2.

While it runs it tells how the pipeline is doing, every PROGRESS_EVERY_S: an info line
`up.progress` (jobs completed, failed and waiting since the last one, messages/s), and a
warning for each problem it sees - `up.child_down` for a child that is down or restarted
since the last line, `up.relay_unhealthy` when no relay is running or the running one has
lost PostgreSQL or Redis (its status file, health.py). A pipeline that is quiet in the log
is a pipeline with nothing to send.

SIGTERM is passed on to every child; each finishes its batch (workers their sends) and
the supervisor returns when all have. A child whose supervisor disappears (kill -9)
notices within a second and stops as if it had been sent SIGTERM (MAILFLOW_PARENT_PID,
see cli.run_process), so none is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import psycopg

from mailflow.config import Settings, settings_env
from mailflow.infra.health import Health, read_statuses
from mailflow.infra.services import connect
from mailflow.log import get_logger
from mailflow.runtime import queries as rq

log = get_logger("mailflow.runtime.supervisor")

RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a child that ran this long starts its next restart pause from RESTART_MIN_S
STOP_TIMEOUT_S = 90.0  # after SIGTERM, children get this long before SIGKILL (workers finish their sends)
FATAL_EXIT = 2  # configuration or usage error: restarting cannot help
PROGRESS_EVERY_S = 10.0  # how often `up.progress` and the problem warnings are logged
MAILFLOW = [sys.executable, "-m", "mailflow"]
# The consumer groups `mailflow up` runs: events per hour, the analytics facts, then what came back - received mail
# classified (inbound), its effects on sending (outbound), its webhook deliveries.
CONSUMERS = ("event_counts", "facts", "inbound_classifier", "outbound_feedback", "webhooks")


def pipeline_parts(
    workers: int = 1,
    consumers: tuple[str, ...] = CONSUMERS,
    prefix: str = "up",
    *,
    inbound: int = 0,
    web: list[str] | None = None,
) -> list[tuple[str, list[str]]]:
    """The children of `mailflow up`: (name, mailflow arguments); `inbound` SMTP server
    processes (several share the port: SO_REUSEPORT); `web`: `mailflow web` with these
    arguments (--host, --port), the HTTP API and pages."""
    return [
        ("relay", ["relay"]),
        *[(f"consumer-{c}", ["consume", c, "--consumer-id", f"{prefix}-{c}"]) for c in consumers],
        ("queuer", ["queuer"]),
        *[(f"worker-{i}", ["worker", "--name", f"{prefix}-worker-{i}"]) for i in range(1, workers + 1)],
        *inbound_parts(inbound),
        *([("web", ["web", *web])] if web is not None else []),
    ]


def inbound_parts(count: int, where: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """`count` inbound SMTP server processes (`where`: their --host/--port); several share
    the port with SO_REUSEPORT, and the kernel spreads the sessions between them."""
    args = ["inbound", *(where or []), "--processes", "1"]
    if count <= 1:
        return [("inbound", args)] if count else []
    return [(f"inbound-{i}", [*args, "--shared-port"]) for i in range(1, count + 1)]


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    pause: float = RESTART_MIN_S  # before the next restart
    restart_in: float | None = None  # the pause before the restart that is due (or was last)
    restart_at: float | None = None
    last_exit: str | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    last_error: str | None = None
    reader: threading.Thread | None = None


def _error_line(line: str) -> str | None:
    """The gist of a log line if it reports an error: a JSON line at error level, an `error:` line, a traceback's last line."""
    text = line.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            rec = json.loads(text)
        except ValueError:
            return None
        if rec.get("level") in ("error", "critical"):
            detail = rec.get("error") or rec.get("detail") or rec.get("exception", "").strip().splitlines()[-1:] or ""
            if isinstance(detail, list):
                detail = detail[0] if detail else ""
            return f"{rec.get('event')}: {detail}".rstrip(": ")
        return None
    if text.startswith(("error:", "Traceback", "Fatal")) or "Error:" in text.split(" ", 1)[0]:
        return text
    return None


def progress_facts(completed: int, failed: int, waiting: int, elapsed_s: float) -> dict[str, Any]:
    """The facts of one `up.progress` line."""
    return {
        "completed": completed,
        "failed": failed,
        "waiting": waiting,
        "interval_s": round(elapsed_s, 1),
        "messages_per_s": round(completed / elapsed_s, 1) if elapsed_s > 0 else 0.0,
    }


def child_problems(
    children: list[Child], restarts_before: dict[str, int], now: float
) -> list[tuple[str, dict[str, Any]]]:
    """A warning for each child that is down now, or was restarted since the last look."""
    out = []
    for c in children:
        restarted = c.restarts - restarts_before.get(c.name, c.restarts)
        if c.proc is None or restarted > 0:
            facts: dict[str, Any] = {
                "child": c.name,
                "running": c.proc is not None,
                "restarts": c.restarts,
                "restarts_since_last": restarted,
                "last_exit": c.last_exit,
                "last_error": c.last_error,
            }
            if c.proc is None and c.restart_at is not None:
                facts["restart_in_s"] = round(max(c.restart_at - now, 0.0), 1)
            out.append(("up.child_down", facts))
    return out


def relay_problems(statuses: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """From the status files (health.read_statuses): is a relay running, and does it have its servers?"""
    relays = [st for st in statuses if st.get("role") == "relay"]
    alive = [st for st in relays if st.get("alive")]
    if not alive:
        last = max(relays, key=lambda st: str(st.get("updated_at", "")), default=None)
        return [
            (
                "up.relay_unhealthy",
                {
                    "problem": "no relay is running: events are not published, consumers and the dashboard fall behind",
                    "last_state": last.get("state") if last else None,
                    "last_seen": last.get("updated_at") if last else None,
                },
            )
        ]
    out = []
    for st in alive:
        for service, health in (st.get("services") or {}).items():
            if not health.get("ok", True):
                out.append(
                    (
                        "up.relay_unhealthy",
                        {
                            "problem": f"the relay lost {service}",
                            "relay": st.get("name"),
                            "pid": st.get("pid"),
                            "service": service,
                            "down_s": health.get("down_s"),
                            "error": health.get("error"),
                        },
                    )
                )
    return out


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Start, watch and restart child `mailflow` processes; `run(stop)` blocks until stop is set."""

    def __init__(
        self,
        settings: Settings,
        parts: list[tuple[str, list[str]]],
        *,
        log_dir: Path | None = None,
        output: IO[str] | None = None,
        health: Health | None = None,
        on_exit: Callable[[Child, int], None] | None = None,
        progress_every_s: float | None = PROGRESS_EVERY_S,
    ) -> None:
        self.settings = settings
        self.children = [Child(name, args) for name, args in parts]
        self.log_dir = log_dir
        self.output = output if output is not None else sys.stdout
        self.health = health
        self.on_exit = on_exit
        self._out_lock = threading.Lock()
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("MAILFLOW_", "NOTIFY_SOCKET", "WATCHDOG_"))
        }
        self.env.update(settings_env(settings))
        self.env["MAILFLOW_PARENT_PID"] = str(os.getpid())
        if settings.log_format == "auto":
            self.env["MAILFLOW_LOG_FORMAT"] = "json"  # children write to a pipe; keep their lines parseable
        self.fatal: Child | None = None
        self.progress_every_s = progress_every_s
        self._db: psycopg.Connection | None = None
        self._seen_seq: int | None = None  # the newest event row counted so far
        self._last_look = 0.0
        self._restarts_seen: dict[str, int] = {}

    # -- children -------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(
            [*MAILFLOW, *child.args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a ^C at the terminal reaches the supervisor only
        )
        child.started = time.monotonic()
        child.restart_at = None
        child.last_error = None
        child.reader = threading.Thread(
            target=self._pump, args=(child, child.proc), daemon=True, name=f"supervisor-{child.name}"
        )
        child.reader.start()
        self._say("info", "supervisor.child_started", child=child.name, pid=child.proc.pid, restarts=child.restarts)

    def _pump(self, child: Child, proc: subprocess.Popen[bytes]) -> None:
        """Copy the child's output (to our stdout, or its log file) and remember its last error."""
        sink: IO[str] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            sink = open(self.log_dir / f"{child.name}.log", "a", encoding="utf-8")  # noqa: SIM115
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace")
                child.tail.append(line.rstrip("\n"))
                gist = _error_line(line)
                if gist:
                    child.last_error = gist[:500]
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                else:
                    with self._out_lock:
                        self.output.write(line)
                        self.output.flush()
        finally:
            if sink is not None:
                sink.close()

    def _reap(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.poll() is None:
            return
        code = proc.returncode
        if child.reader is not None:
            child.reader.join(timeout=2)  # the last lines, before we say why it died
        ran = time.monotonic() - child.started
        child.proc = None
        child.last_exit = describe_exit(code)
        if ran >= HEALTHY_AFTER_S:
            child.pause = RESTART_MIN_S
        facts = {
            "child": child.name,
            "pid": proc.pid,
            "exit": child.last_exit,
            "ran_s": round(ran, 1),
            "last_error": child.last_error,
            "last_line": child.tail[-1][:300] if child.tail else None,
        }
        if code == FATAL_EXIT:
            self._say("error", "supervisor.child_failed", **facts, detail="a configuration error; stopping everything")
            self.fatal = child
        else:
            self._say(
                "error",
                "supervisor.child_exited",
                **facts,
                restart_in_s=round(child.pause, 1),
                restarts=child.restarts + 1,
            )
            child.restart_in = child.pause
            child.restart_at = time.monotonic() + child.pause
            child.pause = min(child.pause * 2, RESTART_MAX_S)
            child.restarts += 1
        if self.on_exit is not None:
            self.on_exit(child, code)
        self._publish()

    def _say(self, level: str, event: str, **facts: Any) -> None:
        """Log one supervisor record: through structlog, or with `log_dir` into supervisor.log there."""
        if self.log_dir is None:
            getattr(log, level)(event, **facts)
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        record = {"event": event, "level": level, "timestamp": datetime.now(UTC).isoformat(), **facts}
        with self._out_lock, open(self.log_dir / "supervisor.log", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _publish(self) -> None:
        if self.health is not None:
            self.health.set(children=[self.describe(c) for c in self.children], now=True)

    @staticmethod
    def describe(c: Child) -> dict[str, Any]:
        return {
            "name": c.name,
            "pid": c.proc.pid if c.proc else None,
            "running": c.proc is not None,
            "restarts": c.restarts,
            "last_exit": c.last_exit,
            "last_error": c.last_error,
        }

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self._publish()
        self._last_look = time.monotonic()
        self._restarts_seen = {c.name: c.restarts for c in self.children}
        self._count_finished()  # where counting starts

    # -- progress and problems ------------------------------------------------------------------

    def _look(self, now: float) -> None:
        """Every `progress_every_s`: one `up.progress` line, and a warning per problem seen."""
        if self.progress_every_s is None or now - self._last_look < self.progress_every_s:
            return
        elapsed, self._last_look = now - self._last_look, now
        counted = self._count_finished()
        if counted is not None:
            self._say("info", "up.progress", **progress_facts(*counted, elapsed_s=elapsed))
        problems = child_problems(self.children, self._restarts_seen, now)
        self._restarts_seen = {c.name: c.restarts for c in self.children}
        if any(c.args[:1] == ["relay"] for c in self.children):
            problems += relay_problems(read_statuses(self.settings.home))
        for event, facts in problems:
            self._say("warning", event, **facts)

    def _count_finished(self) -> tuple[int, int, int] | None:
        """(completed, failed, waiting) since the last count; None if PostgreSQL did not answer."""
        if not self.settings.database_url:
            return None
        try:
            if self._db is None or self._db.closed:
                self._db = connect(self.settings.database_url, connect_timeout=3)
            if self._seen_seq is None:
                self._seen_seq = int(rq.one(self._db, rq.LAST_EVENT_SEQ)["seq"])
                return None
            row = rq.one(self._db, rq.FINISHED_SINCE, {"after": self._seen_seq})
            waiting = rq.one(self._db, rq.WAITING)["waiting"]
        except Exception as exc:  # noqa: BLE001 - the children report outages; this line just waits for the next look
            self._say("warning", "up.progress_unavailable", error=" ".join(str(exc).split())[:300])
            self._close_db()
            return None
        self._seen_seq = int(row["seq"])
        return int(row["completed"]), int(row["failed"]), int(waiting)

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None

    def run(self, stop: threading.Event) -> int:
        """Watch the children until `stop` is set (or one fails fatally); then stop them. Returns an exit code."""
        if not any(c.proc for c in self.children):
            self.start()
        while not stop.is_set() and self.fatal is None:
            if self.health is not None:
                self.health.beat()
            now = time.monotonic()
            for child in self.children:
                self._reap(child)
                if (
                    child.proc is None
                    and child.restart_at is not None
                    and now >= child.restart_at
                    and self.fatal is None
                ):
                    self._spawn(child)
                    self._publish()
            self._look(now)
            stop.wait(0.2)
        self._close_db()
        codes = self.stop()
        if self.fatal is not None:
            return FATAL_EXIT
        unclean = {name: code for name, code in codes.items() if code not in (0, None)}
        if unclean:
            self._say("warning", "supervisor.unclean_stop", children=unclean)
        return 0 if not unclean else 1

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> dict[str, int | None]:
        """SIGTERM every child, wait, SIGKILL what is left; returns their exit codes."""
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for child in self.children:
            if child.proc is None:
                continue
            try:
                codes[child.name] = child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(
                    "error",
                    "supervisor.child_killed",
                    child=child.name,
                    pid=child.proc.pid,
                    detail=f"did not stop within {timeout:.0f} s of SIGTERM",
                )
                child.proc.kill()
                codes[child.name] = child.proc.wait(10)
            if child.reader is not None:
                child.reader.join(timeout=2)
            child.proc = None
        self._publish()
        return codes
