"""Commands room: what every command shares - output consoles, --json, settings and the runtime, read
once per invocation, and the frame of long-running processes.

User errors are one line on stderr and a non-zero exit, never a traceback (cli.main()).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
import typer
from rich.console import Console

from mailflow import log
from mailflow.config import Settings, load_settings
from mailflow.errors import MailflowError, UsageError

if TYPE_CHECKING:
    from mailflow.infra.health import Health
    from mailflow.runtime.wiring import Runtime

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOpt = typer.Option(False, "--json", help="Machine-readable output (one JSON document on stdout).")


def new_app(help: str | None = None) -> typer.Typer:
    """A command module's app: a group when it has help (`mailflow <noun> <verb>`), else one command.

    Plain click help (no rich boxes, flags without a `<bool>` value), no shell-completion options."""
    return typer.Typer(
        help=help,
        no_args_is_help=help is not None,
        add_completion=False,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["--help", "-h"], "max_content_width": 80},
    )


class State:
    settings: Settings | None = None
    runtime: Runtime | None = None


state = State()


def settings() -> Settings:
    if state.settings is None:
        state.settings = load_settings()
    return state.settings


def runtime(pool_size: int = 4, *, operator: bool = False) -> Runtime:
    """The invocation's runtime: the tenant's (MAILFLOW_TENANT / --tenant), or, with
    `operator`, every tenant's - for the long-running processes and the operator-wide
    commands (rebuilds, dead letters, `events tail --all-tenants`)."""
    from mailflow.runtime.wiring import Runtime

    if state.runtime is not None and state.runtime.scope.is_operator != operator:
        state.runtime.close()
        state.runtime = None
    if state.runtime is None:
        state.runtime = Runtime(settings(), pool_size=pool_size, operator=operator)
    return state.runtime


def close() -> None:
    if state.runtime is not None:
        state.runtime.close()
        state.runtime = None


def emit_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
    sys.stdout.flush()


def iso(v: object) -> object:
    return v.isoformat() if isinstance(v, datetime) else v


def quiet_logs() -> None:
    s = settings()
    log.configure(level="warning" if s.log_level == "info" else s.log_level, fmt=s.log_format)


_AGO = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(raw: str, option: str = "--since") -> datetime:
    """A moment: ISO 8601 (`2026-11-30`, `2026-11-30T12:00Z`) or how long ago (`30m`, `24h`,
    `7d`, `2w`); UsageError for anything else."""
    return _moment(raw, option, -1)


def parse_until(raw: str, option: str = "--until") -> datetime:
    """A moment: ISO 8601, or how long from now (`30m`, `24h`, `90d`)."""
    return _moment(raw, option, +1)


def _moment(raw: str, option: str, sign: int) -> datetime:
    from datetime import UTC, timedelta

    text = raw.strip()
    if text[:-1].isdigit() and text[-1:].lower() in _AGO:
        return datetime.now(UTC) + sign * timedelta(seconds=int(text[:-1]) * _AGO[text[-1].lower()])
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{option} {raw!r}: give a date or time (2026-11-30, 2026-11-30T12:00Z) or 30m, 24h, 7d"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def parse_json_object(raw: str, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def stop_with_parent(stop: threading.Event) -> None:
    """A child of `mailflow up` stops (as on SIGTERM) when its supervisor is gone, even after kill -9."""
    parent = os.environ.get("MAILFLOW_PARENT_PID", "")
    if not parent.isdigit():
        return

    def watch() -> None:
        while not stop.wait(1.0):
            if os.getppid() != int(parent):
                stop.set()
                return

    threading.Thread(target=watch, name="mailflow-parent-watch", daemon=True).start()


def run_process(
    role: str, name: str | None, body: Callable[[Runtime, threading.Event, Health], None], *, pool_size: int = 4
) -> None:
    """The frame of every long-running command: log lines on stdout, SIGTERM/SIGINT ask `body`
    to stop, servers that are not up yet are waited for (health.py reports the outage), and
    the process's status is published under MAILFLOW_HOME/run (and to systemd)."""
    from mailflow.infra.health import Health, status_dir
    from mailflow.infra.lifecycle import stop_on_signals

    s = settings()
    log.configure(s.log_level, s.log_format, stream=sys.stdout)
    stop = stop_on_signals()
    health = Health(
        role,
        name or f"{socket.gethostname()}-{os.getpid()}",
        log.get_logger(f"mailflow.{role}"),
        status_dir=status_dir(s.home),
    )
    rt = runtime(pool_size=pool_size, operator=True)
    stop_with_parent(stop)
    code = 70
    try:
        if rt.wait_until_ready(stop, health):
            health.start()
            body(rt, stop, health)
        code = 0
    except MailflowError as exc:
        code = exc.exit_code
        raise
    except typer.Exit as exc:
        code = exc.exit_code
        raise
    finally:
        health.close(code)
