"""Runtime room: the whole event catalogue - `load_all()` imports every room that registers
event types, and `asyncapi_document()` adds to the events room's document the channels other
rooms own: the job streams (outbound) and the webhooks (inbound). Served at
/api/v1/asyncapi.json and committed as docs/asyncapi.json (`mailflow events asyncapi`).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

from mailflow.events.catalog import (
    DIALECT,
    EventType,
    Part,
    Schema,
    asyncapi,
    event_types,
    fields_schema,
    multi,
    ref,
)
from mailflow.events.keys import Keys
from mailflow.events.registry import EventRegistry, registry

# Every room that registers event types (importing a room registers them, with its projections).
ROOMS = ("mailflow.tenants", "mailflow.outbound", "mailflow.inbound")

WEBHOOK_SERVER = "receiver"


def load_all() -> EventRegistry:
    """The process-wide registry with every room's event types in it."""
    for room in ROOMS:
        importlib.import_module(room)
    return registry


def catalogue() -> list[EventType]:
    """Every event type mailflow registers (`mailflow events types`)."""
    return event_types(load_all())


@lru_cache(maxsize=8)
def asyncapi_document(prefix: str = "mailflow") -> dict[str, Any]:
    """The AsyncAPI 3 document for key prefix `prefix`. Cached: callers share it, so must not
    change it."""
    return asyncapi(load_all(), prefix, parts=[job_streams(Keys(prefix)), webhooks(event_types(registry))])


# -- the job streams (outbound) ----------------------------------------------------------------


def job_streams(keys: Keys) -> Part:
    """`<prefix>:jobs:high|normal|low`: work for sender workers (outbound/queuer.py, worker.py)."""
    from mailflow.outbound.jobs import SLA_SECONDS, Priority
    from mailflow.outbound.streams import WORKER_GROUP

    priorities = [str(p) for p in Priority]
    message = {
        "name": "JobEntry",
        "title": "A job to send",
        "summary": "The job's id and queue sequence number; what to send is in PostgreSQL (the jobs table).",
        "contentType": "application/json",
        "payload": multi(
            fields_schema(
                "JobEntry",
                {
                    "job_id": {"type": "string", "format": "uuid", "description": "The job (its stream is job-<id>)."},
                    "queue_seq": {
                        "type": "string",
                        "pattern": r"^[1-9][0-9]*$",
                        "description": "The queue sequence number of its JobQueued; an entry whose number is "
                        "not the job's current one is stale and refused.",
                    },
                },
                description="The entry's fields (every value a string).",
            )
        ),
    }
    slas = ", ".join(f"{p} {int(SLA_SECONDS[p])} s" for p in Priority)
    return Part(
        channels={
            "jobs": {
                "address": keys.jobs("{priority}"),
                "title": "Work for sender workers, one stream per priority",
                "description": (
                    "The queuer adds each due job (after its JobQueued is committed) with entry ID "
                    f"`<queue_seq>-0`; the workers read all three with the consumer group `{WORKER_GROUP}`, high "
                    f"first (SLAs: {slas}), and delete an entry when its job is done. Redis may lose these "
                    "streams: the queuer adds the queued jobs again (then a re-added entry may take the next "
                    "free ID `<last>-1`, `-2`, ...). Internal work queues, documented for operators' tools; "
                    "don't add entries."
                ),
                "parameters": {"priority": {"enum": priorities, "description": "The job's priority."}},
                "servers": [ref("servers", "redis")],
                "messages": {"JobEntry": ref("components", "messages", "JobEntry")},
                "x-redis": {"type": "stream", "entryId": "<queue_seq>-0", "consumerGroup": WORKER_GROUP},
            }
        },
        operations={
            "queueJobs": {
                "action": "send",
                "title": "The queuer moves due jobs from PostgreSQL to the priority streams",
                "channel": ref("channels", "jobs"),
                "messages": [ref("channels", "jobs", "messages", "JobEntry")],
            },
            "takeJobs": {
                "action": "receive",
                "title": f"Sender workers take jobs (consumer group {WORKER_GROUP})",
                "channel": ref("channels", "jobs"),
                "messages": [ref("channels", "jobs", "messages", "JobEntry")],
            },
        },
        messages={"JobEntry": message},
    )


# -- the webhooks (inbound) --------------------------------------------------------------------

_OPENED = {
    "sender": "The correspondent's From address, opened when sent; null once the person was erased.",
    "subject": "The subject line, opened when sent; null once the person was erased.",
    "text": "A reply's new text, opened when sent; null once the person was erased.",
}


def webhook_body(kind_type: str, data: Schema, *, description: str = "") -> Schema:
    """A webhook POST's body: {"type", "timestamp", "data"} (inbound/webhooks.py payload())."""
    return {
        "$schema": DIALECT,
        "title": kind_type,
        **({"description": description} if description else {}),
        "type": "object",
        "required": ["type", "timestamp", "data"],
        "additionalProperties": False,
        "properties": {
            "type": {"const": kind_type},
            "timestamp": {
                "type": "string",
                "format": "date-time",
                "description": "When the event was recorded (ISO 8601 with its UTC offset).",
            },
            "data": data,
        },
    }


def webhook_data(event: Schema, kind: str) -> Schema:
    """The body's `data` for a classified event of schema `event`: its fields without what is
    sealed or names a subject, plus the event's id, position and tenant and the personal values
    opened at sending (payload() in inbound/webhooks.py)."""
    hidden = ("sealed", "correspondent", "recipients")
    props: dict[str, Any] = {k: v for k, v in event["properties"].items() if k not in hidden}
    required = [k for k in event.get("required", []) if k not in hidden]
    props |= {
        "event_id": {"type": "string", "format": "uuid", "description": "The event's id."},
        "position": {"type": ["integer", "null"], "description": "The event's position."},
        "tenant": {"type": ["string", "null"], "description": "The tenant."},
        **{k: {"type": ["string", "null"], "description": d} for k, d in _OPENED.items()},
    }
    required += ["event_id", "position", "tenant", *_OPENED]
    if "delayed" in props:
        props["delayed"] = {**props["delayed"], "const": kind == "delayed"}
    if "recipients" in event["properties"]:
        items = dict(event["properties"]["recipients"]["items"])
        item_props = {k: v for k, v in items["properties"].items() if k not in ("sealed", "subject")}
        item_props["email"] = {"type": ["string", "null"], "description": "Opened when sent; null once erased."}
        items["properties"] = item_props
        items["required"] = [k for k in items.get("required", []) if k not in ("sealed", "subject")] + ["email"]
        props["recipients"] = {"type": "array", "items": items}
        required.append("recipients")
    return {
        "type": "object",
        "required": required,
        "additionalProperties": event.get("additionalProperties", True),
        "properties": props,
    }


def webhook_headers() -> Schema:
    return {
        "$schema": DIALECT,
        "title": "StandardWebhooksHeaders",
        "description": "Standard Webhooks (standardwebhooks.com): verify the signature with the endpoint's "
        "secret (whsec_..., shown once by `mailflow webhooks add`) before trusting the body.",
        "type": "object",
        "required": ["content-type", "webhook-id", "webhook-timestamp", "webhook-signature"],
        "properties": {
            "content-type": {"const": "application/json"},
            "webhook-id": {
                "type": "string",
                "pattern": "^msg_[0-9a-f]{32}$",
                "description": "The same for every attempt of one event to one endpoint: dedupe by it "
                "(delivery is at least once).",
            },
            "webhook-timestamp": {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": "Unix seconds of this attempt; reject ones far from your clock.",
            },
            "webhook-signature": {
                "type": "string",
                "pattern": r"^v1,[A-Za-z0-9+/=]+( v1,[A-Za-z0-9+/=]+)*$",
                "description": 'v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">',
            },
            "user-agent": {"type": "string"},
        },
    }


def webhooks(types: list[EventType]) -> Part:
    """The webhook endpoints: classified inbound mail POSTed, signed, to an integrator's URL."""
    from mailflow.inbound import webhooks as hooks

    by_type = {t.type: t for t in types}
    bodies: dict[str, tuple[str, Schema]] = {}  # payload type -> (event type, body)
    for event_type in sorted(hooks.CLASSIFIED):
        t = by_type[event_type]
        for flags in ({}, {"delayed": True}):
            kind = hooks.kind_of(event_type, flags)
            if kind is None or hooks.KINDS[kind] in bodies:
                continue
            body = webhook_body(hooks.KINDS[kind], webhook_data(t.json_schema, kind), description=t.description)
            bodies[hooks.KINDS[kind]] = (event_type, body)
    test_data = {
        "type": "object",
        "required": ["endpoint_id", "tenant"],
        "additionalProperties": False,
        "properties": {"endpoint_id": {"type": "string"}, "tenant": {"type": "string"}},
    }
    bodies[hooks.TEST_TYPE] = ("", webhook_body(hooks.TEST_TYPE, test_data, description="`mailflow webhooks test`."))
    headers = multi(webhook_headers())
    messages = {
        f"webhook.{name}": {
            "name": name,
            "title": f"{name} (from {event_type})" if event_type else name,
            "contentType": "application/json",
            "headers": headers,
            "payload": multi(body),
        }
        for name, (event_type, body) in sorted(bodies.items())
    }
    kinds = ", ".join(f"`{k}` ({v})" for k, v in hooks.KINDS.items())
    return Part(
        servers={
            WEBHOOK_SERVER: {
                "host": "receiver.example",
                "protocol": "https",
                "description": "An integrator's HTTP endpoint: the URL registered with `mailflow webhooks add`.",
            }
        },
        channels={
            "webhooks": {
                "address": None,
                "title": "A tenant's webhook endpoint",
                "description": (
                    "Classified inbound mail of the kinds an endpoint subscribed to is POSTed, as it is "
                    f"recognised, to the endpoint's URL (the address is each endpoint's own). Kinds: {kinds}. "
                    "Signed per Standard Webhooks; at least once, dedupe by `webhook-id`. 2xx is done; 410 "
                    "disables the endpoint; 408, 429, 5xx and no answer are retried for about three days "
                    "(Retry-After honoured); another 4xx is final."
                ),
                "servers": [ref("servers", WEBHOOK_SERVER)],
                "messages": {n: ref("components", "messages", n) for n in messages},
            }
        },
        operations={
            "deliverWebhooks": {
                "action": "send",
                "title": "The deliverer POSTs each delivery to its endpoint",
                "channel": ref("channels", "webhooks"),
                "messages": [ref("channels", "webhooks", "messages", n) for n in messages],
                "bindings": {"http": {"method": "POST", "bindingVersion": "0.3.0"}},
            }
        },
        messages=messages,
    )
