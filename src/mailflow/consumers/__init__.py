"""Consumers room: everything that reads the event log as a consumer, below the domain rooms.

- groups.py: the consumer-group toolkit - create, read, claim stale entries, acknowledge,
  and tell when Redis lost a stream (sync and asyncio); the only code that speaks XGROUP,
  XREADGROUP, XAUTOCLAIM and XACK.
- runtime.py: ConsumerRunner, which applies a Projection exactly once (checkpoint in the same
  transaction), fills holes from PostgreSQL, dead-letters poison; checkpoints and the
  relay's retention floor.
- projection.py: the Projection interface. inline.py: the one write path (append, inline
  projections, notify after commit). dlq.py: list, retry and drop dead letters.
- queries.py: every SQL statement of this room, by name.
"""

from mailflow.consumers.projection import Projection
from mailflow.consumers.runtime import ConsumerRunner

__all__ = ["ConsumerRunner", "Projection"]
