"""Events room: the event catalogue - every registered type, its current schema version, the
JSON Schema of its `data` and its pub/sub channel - and the AsyncAPI 3 document of the Redis
keys integrators read (docs/events.md, "The event catalogue"; docs/asyncapi.json).

Integrators in other languages validate what they read with a JSON Schema library alone, so
every schema here is self-contained draft 2020-12: pydantic's `$defs` are inlined, and the
only `$ref`s are AsyncAPI's own, between channels, operations and components. Data schemas
are pydantic's serialization schemas, because what is stored is the model's
`model_dump(mode="json")` (registry.validate). Knows nothing about email: the channels of
other rooms (the job streams, the webhooks) are handed in as `Part`s by the composition root
(runtime/catalog.py).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.errors import PydanticUserError

import mailflow
from mailflow.errors import MailflowError
from mailflow.events.envelope import METADATA_KEYS
from mailflow.events.keys import Keys
from mailflow.events.registry import EventRegistry

ASYNCAPI_VERSION = "3.0.0"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
# AsyncAPI 3's Multi Format Schema Object: every schema in the document is draft 2020-12.
SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
UNREGISTERED = "UnregisteredEvent"  # the message of types no room registered (the store is generic)

Schema = dict[str, Any]


class CatalogError(MailflowError):
    """A registered event type cannot be described: no pydantic model, or no JSON Schema."""


# -- the catalogue (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class EventType:
    """One registered event type as integrators see it. `channel` is the pub/sub channel
    (under the key prefix) it is also announced on, if any."""

    type: str
    schema_version: int
    json_schema: Schema  # of the envelope's `data`, self-contained draft 2020-12
    channel: str | None
    description: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "schema": self.schema_version,
            "channel": self.channel,
            "description": self.description,
            "json_schema": self.json_schema,
        }


def event_types(registry: EventRegistry) -> list[EventType]:
    """Every registered type, by name; CatalogError if one has no model or no JSON Schema."""
    found = []
    for name in registry.types():
        model = registry.model(name)
        found.append(
            EventType(
                type=name,
                schema_version=int(getattr(model, "schema_version", 0)),
                json_schema=data_schema(name, model),
                channel=registry.channel(name),
                description=one_line(getattr(model, "__doc__", None)),
            )
        )
    return found


def data_schema(name: str, model: object) -> Schema:
    """The JSON Schema of `model`'s stored data, its `$defs` inlined."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise CatalogError(f"event type {name!r} is registered without a pydantic model, so it has no schema")
    try:
        raw = model.model_json_schema(mode="serialization")
    except PydanticUserError as exc:  # e.g. a field of a type pydantic cannot describe
        raise CatalogError(f"event type {name!r} has no JSON Schema: {exc}") from exc
    if raw.get("type") != "object" or "properties" not in raw:
        raise CatalogError(f"event type {name!r}: its schema does not describe an object with properties")
    return inline_defs(raw)


def inline_defs(schema: Schema) -> Schema:
    """`schema` with every `{"$ref": "#/$defs/X"}` replaced by X (siblings of the `$ref` kept):
    a sub-schema taken out of a larger document must not point at a root it no longer has.
    Recursive models cannot be inlined: CatalogError."""
    defs: Mapping[str, Any] = schema.get("$defs", {})

    def walk(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [walk(n, seen) for n in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in seen:
                raise CatalogError(f"{name} refers to itself; a recursive schema cannot be inlined")
            if name not in defs:
                raise CatalogError(f"$ref {ref!r} names no definition")
            merged = {**walk(defs[name], (*seen, name)), **{k: walk(v, seen) for k, v in node.items() if k != "$ref"}}
            return merged
        return {k: walk(v, seen) for k, v in node.items() if k != "$defs"}

    return walk(schema, ())


_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def one_line(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line ("" without one)."""
    if not doc:
        return ""
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    return _SENTENCE_END.split(paragraph, 1)[0]


# -- the envelope and the stream entry (pure) --------------------------------------------------

_RECORDED_AT = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z$"
_DECIMAL = r"^[1-9][0-9]*$"
_METADATA = {
    "correlation_id": "The conversation the event belongs to; the event's own id if the writer gave none.",
    "causation_id": "The id of the event that caused this one.",
    "tenant": "The tenant the event belongs to; always set (`default` for a single-tenant installation).",
    "actor": "Who or what appended the event.",
}


def envelope_schema(
    *,
    type_schema: Schema | None = None,
    schema_version: int | None = None,
    data: Schema | None = None,
    positioned: bool = True,
    title: str = "Envelope",
    described: bool = True,
) -> Schema:
    """The envelope (docs/events.md, "The envelope"). With `data` and `type_schema`, one type's;
    `positioned`: as on Redis, where every event has its position; `described`: with each
    field's description (the generic one has them, each type's copy need not repeat them)."""

    def about(text: str) -> Schema:
        return {"description": text} if described else {}

    position: Schema = {"type": "integer", "minimum": 1} if positioned else {"type": ["integer", "null"], "minimum": 1}
    metadata_props: dict[str, Schema] = {
        key: ({"type": "string", "minLength": 1} if key == "tenant" else {"type": ["string", "null"]})
        | about(_METADATA[key])
        for key in METADATA_KEYS
    }
    return {
        "$schema": DIALECT,
        "title": title,
        "type": "object",
        "required": ["id", "position", "stream", "version", "type", "schema", "data", "metadata", "recorded_at"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "format": "uuid"} | about("Unique across the log; appends are idempotent by it."),
            "position": position | about("Place in the dense global order: 1, 2, 3, ..."),
            "stream": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^\S(.*\S)?$"}
            | about("The entity: `<tenant>/<kind>-<id>`."),
            "version": {"type": "integer", "minimum": 1} | about("Place within the stream, from 1."),
            "type": type_schema or {"type": "string", "minLength": 1, "maxLength": 200},
            "schema": ({"const": schema_version} if schema_version is not None else {"type": "integer", "minimum": 1})
            | about("The schema version of `data` (after upcasting)."),
            "data": data or {"type": "object"},
            "metadata": {
                "type": "object",
                "required": list(METADATA_KEYS),
                "additionalProperties": False,
                "properties": metadata_props,
            },
            "recorded_at": {"type": "string", "format": "date-time", "pattern": _RECORDED_AT}
            | about("When the appending transaction started, UTC; not an ordering key."),
        },
    }


def entry_schema(type_schema: Schema | None = None) -> Schema:
    """The fields of a `<prefix>:events` entry besides `event` (the envelope, the payload)."""
    return {
        "$schema": DIALECT,
        "title": "EventsEntryFields",
        "description": "The stream entry's other fields (every value a string), for filtering before parsing "
        "`event`. Each equals the envelope's; the entry ID is `<position>-0`.",
        "type": "object",
        "required": ["type", "tenant", "stream", "position"],
        "additionalProperties": False,
        "properties": {
            "type": type_schema or {"type": "string", "minLength": 1},
            "tenant": {"type": "string"},
            "stream": {"type": "string", "minLength": 1},
            "position": {"type": "string", "pattern": _DECIMAL},
        },
    }


def fields_schema(
    title: str,
    fields: Mapping[str, Schema],
    *,
    required: Sequence[str] | None = None,
    description: str = "",
    extra: bool = False,
) -> Schema:
    """A Redis stream entry's fields as one object (every value a string)."""
    return {
        "$schema": DIALECT,
        "title": title,
        **({"description": description} if description else {}),
        "type": "object",
        "required": list(fields if required is None else required),
        "additionalProperties": extra,
        "properties": dict(fields),
    }


def multi(schema: Schema) -> Schema:
    """AsyncAPI's Multi Format Schema Object for a draft 2020-12 schema."""
    return {"schemaFormat": SCHEMA_FORMAT, "schema": schema}


def _string(description: str, **more: Any) -> Schema:
    return {"type": "string", "description": description, **more}


# -- the AsyncAPI document (pure) --------------------------------------------------------------


@dataclass
class Part:
    """Channels, operations and components of one room, added to the document by name; a
    name taken twice is a ValueError."""

    channels: dict[str, Any] = field(default_factory=dict)
    operations: dict[str, Any] = field(default_factory=dict)
    messages: dict[str, Any] = field(default_factory=dict)
    schemas: dict[str, Any] = field(default_factory=dict)
    servers: dict[str, Any] = field(default_factory=dict)

    def add(self, other: Part) -> None:
        for name in ("channels", "operations", "messages", "schemas", "servers"):
            mine, theirs = getattr(self, name), getattr(other, name)
            taken = sorted(set(mine) & set(theirs))
            if taken:
                raise ValueError(f"AsyncAPI {name} defined twice: {', '.join(taken)}")
            mine.update(theirs)


def ref(*path: str) -> dict[str, str]:
    """An AsyncAPI Reference Object to #/<path...>."""
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


REDIS_SERVER = "redis"


def redis_server() -> dict[str, Any]:
    return {
        "host": "localhost:6379",
        "protocol": "redis",
        "description": "mailflow's Redis (MAILFLOW_REDIS_URL; 6.2 or later). Every key starts with the prefix "
        "MAILFLOW_REDIS_PREFIX; this document was generated for the prefix in each address.",
    }


def _event_message(t: EventType) -> dict[str, Any]:
    const = {"const": t.type}
    return {
        "name": t.type,
        "title": t.type,
        **({"summary": t.description} if t.description else {}),
        "contentType": "application/json",
        "headers": multi(entry_schema(const)),
        "payload": multi(
            envelope_schema(
                type_schema=const, schema_version=t.schema_version, data=t.json_schema, title=t.type, described=False
            )
        ),
        "x-schema-version": t.schema_version,
        **({"x-notification-channel": t.channel} if t.channel else {}),
    }


def events_part(types: Sequence[EventType], keys: Keys) -> Part:
    """`<prefix>:events`, every pub/sub channel events are announced on, `<prefix>:metrics`
    and `<prefix>:dlq:<consumer>`."""
    names = [t.type for t in types]
    part = Part(servers={REDIS_SERVER: redis_server()})
    servers = [ref("servers", REDIS_SERVER)]
    for t in types:
        part.messages[t.type] = _event_message(t)
    part.messages[UNREGISTERED] = {
        "name": UNREGISTERED,
        "title": "An event of a type no mailflow room registered",
        "summary": "The store is generic: anyone may append other types. Their data is stored as given.",
        "contentType": "application/json",
        "headers": multi(entry_schema({"type": "string", "minLength": 1, "not": {"enum": names}})),
        "payload": multi(
            envelope_schema(
                type_schema={"type": "string", "minLength": 1, "maxLength": 200, "not": {"enum": names}},
                title=UNREGISTERED,
            )
        ),
    }
    part.schemas["Envelope"] = multi(envelope_schema(positioned=False))
    part.channels["events"] = {
        "address": keys.events,
        "title": "Every event, in position order",
        "description": (
            "The relay copies every committed event from PostgreSQL, in position order, to this stream. "
            "Entry ID `<position>-0`. An entry's fields: `type`, `tenant`, `stream`, `position` (the message "
            "headers) and `event`: the envelope as UTF-8 JSON (the message payload). `data` is upcast to the "
            "type's current schema by the relay. Trimmed approximately to MAILFLOW_STREAM_MAXLEN entries; "
            "PostgreSQL has the rest. Read it with XREADGROUP (docs/events.md, 'Reading the stream from "
            "another language'); delivery is at least once, in order, with gaps to fill after a trim or a "
            "Redis data loss."
        ),
        "servers": servers,
        "messages": {n: ref("components", "messages", n) for n in [*names, UNREGISTERED]},
        "x-redis": {"type": "stream", "entryId": "<position>-0", "payloadField": "event"},
    }
    part.operations["publishEvents"] = {
        "action": "send",
        "title": "The relay publishes committed events",
        "channel": ref("channels", "events"),
        "messages": [ref("channels", "events", "messages", n) for n in [*names, UNREGISTERED]],
    }
    announced: dict[str, list[str]] = {}
    for t in types:
        if t.channel:
            announced.setdefault(t.channel, []).append(t.type)
    for channel, members in sorted(announced.items()):
        address = f"{keys.prefix}:{channel}"
        part.channels[channel] = {
            "address": address,
            "title": f"Live announcements: {', '.join(members)}",
            "description": (
                f"Pub/sub. As the relay publishes one of these types to `{keys.events}` it also publishes the "
                "envelope here; each message is exactly the entry's `event` field. Fire and forget: a "
                "subscriber that is not connected misses it (the stream has it), and a republish after Redis "
                "lost its data does not announce events older than 5 minutes again."
            ),
            "servers": servers,
            "messages": {n: ref("components", "messages", n) for n in members},
            "x-redis": {"type": "pubsub"},
        }
        part.operations[f"announce_{channel}"] = {
            "action": "send",
            "channel": ref("channels", channel),
            "messages": [ref("channels", channel, "messages", n) for n in members],
        }
    if "metrics" not in announced:
        part.messages["MetricDelta"] = {
            "name": "MetricDelta",
            "title": "A tenant's real-time metric delta",
            "summary": "What a tenant's committed events added to the dashboard's counters since the last delta.",
            "contentType": "application/json",
            "payload": multi(
                {
                    "$schema": DIALECT,
                    "type": "object",
                    "required": ["tenant", "at_ms", "position", "counters"],
                    "additionalProperties": False,
                    "properties": {
                        "tenant": {"type": "string"},
                        "at_ms": {"type": "integer", "description": "When it was published (Unix epoch, ms)."},
                        "position": {"type": "integer", "description": "The newest event position it counts."},
                        "counters": {
                            "type": "object",
                            "description": "Non-zero increments of the dashboard's counters (docs/analytics.md): "
                            "sent, delivered, deferred, failed, bounced, complained, replied, auto_replied, "
                            "unsubscribed, opened, opened_unique, clicked, clicked_unique, machine_opens, "
                            "machine_clicks.",
                            "additionalProperties": {"type": "integer", "minimum": 1},
                        },
                    },
                }
            ),
        }
        part.channels["metrics"] = {
            "address": keys.metrics,
            "title": "Real-time metric deltas",
            "description": "Pub/sub: the facts consumer publishes, after each committed batch, what it added "
            "to each tenant's counters, at most 4 messages a second per tenant; facts older than 5 minutes "
            "(a rebuild, a catch-up) are not published. Fire and forget: a subscriber that was not listening "
            "misses deltas and catches up from the aggregates (GET /dashboard/data), as the dashboard does.",
            "servers": servers,
            "messages": {"MetricDelta": ref("components", "messages", "MetricDelta")},
            "x-redis": {"type": "pubsub"},
        }
        part.operations["publishMetrics"] = {
            "action": "send",
            "title": "The facts consumer publishes metric deltas",
            "channel": ref("channels", "metrics"),
            "messages": [ref("channels", "metrics", "messages", "MetricDelta")],
        }
    _dead_letters(part, keys, servers)
    return part


def _dead_letters(part: Part, keys: Keys, servers: list[dict[str, str]]) -> None:
    envelope_json = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": envelope_schema(),
        "description": "The envelope, as UTF-8 JSON (as in the `event` field of the events stream).",
    }
    part.messages["DeadLetter"] = {
        "name": "DeadLetter",
        "title": "An event a consumer gave up on",
        "contentType": "application/json",
        "payload": multi(
            fields_schema(
                "DeadLetter",
                {
                    "dead_letter_id": _string("The id `mailflow dlq list` shows.", pattern=_DECIMAL),
                    "consumer": _string("The consumer (projection) name."),
                    "position": _string("The event's position.", pattern=_DECIMAL),
                    "event_id": _string("The event's id.", format="uuid"),
                    "type": _string("The event type."),
                    "attempts": _string("How many times the consumer tried to apply it.", pattern=_DECIMAL),
                    "error": _string("One line: `ExceptionType: message`."),
                    "event": envelope_json,
                },
                description="The entry's fields (every value a string).",
            )
        ),
    }
    part.messages["MalformedEntry"] = {
        "name": "MalformedEntry",
        "title": "A stream entry that was not a valid envelope",
        "summary": "Recorded and acknowledged; it can only be dropped (`mailflow dlq drop`), not retried.",
        "contentType": "application/json",
        "payload": multi(
            fields_schema(
                "MalformedEntry",
                {
                    "dead_letter_id": _string("The id `mailflow dlq list` shows.", pattern=_DECIMAL),
                    "consumer": _string("The consumer (projection) name."),
                    "entry_id": _string("The entry's ID in the events stream."),
                    "error": _string("One line: `ExceptionType: message`."),
                },
                description="The entry's original fields, whatever they were, plus these.",
                extra=True,
            )
        ),
    }
    part.channels["dlq"] = {
        "address": keys.dlq("{consumer}"),
        "title": "Dead letters of one consumer",
        "description": (
            "A stream per consumer, Redis-generated entry IDs, trimmed approximately to 100,000 entries. A mirror "
            "of the open dead letters in PostgreSQL (the truth, `mailflow dlq list`): an entry is deleted when "
            "its dead letter is retried or dropped, and the mirror is not rebuilt after a Redis data loss."
        ),
        "parameters": {"consumer": {"description": "The consumer group (projection) name, e.g. event_counts."}},
        "servers": servers,
        "messages": {n: ref("components", "messages", n) for n in ("DeadLetter", "MalformedEntry")},
        "x-redis": {"type": "stream", "entryId": "generated by Redis"},
    }
    part.operations["deadLetter"] = {
        "action": "send",
        "title": "A consumer records what it gave up on",
        "channel": ref("channels", "dlq"),
        "messages": [ref("channels", "dlq", "messages", n) for n in ("DeadLetter", "MalformedEntry")],
    }


def asyncapi(registry: EventRegistry, prefix: str = "mailflow", *, parts: Sequence[Part] = ()) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of the events stream, its pub/sub channels and dead letters,
    plus `parts` (other rooms' channels, e.g. job streams and webhooks)."""
    keys = Keys(prefix)
    whole = events_part(event_types(registry), keys)
    for p in parts:
        whole.add(copy.deepcopy(p))
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "mailflow",
            "version": mailflow.__version__,
            "description": (
                "The contracts mailflow offers integrators in any language: the events stream and its envelope, "
                "one message per registered event type with the JSON Schema (draft 2020-12) of its data, the "
                "pub/sub channels, the job streams, the dead letters and the webhooks. Every schema is "
                "self-contained: validate with any JSON Schema library. See docs/events.md."
            ),
        },
        "defaultContentType": "application/json",
        "servers": whole.servers,
        "channels": whole.channels,
        "operations": whole.operations,
        "components": {"schemas": whole.schemas, "messages": whole.messages},
    }


def render(document: Mapping[str, Any]) -> bytes:
    """The document as docs/asyncapi.json holds it: indented JSON and a final newline."""
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
