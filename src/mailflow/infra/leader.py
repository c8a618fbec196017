"""Long-running processes: one active instance per role, by PostgreSQL advisory lock.

The instance that holds the role's session-level advisory lock leads; others wait as hot
standbys and take over within about a second when the leader's connection goes away
(crash, kill -9, network). A lost connection to PostgreSQL or Redis ends the term: the
instance reports the outage (once, see health.py), clears the pool's dead connections,
backs off, reconnects and competes for the lock again. It never exits because a server
went away for a while.

A leader must notice when its lock connection dies even if it does its work through
other connections (the queuer does): `Term.check()` proves the session, and so the lock,
is still there, at most once a second; otherwise a standby could lead beside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import redis
import structlog
from psycopg_pool import ConnectionPool

from mailflow.infra.health import Backoff, Health
from mailflow.infra.services import (
    connect,
    is_postgres_outage,
    is_redis_outage,
    pool_conninfo,
    recover_pool,
    redis_client,
    scalar,
)

LOCK_CHECK_INTERVAL_S = 1.0


class LockLost(psycopg.OperationalError):
    """The leader's lock connection no longer answers: its lock is gone with it."""


class Term:
    """One term of leadership: the lock connection, and a cheap proof that it still holds."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.began = time.monotonic()
        self._checked = time.monotonic()

    def check(self) -> None:
        if time.monotonic() - self._checked < LOCK_CHECK_INTERVAL_S:
            return
        try:
            self.conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise LockLost(f"the leader lock connection was lost: {exc}") from exc
        self._checked = time.monotonic()


def run_as_leader(
    role: str,
    lock_key: int,
    pool: ConnectionPool,
    stop: threading.Event,
    lead: Callable[[Term], None],
    log: structlog.typing.FilteringBoundLogger,
    health: Health,
    is_leader: threading.Event | None = None,
    redis_url: str | None = None,
) -> None:
    """Compete for `role` until `stop` is set; call lead(term) while leading.

    `lead` reports its own successes (health.ok) after each unit of work, so an outage is
    over when work gets done again, not merely when a connection could be opened. A
    standby PINGs `redis_url` every second, so that its status tells whether it could take
    over, not what it last saw as a leader.
    """
    probe = redis_client(redis_url, check=False) if redis_url else None
    try:
        _compete(role, lock_key, pool, stop, lead, log, health, is_leader, probe)
    finally:
        if probe is not None:
            probe.close()


def _compete(
    role: str,
    lock_key: int,
    pool: ConnectionPool,
    stop: threading.Event,
    lead: Callable[[Term], None],
    log: structlog.typing.FilteringBoundLogger,
    health: Health,
    is_leader: threading.Event | None,
    probe: redis.Redis | None,
) -> None:
    backoff = Backoff()
    while not stop.is_set():
        try:
            with connect(pool_conninfo(pool)) as lock_conn:
                if not _acquire(role, lock_key, lock_conn, stop, log, health, probe):
                    return
                log.info(f"{role}.leader", pid=lock_conn.info.backend_pid)
                health.set(leader=True, now=True)
                if is_leader is not None:
                    is_leader.set()
                try:
                    lead(Term(lock_conn))
                    backoff.reset()
                finally:
                    health.set(leader=False, now=True)
                    if is_leader is not None:
                        is_leader.clear()
        except Exception as exc:
            if is_postgres_outage(exc):
                health.lost("postgres", exc)
                recover_pool(pool)
            elif is_redis_outage(exc):
                health.lost("redis", exc)
            else:
                raise
            stop.wait(backoff.next())


def _acquire(
    role: str, key: int, conn: psycopg.Connection, stop: threading.Event, log, health: Health, probe: redis.Redis | None
) -> bool:
    announced = False
    while not stop.is_set():
        health.beat()
        won = scalar(conn, "SELECT pg_try_advisory_lock(%s)", (key,))
        health.ok("postgres")
        if won:
            return True
        if probe is not None:
            try:
                probe.ping()
                health.ok("redis")
            except Exception as exc:
                if not is_redis_outage(exc):
                    raise
                health.lost("redis", exc)
        if not announced:
            log.info(f"{role}.standby", reason=f"another {role} holds the leader lock")
            health.set(leader=False, now=True)
            announced = True
        stop.wait(1.0)
    return False
