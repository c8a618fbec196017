"""Long-running processes: SIGTERM/SIGINT set a stop flag the main loop checks between batches."""

from __future__ import annotations

import signal
import threading


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """Install handlers so SIGTERM and SIGINT ask the loop to finish its batch and exit 0."""
    stop = stop or threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
