"""Events room: event types, the JSON envelope, upcasting, the PostgreSQL store and the relay.

Knows nothing about email; domain rooms register their own event types here.
"""

from mailflow.events.envelope import Envelope, Metadata, NewEvent
from mailflow.events.registry import Event, EventRegistry, registry
from mailflow.events.store import ANY, NO_STREAM, EventStore

__all__ = [
    "ANY",
    "NO_STREAM",
    "Envelope",
    "Event",
    "EventRegistry",
    "EventStore",
    "Metadata",
    "NewEvent",
    "registry",
]
