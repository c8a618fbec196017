"""Events room: wake the relay after appends commit, one NOTIFY per burst of commits.

PostgreSQL serialises every committing transaction that sent a NOTIFY (a global lock held
until after the commit record is flushed), which caps concurrent appends. So appends do not
NOTIFY inside their transaction. After a commit the store pokes this notifier; a background
thread sends one asynchronously-committed NOTIFY for all pokes that arrived since the last
one, at most once per `min_interval_s`. The last commit of a burst always gets a NOTIFY
(trailing edge); if the process dies first, the relay's polling fallback finds the events.
"""

from __future__ import annotations

import threading
import time

import psycopg

from mailflow.events import queries as q


class Notifier:
    def __init__(self, conninfo: str, channel: str, min_interval_s: float = 0.01) -> None:
        self.conninfo = conninfo
        self.channel = channel
        self.min_interval_s = min_interval_s
        self._pending = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._conn: psycopg.Connection | None = None

    def poke(self) -> None:
        """Ask for a NOTIFY soon; cheap, never blocks on the database."""
        if self._closed:
            return
        with self._lock:
            self._idle.clear()
            self._pending.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mailflow-notifier", daemon=True)
                self._thread.start()

    def flush(self, timeout: float = 2.0) -> None:
        """Wait until every poke so far has been sent (used before a short-lived process exits)."""
        if self._thread is not None:
            self._idle.wait(timeout)

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._pending.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._conn is not None:
            self._conn.close()

    def _send(self) -> None:
        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.conninfo, autocommit=True)
                self._conn.execute(q.NOTIFY, (self.channel,))
                return
            except psycopg.Error:
                # A lost wake-up only delays the relay until its next poll; reconnect once.
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if attempt == 2:
                    return

    def _run(self) -> None:
        while True:
            self._pending.wait()
            if self._closed:
                return
            self._pending.clear()
            self._send()
            with self._lock:
                if not self._pending.is_set():
                    self._idle.set()
            if self.min_interval_s > 0:
                time.sleep(self.min_interval_s)
