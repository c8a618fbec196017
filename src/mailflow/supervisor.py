"""Every long-running part of the pipeline in one process, supervised (`mailflow up`, the demo).

Relay, the event_counts consumer, the queuer and an SMTP worker each run in a thread (the
worker's asyncio loop in its own). A part that crashes is logged and restarted after a
pause; one stop event ends them all, each finishing its batch first.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from .app import Runtime
from .consumers.runtime import ConsumerRunner
from .events.relay import Relay
from .log import get_logger
from .outbound.queuer import Queuer
from .outbound.tokens import load_secret
from .outbound.worker import Worker
from .projectors import get as get_projection

log = get_logger("mailflow.supervisor")


class Pipeline:
    def __init__(self, rt: Runtime, *, consumers: tuple[str, ...] = ("event_counts",), workers: int = 1) -> None:
        self.rt = rt
        s = rt.settings
        url = rt.services.redis_url
        secret = load_secret(s.home, s.secret_key)
        self.relay = Relay(rt.store, url, s)
        self.consumers = [ConsumerRunner(get_projection(n), rt.store, url, s, consumer_id=f"up-{n}") for n in consumers]
        self.queuer = Queuer(rt.store, url, s)
        self.workers = [Worker(rt.store, url, s, secret, name=f"up-worker-{i}") for i in range(workers)]
        self.threads: list[threading.Thread] = []
        self._loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def start(self, stop: threading.Event) -> None:
        parts: list[tuple[str, Callable[[], None]]] = [
            ("relay", lambda: self.relay.run(stop)),
            ("queuer", lambda: self.queuer.run(stop)),
            *[(f"consumer-{c.name}", (lambda c=c: c.run(stop))) for c in self.consumers],
            *[(w.name, (lambda w=w: self._run_worker(w, stop))) for w in self.workers],
        ]
        for name, body in parts:
            t = threading.Thread(target=self._supervise, args=(name, body, stop), name=name, daemon=True)
            t.start()
            self.threads.append(t)

    def _run_worker(self, worker: Worker, stop: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        astop = asyncio.Event()
        self._loops.append((loop, astop))

        def watch() -> None:
            stop.wait()
            loop.call_soon_threadsafe(astop.set)

        threading.Thread(target=watch, daemon=True).start()
        try:
            loop.run_until_complete(worker.run(astop))
        finally:
            loop.close()

    @staticmethod
    def _supervise(name: str, body: Callable[[], None], stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                body()
                return
            except Exception as exc:  # noqa: BLE001 - a crashed part is restarted, not fatal
                log.error("supervisor.part_crashed", part=name, error=" ".join(str(exc).split()))
                stop.wait(2.0)

    def join(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
