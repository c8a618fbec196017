"""Projectors room: real-time metric deltas on the `<prefix>:metrics` pub/sub channel.

The facts consumer hands over the facts of each batch once its transaction has committed
(never before: a batch that is rolled back and applied again publishes once); they are summed
per tenant and published at most every `every_s` per tenant (a few messages a second however
busy the tenant is) by a flusher thread, so a quiet moment after a burst still goes out within
`every_s`. Facts older than LIVE_S (a rebuild, a consumer catching up after an outage) are not
published: the dashboard reads them from the aggregates when it catches up.

A message (JSON, documented in docs/events.md):
    {"tenant": "acme", "at_ms": 1764745200123, "position": 1234,
     "counters": {"sent": 3, "delivered": 2}}
where `counters` are the dashboard's card counters (analytics.cards) and only the non-zero ones.
Pub/sub may drop a message (a subscriber that reconnects misses what was said meanwhile): the
browser catches up from a snapshot when it reconnects, so a lost delta is never wrong for long.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from mailflow.log import get_logger

Publish = Callable[[bytes], None]
LIVE_S = 300.0  # facts recorded longer ago than this are not published
log = get_logger("mailflow.metrics")


class MetricsPublisher:
    def __init__(self, publish: Publish, *, every_s: float = 0.25) -> None:
        self._publish = publish
        self.every_s = every_s
        self._pending: dict[str, Counter[str]] = {}
        self._position: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self.published = 0
        self._thread = threading.Thread(target=self._run, name="mailflow-metrics", daemon=True)
        self._thread.start()

    def add(self, deltas: Iterable[Any], counters: Callable[[list[dict[str, Any]]], dict[str, int]]) -> None:
        """Add a committed batch's deltas: (tenant, kind, human, unique, facts, largest position)
        rows of the facts recorded in the last LIVE_S (queries.FACTS_OF_BATCH); `counters`
        makes the card counters of rows."""
        rows: dict[str, list[dict[str, Any]]] = {}
        last: dict[str, int] = {}
        for tenant, kind, human, unique, n, position in deltas:
            rows.setdefault(tenant, []).append(
                {
                    "kind": kind,
                    "n": n,
                    "human": n if human else 0,
                    "uniq": n if unique else 0,
                    "latency_ms_sum": 0,
                    "latency_n": 0,
                }
            )
            last[tenant] = max(last.get(tenant, 0), position)
        if not rows:
            return
        with self._lock:
            for tenant, found in rows.items():
                delta = {k: v for k, v in counters(found).items() if v}
                self._pending.setdefault(tenant, Counter()).update(delta)
                self._position[tenant] = max(self._position.get(tenant, 0), last[tenant])
        self._wake.set()

    def flush(self, *, force: bool = False) -> int:
        """Publish each tenant's pending deltas whose `every_s` has passed; how many were sent."""
        now = time.monotonic()
        with self._lock:
            due = [t for t, c in self._pending.items() if c and (force or now - self._last.get(t, 0.0) >= self.every_s)]
            messages = []
            for t in due:
                messages.append(
                    {
                        "tenant": t,
                        "at_ms": int(time.time() * 1000),
                        "position": self._position.get(t, 0),
                        "counters": dict(self._pending.pop(t)),
                    }
                )
                self._last[t] = now
        for m in messages:
            try:
                self._publish(orjson.dumps(m))
                self.published += 1
            except Exception as exc:  # noqa: BLE001 - Redis away: the dashboard catches up on reconnect
                log.warning("metrics.publish_failed", error=str(exc)[:200])
        return len(messages)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self.every_s)
            self._wake.clear()
            self.flush()
            with self._lock:
                waiting = any(self._pending.values())
            if waiting:
                time.sleep(min(self.every_s, 0.05))

    def close(self) -> None:
        self.flush(force=True)
        self._stopped = True
        self._wake.set()
