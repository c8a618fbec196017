"""Consumers room: what a projection must provide to be run by the consumer runtime."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import psycopg

from mailflow.events.envelope import Envelope

if TYPE_CHECKING:
    from mailflow.config import Settings
    from mailflow.events.store import EventStore


Publish = Callable[[str, bytes], None]  # (pub/sub channel under the key prefix, message)


class Projection(ABC):
    """A read model built from events.

    The runtime calls apply() inside a transaction that also moves the projection's
    checkpoint, so each event is applied exactly once. apply() receives consecutive
    events in position order and must do all its writes through `conn`.
    """

    name: str = ""
    description: str = ""

    def bind(self, store: EventStore, settings: Settings | None = None) -> None:  # noqa: B027 - most need nothing
        """Called once by the runner before the first batch, with the store it reads and
        writes through: a projection that records events of its own (a consumer whose
        effects are events, such as the inbound classifier) keeps it."""

    def committed(self, publish: Publish) -> None:  # noqa: B027 - most need nothing
        """Called after the transaction of an applied batch has committed (never for one that
        was rolled back): what may only be said of committed work is said here, such as the
        facts projection's live metric deltas on pub/sub."""

    @abstractmethod
    def apply(self, conn: psycopg.Connection, events: list[Envelope]) -> None:
        """Apply a batch of consecutive events (one or many)."""

    # A projection that reads its batches from the log itself (in SQL, by position) sets
    # `batch_size` and implements apply_range(): catching up, the runtime then hands it ranges
    # of positions instead of reading and decoding envelopes it would not look at.
    batch_size: int | None = None

    def apply_range(self, conn: psycopg.Connection, after: int, upto: int) -> None:
        """Apply the events with positions in (after, upto] (all of them exist: positions are
        dense), reading them from the log through `conn`."""
        raise NotImplementedError(f"{self.name} is handed envelopes, not ranges")

    @abstractmethod
    def reset(self, conn: psycopg.Connection, from_position: int, applied_upto: int) -> None:
        """Undo the effect of events with position >= from_position (1 = everything).

        applied_upto is the checkpoint: events after it were never applied. Called in the
        same transaction that rewinds the checkpoint to from_position - 1.
        """
