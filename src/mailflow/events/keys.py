"""Events room: names of the Redis keys that are public contracts (docs/events.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "mailflow"

    @property
    def events(self) -> str:
        """Every event, entry ID <position>-0."""
        return f"{self.prefix}:events"

    def dlq(self, consumer: str) -> str:
        """Entries `consumer` gave up on, with the error."""
        return f"{self.prefix}:dlq:{consumer}"

    @property
    def relay_epoch(self) -> str:
        """Set by the relay; its disappearance means Redis lost its data (restart, FLUSHALL)."""
        return f"{self.prefix}:relay:epoch"

    def jobs(self, priority: str) -> str:
        """Work for sender workers: mailflow:jobs:high|normal|low, entry ID <queue_seq>-0."""
        return f"{self.prefix}:jobs:{priority}"

    @property
    def jobs_epoch(self) -> str:
        """Set by the queuer; gone means Redis lost the job streams and they must be refilled."""
        return f"{self.prefix}:jobs:epoch"

    @property
    def notifications(self) -> str:
        """Pub/sub channel for classified inbound mail (replies, bounces, complaints, ...):
        each message is the event's envelope, as in the stream's `event` field."""
        return f"{self.prefix}:notifications"

    @property
    def metrics(self) -> str:
        """Pub/sub channel for real-time metric deltas."""
        return f"{self.prefix}:metrics"
