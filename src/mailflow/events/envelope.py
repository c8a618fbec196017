"""Events room: the public JSON envelope every event travels in (see docs/events.md)."""

from __future__ import annotations

import getpass
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from mailflow.errors import InvalidEventError

METADATA_KEYS = ("correlation_id", "causation_id", "tenant", "actor")


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): new ids land at the right edge of the
    unique index instead of on random pages, which keeps appends fast as the log grows."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return uuid.UUID(int=value)


def default_actor() -> str:
    """Who is acting when the caller does not say: user@host:pid of this process."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class Acting:
    """Who is acting for the code running now, and in which conversation: set by the HTTP API
    for one request (its X-Request-Id, its key), so every event the request appends carries
    them - including the events of jobs it creates, which remember their correlation id."""

    correlation_id: str | None = None
    actor: str | None = None  # may be learnt inside the block (once the request is authenticated)


_ACTING: ContextVar[Acting | None] = ContextVar("mailflow_acting", default=None)


@contextmanager
def acting(correlation_id: str | None = None, actor: str | None = None) -> Iterator[Acting]:
    """Within the block (and threads started from its context), appended events take this
    correlation id, and this actor when they name none."""
    now = Acting(correlation_id, actor)
    token = _ACTING.set(now)
    try:
        yield now
    finally:
        _ACTING.reset(token)


def current_acting() -> Acting | None:
    return _ACTING.get()


@dataclass(slots=True)
class Metadata:
    """Who caused an event and which conversation of events it belongs to."""

    correlation_id: str | None = None
    causation_id: str | None = None
    tenant: str | None = None
    actor: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "tenant": self.tenant,
            "actor": self.actor,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Metadata:
        raw = raw or {}
        unknown = set(raw) - set(METADATA_KEYS)
        if unknown:
            raise InvalidEventError(f"unknown metadata keys {sorted(unknown)}; allowed: {', '.join(METADATA_KEYS)}")
        return cls(**{k: (None if raw.get(k) is None else str(raw[k])) for k in METADATA_KEYS})

    def caused_by(self, envelope: Envelope) -> Metadata:
        """Metadata for an event caused by `envelope`: same correlation, causation = its id."""
        return Metadata(
            correlation_id=envelope.metadata.correlation_id or str(envelope.id),
            causation_id=str(envelope.id),
            tenant=envelope.metadata.tenant,
            actor=self.actor,
        )


@dataclass(slots=True)
class NewEvent:
    """An event about to be appended. `id` makes the append idempotent: retrying is safe."""

    type: str
    data: dict[str, Any]
    schema: int = 1
    id: uuid.UUID = field(default_factory=uuid7)
    metadata: Metadata = field(default_factory=Metadata)


@dataclass(slots=True)
class Envelope:
    """A stored event. `position` is None until the sequencer has placed it in the global order."""

    id: uuid.UUID
    position: int | None
    stream: str
    version: int
    type: str
    schema: int
    data: dict[str, Any]
    metadata: Metadata
    recorded_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "position": self.position,
            "stream": self.stream,
            "version": self.version,
            "type": self.type,
            "schema": self.schema,
            "data": self.data,
            "metadata": self.metadata.to_dict(),
            "recorded_at": _iso(self.recorded_at),
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Envelope:
        try:
            return cls(
                id=uuid.UUID(str(raw["id"])),
                position=None if raw.get("position") is None else int(raw["position"]),
                stream=str(raw["stream"]),
                version=int(raw["version"]),
                type=str(raw["type"]),
                schema=int(raw["schema"]),
                data=dict(raw["data"]),
                metadata=Metadata.from_dict(raw.get("metadata")),
                recorded_at=datetime.fromisoformat(str(raw["recorded_at"]).replace("Z", "+00:00")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidEventError(f"malformed event envelope: {exc!r}") from exc

    @classmethod
    def from_json(cls, raw: bytes | str) -> Envelope:
        try:
            return cls.from_dict(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise InvalidEventError(f"malformed event envelope JSON: {exc}") from exc


def _iso(ts: datetime) -> str:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")
