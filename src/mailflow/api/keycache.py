"""API room: the rows of API keys a web process verified lately, so that a request costs no
database round trip to authenticate - without making revocation any slower.

An entry is keyed by the SHA-256 of the whole presented key, so only the exact key that was
verified finds it: a wrong secret for a real key id misses, is looked up in PostgreSQL and
refused as slowly as an unknown id (keys.judge), and timing tells nothing about which ids
exist. An entry holds the key's row, and keys.judge() still decides every request from it
(expiry and source networks are checked against now and the caller each time).

Revocation takes effect at once in every process: migration 0023's triggers send NOTIFY
mailflow_api_keys with the key's id whenever a row changes in a way that can refuse it or goes
away, delivered when the change commits; a thread of each process listens and drops the entry.
While that thread is not listening - starting, PostgreSQL away, the connection broken - the
cache answers nothing and every request reads PostgreSQL, as without it; it is emptied each
time listening starts again, since a notification may have been missed meanwhile. An entry also
lives at most `ttl_s` seconds, which bounds what any missed path could cost.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

from mailflow.infra.health import Backoff
from mailflow.infra.services import connect
from mailflow.log import get_logger

log = get_logger("mailflow.api")

CHANNEL = "mailflow_api_keys"
EVERY_KEY = "*"


class KeyCache:
    def __init__(self, conninfo: str, *, ttl_s: float = 30.0, max_entries: int = 10_000) -> None:
        self.conninfo = conninfo
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._rows: dict[bytes, tuple[float, dict[str, Any]]] = {}
        self._by_id: dict[str, set[bytes]] = {}
        self._lock = threading.Lock()
        self._version = 0  # +1 on every change heard, and whenever listening starts or stops
        self._listening = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def start(self) -> None:
        if self.ttl_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._listen, name="mailflow-api-keys", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self._forget_all()

    def get(self, digest: bytes) -> dict[str, Any] | None:
        """The row verified for this exact key, if it is fresh and changes would have been heard."""
        if not self._listening.is_set():
            return None
        entry = self._rows.get(digest)
        if entry is None or time.monotonic() - entry[0] > self.ttl_s:
            return None
        return entry[1]

    def version(self) -> int:
        """Take this before reading a row from PostgreSQL, and give it to put()."""
        return self._version

    def put(self, digest: bytes, row: dict[str, Any], version: int) -> None:
        """Keep `row`, read after version() returned `version`. If any change was heard since (or
        listening stopped), the row may predate it, and it is not kept."""
        with self._lock:
            if not self._listening.is_set() or version != self._version:
                return
            if len(self._rows) >= self.max_entries:
                self._rows.clear()
                self._by_id.clear()
            self._rows[digest] = (time.monotonic(), row)
            self._by_id.setdefault(row["id"], set()).add(digest)

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._version += 1
            for digest in self._by_id.pop(key_id, ()):
                self._rows.pop(digest, None)

    def _forget_all(self) -> None:
        with self._lock:
            self._version += 1
            self._rows.clear()
            self._by_id.clear()

    def _listen(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                with connect(self.conninfo) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._forget_all()  # whatever changed while nobody listened
                    self._listening.set()
                    backoff = Backoff()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.payload == EVERY_KEY:
                                self._forget_all()
                            else:
                                self.forget(note.payload)
            except (psycopg.Error, OSError) as exc:
                if self._listening.is_set():
                    log.warning("api.key_cache_off", error=str(exc), why="cannot hear key changes; reading every key")
            except Exception as exc:  # noqa: BLE001 - log it and listen again; the cache is off meanwhile
                log.error("api.key_cache_failed", error=repr(exc))
            finally:
                self._listening.clear()
                self._forget_all()
            self._stop.wait(backoff.next())
