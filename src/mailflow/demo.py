"""The spine demo: writers append events while the relay and a consumer run, then a summary.

Runs everything in one process against the configured or embedded services, and checks
the result the way an operator would: every event published once, in order, and the
event_counts projection equal to the log.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .app import Runtime
from .consumers.runtime import ConsumerRunner
from .events.envelope import Metadata, NewEvent
from .events.relay import Relay
from .projectors.event_counts import EventCounts

DEMO_TYPES = ("ContactImported", "CampaignCreated", "JobQueued", "MessageDelivered", "BounceReceived", "ReplyReceived")

CHECK = """
SELECT
  (SELECT coalesce(sum(count), 0) FROM event_counts) AS counted,
  (SELECT count(*) FROM (
      SELECT type, date_trunc('hour', recorded_at, 'UTC') h, count(*) n
      FROM events e JOIN event_positions p USING (seq) WHERE p.position <= %(cp)s GROUP BY 1, 2
      EXCEPT
      SELECT type, hour, count FROM event_counts WHERE count > 0) x) AS mismatched
"""


@dataclass
class DemoResult:
    appended: int = 0
    seconds: float = 0.0
    head_before: int = 0
    head: int = 0
    published: int = 0
    checkpoint: int = 0
    mismatched_rows: int = 0
    redis_contiguous: bool = False
    by_type: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.mismatched_rows == 0
            and self.checkpoint == self.head
            and self.redis_contiguous
            and self.head - self.head_before == self.appended
        )


def run(rt: Runtime, events: int = 5000, writers: int = 4, progress: Callable[[int, int], None] | None = None) -> DemoResult:
    res = DemoResult()
    store = rt.store
    settings = rt.settings
    store.sync()
    res.head_before = store.head()
    stop = threading.Event()
    relay = Relay(store, rt.services.redis_url, settings)
    runner = ConsumerRunner(EventCounts(), store, rt.services.redis_url, settings, consumer_id="demo")
    threads = [
        threading.Thread(target=relay.run, args=(stop,), name="relay", daemon=True),
        threading.Thread(target=runner.run, args=(stop,), name="consumer", daemon=True),
    ]
    for t in threads:
        t.start()
    lock = threading.Lock()
    counter = [0]
    per_writer = events // writers

    def write(k: int) -> None:
        rnd = random.Random(k)
        campaign = f"demo-campaign-{int(time.time())}-{k}"
        done = 0
        while done < per_writer:
            n = min(rnd.randint(1, 5), per_writer - done)
            md = Metadata(correlation_id=campaign, actor="mailflow demo")
            batch = [
                NewEvent(rnd.choice(DEMO_TYPES), {"writer": k, "seq": done + i, "rcpt": f"user{rnd.randint(1, 999)}@example.org"}, metadata=md)
                for i in range(n)
            ]
            store.append(f"{campaign}-{done // 50}", batch)
            done += n
            with lock:
                counter[0] += n
                if progress is not None:
                    progress(counter[0], per_writer * writers)

    started = time.perf_counter()
    ws = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    res.appended = counter[0]
    store.notifier.flush()
    target = res.head_before + res.appended
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (relay.stats.last_position < target or runner.checkpoint() < target):
        time.sleep(0.02)
    res.seconds = time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join(10)
    store.sync()
    res.head = store.head()
    res.published = relay.stats.published
    with rt.connect() as conn:
        res.checkpoint = int(
            conn.execute("SELECT position FROM consumer_checkpoints WHERE consumer = 'event_counts'").fetchone()[0]
        )
        counted, res.mismatched_rows = conn.execute(CHECK, {"cp": res.checkpoint}).fetchone()
        res.by_type = dict(
            conn.execute("SELECT type, sum(count)::bigint FROM event_counts GROUP BY type ORDER BY 2 DESC").fetchall()
        )
    ids = [int(eid.split(b"-")[0]) for eid, _ in rt.redis.xrange(rt.keys.events, min=f"{res.head_before + 1}-0")]
    res.redis_contiguous = ids == list(range(res.head_before + 1, res.head + 1))
    return res
