"""Wiring: build the store, pool and Redis client that commands and processes share.

The CLI and long-running processes get their collaborators from one Runtime, built from
Settings once, instead of reaching for globals.
"""

from __future__ import annotations

import contextlib
import threading
from functools import cached_property

import psycopg
import redis
from psycopg_pool import ConnectionPool

from mailflow.config import Settings
from mailflow.errors import ConfigurationError, NotFoundError
from mailflow.events.keys import Keys
from mailflow.events.store import EventStore
from mailflow.infra.health import Backoff, Health
from mailflow.infra.migrate import migrate, pending
from mailflow.infra.personal import People
from mailflow.infra.services import (
    Services,
    connect,
    is_postgres_outage,
    is_redis_outage,
    open_pool,
    redis_client,
    resolve,
)
from mailflow.infra.tenancy import Scope
from mailflow.infra.vault import Keyring, Vault


class Runtime:
    """Collaborators for one scope: a tenant's (the CLI's default: MAILFLOW_TENANT or --tenant)
    or every tenant's (`operator=True`: the long-running processes, rebuilds)."""

    def __init__(self, settings: Settings, *, pool_size: int = 4, operator: bool = False) -> None:
        self.settings = settings
        self.pool_size = pool_size
        self.scope = Scope.operator() if operator else Scope.of(settings.tenant)
        self._closed = False

    @property
    def tenant(self) -> str | None:
        """The tenant this runtime acts for; None for the operator."""
        return self.scope.tenant

    @cached_property
    def services(self) -> Services:
        return resolve(self.settings)

    @cached_property
    def keyring(self) -> Keyring:
        """The master keys (MAILFLOW_SECRET_KEY[_FILE], else MAILFLOW_HOME/secret.key)."""
        s = self.settings
        return Keyring.load(s.home, s.secret_key, s.secret_key_file)

    @cached_property
    def vault(self) -> Vault:
        return Vault(self.keyring)

    @cached_property
    def keys(self) -> Keys:
        return Keys(self.settings.redis_prefix)

    def connect(self) -> psycopg.Connection:
        """One autocommit connection in this runtime's scope."""
        self.pool  # noqa: B018 - the schema is checked and the tenant known before any read
        return connect(self.services.database_url, scope=self.scope)

    def connect_owner(self) -> psycopg.Connection:
        """A connection as the tables' owner, in no tenant's scope: for migrations only."""
        return connect(self.services.database_url)

    def ensure_schema(self) -> None:
        """Embedded databases are ours: migrate them. Configured ones must be migrated explicitly."""
        with self.connect_owner() as conn:
            todo = pending(conn)
            if not todo:
                return
            if self.settings.database_url is None:
                self.migrate(conn)
                return
        raise ConfigurationError(
            f"the database needs {len(todo)} migration(s) ({todo[0]} first); run `mailflow migrate`"
        )

    def migrate(self, conn: psycopg.Connection) -> list[str]:
        """Apply pending migrations. After one that rewrote stored events, the Redis copy of the
        log is dropped (when Redis answers), so that the relay republishes the rewritten ones."""
        done = migrate(conn, keyring=self.keyring)
        if any(name.endswith(".py") for name in done):
            with contextlib.suppress(Exception):
                r = redis_client(self.services.redis_url)
                try:
                    doomed = [self.keys.events, self.keys.relay_epoch, *r.scan_iter(match=self.keys.dlq("*"))]
                    r.delete(*doomed)
                finally:
                    r.close()
        return done

    @cached_property
    def pool(self) -> ConnectionPool:
        self.ensure_schema()
        pool = open_pool(self.services.database_url, scope=self.scope, max_size=self.pool_size)
        if self.scope.tenant is not None:
            try:
                with pool.connection() as conn:
                    known = conn.execute("SELECT 1 FROM tenants WHERE id = %s", (self.scope.tenant,)).fetchone()
            except BaseException:
                pool.close()
                raise
            if known is None:
                pool.close()
                raise NotFoundError(
                    f"no tenant {self.scope.tenant!r}; create it with `mailflow tenants create {self.scope.tenant}`"
                )
        return pool

    @cached_property
    def store(self) -> EventStore:
        return EventStore(
            self.pool,
            tenant=self.scope.tenant,
            notify_min_interval_s=self.settings.notify_interval_s,
            people=People(self.keyring),
        )

    @cached_property
    def redis(self) -> redis.Redis:
        return redis_client(self.services.redis_url)

    def wait_until_ready(self, stop: threading.Event, health: Health) -> bool:
        """For long-running processes: wait out a PostgreSQL or Redis that is not there yet.

        A process started while a server restarts (systemd after a crash, a supervisor
        after kill -9) waits for it, reporting the outage once, instead of exiting. A
        mistake - a wrong password, no such database, pending migrations - still ends
        the process at once with its one line. False if stopped while waiting.
        """
        backoff = Backoff()
        while not stop.is_set():
            try:
                self.store  # noqa: B018 - opens the pool (and checks the schema)
                health.ok("postgres")
                redis_client(self.services.redis_url).close()
                health.ok("redis")
                return True
            except Exception as exc:
                if is_postgres_outage(exc):
                    health.lost("postgres", exc)
                elif is_redis_outage(exc):
                    health.lost("redis", exc)
                else:
                    raise
            stop.wait(backoff.next())
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if "store" in self.__dict__:
            self.store.close()
        if "pool" in self.__dict__:
            self.pool.close()
        if "redis" in self.__dict__:
            self.redis.close()
