"""Events room: typed events (pydantic, one model per type) and upcasters for old schemas.

A stored event keeps the schema it was written with. Reading it runs the registered
upcasters in order (schema n -> n+1 -> ...) so code only ever sees the current shape.
Unregistered types pass through untouched: the store is generic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from mailflow.errors import InvalidEventError
from mailflow.events.envelope import Metadata, NewEvent

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class Event(BaseModel):
    """Base class for typed events. Name them as past-tense nouns (`JobQueued`).

    Subclasses may set `event_type` (default: the class name) and `schema_version`
    (default 1; bump it and register an upcaster when the shape changes).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("event_type"):
            cls.event_type = cls.__name__

    def to_new(self, metadata: Metadata | None = None, **kwargs: Any) -> NewEvent:
        return NewEvent(
            type=self.event_type,
            data=self.model_dump(mode="json"),
            schema=self.schema_version,
            metadata=metadata or Metadata(),
            **kwargs,
        )


class EventRegistry:
    """Maps type names to event models and (type, from_schema) to upcasters."""

    def __init__(self) -> None:
        self._models: dict[str, type[Event]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._channels: dict[str, str] = {}  # event type -> pub/sub channel (under the key prefix)

    def register(self, model: type[Event]) -> type[Event]:
        existing = self._models.get(model.event_type)
        if existing is not None and existing is not model:
            raise ValueError(f"event type {model.event_type!r} is registered twice")
        self._models[model.event_type] = model
        return model

    def upcaster(self, event_type: str, from_schema: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: turn data of `event_type` at `from_schema` into `from_schema + 1`."""

        def decorate(fn: Upcaster) -> Upcaster:
            key = (event_type, from_schema)
            if key in self._upcasters:
                raise ValueError(f"two upcasters for {event_type} schema {from_schema}")
            self._upcasters[key] = fn
            return fn

        return decorate

    def announce(self, channel: str, *models: type[Event]) -> None:
        """Events of these types are also published, as they are relayed, on the pub/sub
        channel `<prefix>:<channel>` (live notifications: fire and forget, the stream is the
        record)."""
        for model in models:
            self._channels[model.event_type] = channel

    def channel(self, event_type: str) -> str | None:
        return self._channels.get(event_type)

    def model(self, event_type: str) -> type[Event] | None:
        return self._models.get(event_type)

    def types(self) -> list[str]:
        return sorted(self._models)

    def current_schema(self, event_type: str) -> int | None:
        model = self._models.get(event_type)
        return model.schema_version if model else None

    def has_upcasters(self, event_type: str) -> bool:
        """Whether old schemas of the type are read through upcasters (their shape differs)."""
        return any(t == event_type for t, _ in self._upcasters)

    def upcast(self, event_type: str, schema: int, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Run upcasters until no more apply; returns the (schema, data) a reader should see."""
        if not self._upcasters:
            return schema, data
        while (fn := self._upcasters.get((event_type, schema))) is not None:
            data = fn(dict(data))
            schema += 1
        return schema, data

    def validate(self, event_type: str, schema: int, data: dict[str, Any]) -> dict[str, Any]:
        """Check data of a registered type against its model; unregistered types pass."""
        model = self._models.get(event_type)
        if model is None:
            return data
        schema, data = self.upcast(event_type, schema, data)
        if schema != model.schema_version:
            raise InvalidEventError(
                f"{event_type} schema {schema} cannot be read as the current schema {model.schema_version}"
            )
        try:
            return model.model_validate(data).model_dump(mode="json")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "data"
            raise InvalidEventError(
                f"invalid {event_type} data: {where}: {first['msg']} ({exc.error_count()} error(s))"
            ) from exc

    def decode(self, event_type: str, schema: int, data: dict[str, Any]) -> Event:
        model = self._models.get(event_type)
        if model is None:
            raise InvalidEventError(f"unknown event type {event_type!r}")
        schema, data = self.upcast(event_type, schema, data)
        return model.model_validate(data)


registry = EventRegistry()
"""The process-wide registry that domain rooms register their event types with."""
