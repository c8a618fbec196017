"""Long-running processes: SIGTERM/SIGINT set a stop flag the main loop checks between batches; is a pid alive."""

from __future__ import annotations

import os
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


def pid_alive(pid: int) -> bool:
    """Does a process with this pid exist (on this host)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
