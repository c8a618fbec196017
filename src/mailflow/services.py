"""Configuration room: turn Settings into live PostgreSQL and Redis connections.

One place decides which servers are used (configured URLs or the embedded default)
and turns an unreachable server into one clear line that names the URL.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import psycopg
import redis
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool

from . import embedded
from .config import Settings, mask_url
from .errors import ConfigurationError, ServiceUnavailable


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
    """Pick configured URLs, or start/attach to the embedded servers under MAILFLOW_HOME."""
    db_url = settings.database_url
    redis_url = settings.redis_url
    if db_url is None and start_embedded:
        db_url = embedded.ensure_postgres(settings.home)
    if redis_url is None and start_embedded:
        redis_url = embedded.ensure_redis(settings.home)
    if db_url is None or redis_url is None:
        raise ConfigurationError("MAILFLOW_DATABASE_URL and MAILFLOW_REDIS_URL are required")
    return Services(settings=settings, database_url=db_url, redis_url=redis_url)


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


def connect(url: str, *, autocommit: bool = True, **kwargs: object) -> psycopg.Connection:
    """Open one PostgreSQL connection, or raise ServiceUnavailable naming the (masked) URL."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10, **kwargs)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServiceUnavailable(f"cannot connect to PostgreSQL at {mask_url(url)}: {reason}") from exc
    except (ValueError, TypeError) as exc:  # malformed conninfo
        raise ServiceUnavailable(f"invalid PostgreSQL URL {mask_url(url)}: {exc}") from exc
    configure_connection(conn)
    return conn


def open_pool(url: str, *, min_size: int = 1, max_size: int = 4) -> ConnectionPool:
    """A pool of autocommit connections; checks the server first so failures are one line."""
    connect(url).close()
    pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True},
        configure=configure_connection,
        open=True,
    )
    return pool


def redis_client(url: str, *, socket_timeout: float | None = 5.0, check: bool = True) -> redis.Redis:
    """A Redis client; blocking readers pass a socket_timeout longer than their BLOCK."""
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        if check:
            client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        raise ServiceUnavailable(f"cannot connect to Redis at {mask_url(url)}: {exc}") from exc
    return client
