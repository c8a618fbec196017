"""Long-running processes: one active instance per role, by PostgreSQL advisory lock.

The instance that holds the role's session-level advisory lock leads; others wait as hot
standbys and take over within about a second when the leader's connection goes away
(crash, kill -9, network). A lost connection to PostgreSQL or Redis ends the term: the
instance reconnects and competes for the lock again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
import redis
import structlog

from .errors import ServiceUnavailable
from .services import connect

RECOVERABLE = (psycopg.OperationalError, ServiceUnavailable, redis.ConnectionError, redis.TimeoutError)


def run_as_leader(
    role: str,
    lock_key: int,
    conninfo: str,
    stop: threading.Event,
    lead: Callable[[psycopg.Connection], None],
    log: structlog.typing.FilteringBoundLogger,
    is_leader: threading.Event | None = None,
) -> None:
    """Compete for `role` until `stop` is set; call lead(lock_connection) while leading."""
    while not stop.is_set():
        try:
            with connect(conninfo) as lock_conn:
                if not _acquire(role, lock_key, lock_conn, stop, log):
                    return
                log.info(f"{role}.leader", pid=lock_conn.info.backend_pid)
                if is_leader is not None:
                    is_leader.set()
                try:
                    lead(lock_conn)
                finally:
                    if is_leader is not None:
                        is_leader.clear()
        except RECOVERABLE as exc:
            log.warning(f"{role}.connection_lost", error=" ".join(str(exc).split()))
            stop.wait(1.0)


def _acquire(role: str, key: int, conn: psycopg.Connection, stop: threading.Event, log) -> bool:
    announced = False
    while not stop.is_set():
        if conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            return True
        if not announced:
            log.info(f"{role}.standby", reason=f"another {role} holds the leader lock")
            announced = True
        stop.wait(1.0)
    return False
