"""mailflow: an event-sourced email pipeline (PostgreSQL event log, Redis Streams fan-out)."""

__version__ = "0.1.0"
