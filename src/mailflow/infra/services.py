"""Configuration room: turn Settings into live PostgreSQL and Redis connections.

One place decides which servers are used (configured URLs or the embedded default),
turns an unreachable server into one clear line that names the URL, and says which
failures are an outage (the server went away for a while: retry) rather than a mistake
(wrong password, no such database: stop and say so).

Connections are set up to notice a dead server quickly: TCP keepalives and a user
timeout on PostgreSQL connections (a blackholed network surfaces in seconds, not after
the kernel's 15 minutes), short connect timeouts, and a pool that checks a connection
before lending it out when it has been idle, so that after a restart the pool does not
hand out the connections the old server closed.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
import redis
import redis.asyncio as aredis
from psycopg.abc import Params, QueryNoTemplate
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from mailflow.config import Settings, check_service_urls, mask_url
from mailflow.errors import ConfigurationError, ServiceUnavailable
from mailflow.infra import embedded
from mailflow.infra.tenancy import Scope

# libpq connection parameters for every PostgreSQL connection (ignored on unix sockets).
CONNECT_KWARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,  # ms: unacknowledged data for this long means the peer is gone
}
# A caller waits this long for a pooled connection, then gets PoolTimeout: when PostgreSQL
# is away, this is how long a process may wait before it notices (and reports) the outage.
POOL_TIMEOUT_S = 5.0
# psycopg_pool retries a lost connection with doubling pauses (1 s, 2 s, 4 s ...) for this
# long, then gives up until the next caller asks; short, so that the first attempt after a
# server comes back is at most a second or two away, not the tail of a long backoff.
POOL_RECONNECT_TIMEOUT_S = 2.0
OUTAGE_WAIT_S = 1.0  # during an outage a caller waits this long per try (see Pool)
IDLE_CHECK_S = 1.0  # a pooled connection idle longer than this is checked before it is lent out

# Failures that mean "PostgreSQL is not there right now" (restart, failover, network):
# psycopg's OperationalError covers lost connections, AdminShutdown (57P01),
# CannotConnectNow (57P03) and psycopg_pool's PoolTimeout; ReadOnlySqlTransaction is a
# connection that landed on a standby during a failover.
POSTGRES_OUTAGE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.ReadOnlySqlTransaction,
)
# Redis: lost connections and timeouts (BusyLoadingError - LOADING - is a ConnectionError),
# and the replies of a server that is failing over or restarting.
_REDIS_OUTAGE_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


def is_postgres_outage(exc: BaseException) -> bool:
    """Is `exc` PostgreSQL going away for a while (worth retrying), not a bug or a bad request?"""
    if isinstance(exc, ServiceUnavailable):
        return exc.transient and exc.service == "postgres"
    return isinstance(exc, POSTGRES_OUTAGE)


def is_redis_outage(exc: BaseException) -> bool:
    """Is `exc` Redis going away for a while (restart, failover, network)?"""
    if isinstance(exc, ServiceUnavailable):
        return exc.transient and exc.service == "redis"
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)):
        return not isinstance(exc, redis.AuthenticationError)
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_REDIS_OUTAGE_REPLIES)


# FATAL refusals at connect time that mean "not now" rather than "never" (libpq's texts).
_TRANSIENT_FATAL = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many clients",
    "remaining connection slots",
    "terminating connection due to administrator command",
)


def _transient_postgres_failure(exc: psycopg.Error) -> bool:
    """A failed connect that may succeed later: no answer, or a server starting or stopping.

    With an SQLSTATE, class 08 (connection), 53 (out of connections) and 57 (operator
    intervention: starting up, shutting down, in recovery) pass; 28 (bad password, no
    pg_hba entry) and 3D (no such database) do not. libpq gives connect failures no
    SQLSTATE, so then the server's words decide: a FATAL refusal is a mistake (no such
    role or database, authentication failed) unless it is one of the "not now" ones; no
    answer at all (refused, timed out, closed) is an outage.
    """
    state = getattr(exc, "sqlstate", None)
    if state is not None:
        return state[:2] in ("08", "53", "57")
    text = str(exc)
    if "FATAL:" not in text:
        return True
    return any(phrase in text for phrase in _TRANSIENT_FATAL)


@dataclass(frozen=True)
class Services:
    """Resolved server URLs and the settings they came from."""

    settings: Settings
    database_url: str
    redis_url: str

    @property
    def prefix(self) -> str:
        return self.settings.redis_prefix


def resolve(settings: Settings, *, start_embedded: bool = True) -> Services:
    """Pick configured URLs, or start/attach to the embedded servers under MAILFLOW_HOME.

    Settings validates the URLs when it reads them; they are checked again here because a
    copy made with model_copy(update=...) is not validated."""
    db_url = settings.database_url
    redis_url = settings.redis_url
    check_service_urls(db_url, redis_url)
    if db_url is None and start_embedded:
        db_url = embedded.ensure_postgres(settings.home)
    if redis_url is None and start_embedded:
        redis_url = embedded.ensure_redis(settings.home)
    if db_url is None or redis_url is None:
        raise ConfigurationError("MAILFLOW_DATABASE_URL and MAILFLOW_REDIS_URL are required")
    return Services(settings=settings, database_url=db_url, redis_url=redis_url)


def scalar(conn: psycopg.Connection[Any], query: QueryNoTemplate, params: Params | None = None) -> Any:
    """The first value of a statement that always returns a row (an aggregate, a function call)."""
    return scalar_row(conn, query, params)[0]


def scalar_row(conn: psycopg.Connection[Any], query: QueryNoTemplate, params: Params | None = None) -> Any:
    """The one row of a statement that always returns a row."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise psycopg.ProgrammingError(f"the statement returned no row: {query!r}")
    return row


def configure_connection(conn: psycopg.Connection) -> None:
    """Per-connection setup: fast JSON decoding; no JIT.

    mailflow's statements are short and frequent. JIT compilation (PostgreSQL >= 11 with
    LLVM) costs tens of milliseconds per statement whenever the planner overestimates a
    table - e.g. a new one without statistics - which once added ~90 ms to every
    sequencer call.
    """
    set_json_loads(orjson.loads, conn)
    conn.execute("SET jit = off")
    if not conn.autocommit:
        conn.commit()


def connect(url: str, *, autocommit: bool = True, scope: Scope | None = None, **kwargs: Any) -> psycopg.Connection:
    """Open one PostgreSQL connection, or raise ServiceUnavailable naming the (masked) URL.

    With `scope`, the connection sees only that tenant's rows (or, for the operator scope,
    every tenant's); without, it is the table owner's (migrations, tests' assertions)."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit, **{**CONNECT_KWARGS, **kwargs})
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServiceUnavailable(
            f"cannot connect to PostgreSQL at {mask_url(url)}: {reason}",
            service="postgres",
            transient=_transient_postgres_failure(exc),
        ) from exc
    except (ValueError, TypeError) as exc:  # malformed conninfo
        raise ServiceUnavailable(f"invalid PostgreSQL URL {mask_url(url)}: {exc}", service="postgres") from exc
    configure_connection(conn)
    if scope is not None:
        scope.apply(conn)
    return conn


_returned_at: weakref.WeakKeyDictionary[psycopg.Connection | psycopg.AsyncConnection, float] = (
    weakref.WeakKeyDictionary()
)


def _idle_long(conn: psycopg.Connection | psycopg.AsyncConnection) -> bool:
    return time.monotonic() - _returned_at.get(conn, 0.0) > IDLE_CHECK_S


def _check_if_idle(conn: psycopg.Connection) -> None:
    """Pool `check` callback: a round trip only for a connection idle long enough to have died.

    Busy connections go straight back out (no cost on the hot path). One that broke in the
    last second fails its caller's statement once; every caller retries its unit of work,
    and `recover_pool()` then clears the rest.
    """
    if _idle_long(conn):
        ConnectionPool.check_connection(conn)


class Pool(ConnectionPool):
    """psycopg_pool's pool, that asks again every second while its server is known to be away.

    A caller waiting for a connection does not make the pool try to connect again; only a
    new request does, once the pool's own retries have given up. So after recover_pool()
    (an outage) each wait is cut to OUTAGE_WAIT_S: callers come back, their requests start
    fresh attempts, and the first one after the server returns succeeds - instead of every
    caller sitting out its whole POOL_TIMEOUT_S. The first connection lent out ends it.
    """

    outage = False

    def getconn(self, timeout: float | None = None) -> psycopg.Connection:
        if self.outage:
            timeout = min(timeout if timeout is not None else self.timeout, OUTAGE_WAIT_S)
        conn = super().getconn(timeout)
        self.outage = False
        return conn

    def putconn(self, conn: psycopg.Connection) -> None:
        # Remember when it came back, for _check_if_idle. (Not a `reset` callback: with one,
        # psycopg_pool hands every returned connection to a background thread.)
        _returned_at[conn] = time.monotonic()
        super().putconn(conn)


def open_pool(
    url: str, *, scope: Scope, min_size: int = 1, max_size: int = 4, timeout: float = POOL_TIMEOUT_S
) -> ConnectionPool:
    """A pool of autocommit connections in `scope`; checks the server first so failures are one line."""
    connect(url).close()

    def configure(conn: psycopg.Connection) -> None:
        configure_connection(conn)
        scope.apply(conn)

    def check(conn: psycopg.Connection) -> None:
        try:
            _check_if_idle(conn)
        except psycopg.Error:
            # Connections break together (a restart, a failover, killed backends): drop the
            # other dead ones now. Left to psycopg_pool, the caller would meet them one by one,
            # with its backoff of 1, 2, 4 s between them, and time out while the server is up.
            recover_pool(pool)
            raise

    pool = Pool(url, configure=configure, check=check, open=True, **_sizes(min_size, max_size, timeout))
    return pool


def _sizes(min_size: int, max_size: int, timeout: float) -> dict[str, Any]:
    """What both kinds of pool are opened with, besides their callbacks."""
    return {
        "min_size": min_size,
        "max_size": max_size,
        "kwargs": {"autocommit": True, **CONNECT_KWARGS},
        "timeout": timeout,
        "reconnect_timeout": POOL_RECONNECT_TIMEOUT_S,
    }


class AsyncPool(AsyncConnectionPool):
    """The event loop's pool (the API's hot reads): as Pool, without the outage waits."""

    async def putconn(self, conn: psycopg.AsyncConnection) -> None:
        _returned_at[conn] = time.monotonic()
        await super().putconn(conn)


async def open_async_pool(url: str, *, scope: Scope, min_size: int = 1, max_size: int = 4) -> AsyncConnectionPool:
    """open_pool() for asyncio: autocommit connections in `scope`, checked when idle a while,
    and every dead one dropped as soon as one is found."""

    async def configure(conn: psycopg.AsyncConnection) -> None:
        set_json_loads(orjson.loads, conn)
        await conn.execute("SET jit = off")
        for sql, params in scope.statements():
            await conn.execute(sql, params or None)

    async def check(conn: psycopg.AsyncConnection) -> None:
        if not _idle_long(conn):
            return
        try:
            await AsyncConnectionPool.check_connection(conn)
        except psycopg.Error:
            await pool.check()  # as open_pool's check does
            raise

    pool = AsyncPool(url, configure=configure, check=check, open=False, **_sizes(min_size, max_size, POOL_TIMEOUT_S))
    await pool.open()
    return pool


def pool_conninfo(pool: ConnectionPool) -> str:
    """The conninfo string a pool connects with (psycopg_pool also allows a callable)."""
    return pool.conninfo if isinstance(pool.conninfo, str) else pool.conninfo()


def recover_pool(pool: ConnectionPool) -> None:
    """After an outage: drop every idle connection that no longer works (they all broke at once),
    and ask for connections again every second until one works (see Pool)."""
    if isinstance(pool, Pool):
        pool.outage = True
    try:
        pool.check()
    except psycopg.Error:  # the server is still away: the pool reconnects by itself
        pass


def _redis_retry(retries: int) -> Retry:
    # A blip of a few hundred milliseconds is absorbed here; anything longer surfaces to the
    # caller's own backoff and outage report instead of blocking it for seconds.
    return Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.25), retries) if retries else Retry(NoBackoff(), 0)


def redis_client(url: str, *, socket_timeout: float | None = 5.0, check: bool = True, retries: int = 2) -> redis.Redis:
    """A Redis client; blocking readers pass a socket_timeout longer than their BLOCK."""
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=5,
            health_check_interval=30,
            retry=_redis_retry(retries),
        )
        if check:
            client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        raise _redis_unavailable(url, exc) from exc
    return client


def async_redis_client(url: str, *, socket_timeout: float = 5.0, retries: int = 0) -> aredis.Redis:
    """An asyncio Redis client. No hidden retries by default: a retried XREADGROUP whose first
    reply was lost would hand entries to this consumer that it never sees."""
    try:
        return aredis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=5,
            health_check_interval=30,
            retry=_redis_retry(retries),
        )
    except ValueError as exc:
        raise _redis_unavailable(url, exc) from exc


def _redis_unavailable(url: str, exc: BaseException) -> ServiceUnavailable:
    transient = not isinstance(exc, (ValueError, redis.AuthenticationError, redis.ResponseError))
    return ServiceUnavailable(
        f"cannot connect to Redis at {mask_url(url)}: {exc}", service="redis", transient=transient
    )
