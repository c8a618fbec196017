"""Wiring: build the store, pool and Redis client that commands and processes share.

The CLI and long-running processes get their collaborators from one Runtime, built from
Settings once, instead of reaching for globals.
"""

from __future__ import annotations

from functools import cached_property

import psycopg
import redis
from psycopg_pool import ConnectionPool

from .config import Settings
from .errors import ConfigurationError
from .events.keys import Keys
from .events.store import EventStore
from .migrate import migrate, pending
from .services import Services, connect, open_pool, redis_client, resolve


class Runtime:
    def __init__(self, settings: Settings, *, pool_size: int = 4) -> None:
        self.settings = settings
        self.pool_size = pool_size
        self._closed = False

    @cached_property
    def services(self) -> Services:
        return resolve(self.settings)

    @cached_property
    def keys(self) -> Keys:
        return Keys(self.settings.redis_prefix)

    def connect(self) -> psycopg.Connection:
        return connect(self.services.database_url)

    def ensure_schema(self) -> None:
        """Embedded databases are ours: migrate them. Configured ones must be migrated explicitly."""
        with self.connect() as conn:
            todo = pending(conn)
            if not todo:
                return
            if self.settings.database_url is None:
                migrate(conn)
                return
        raise ConfigurationError(
            f"the database needs {len(todo)} migration(s) ({todo[0]} first); run `mailflow migrate`"
        )

    @cached_property
    def pool(self) -> ConnectionPool:
        self.ensure_schema()
        return open_pool(self.services.database_url, max_size=self.pool_size)

    @cached_property
    def store(self) -> EventStore:
        return EventStore(self.pool, notify_min_interval_s=self.settings.notify_interval_s)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis_client(self.services.redis_url)

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
