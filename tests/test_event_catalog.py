"""The event catalogue and the AsyncAPI document (events/catalog.py, runtime/catalog.py): every
registered type has a schema, the document is AsyncAPI 3 in shape with self-contained JSON
Schemas, and docs/asyncapi.json is what the code generates."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, cast

import jsonschema
import pytest
from pydantic import ConfigDict

from mailflow.events.catalog import (
    SCHEMA_FORMAT,
    CatalogError,
    asyncapi,
    event_types,
    inline_defs,
    one_line,
    render,
)
from mailflow.events.envelope import Envelope, Metadata
from mailflow.events.registry import Event, EventRegistry, registry
from mailflow.projectors.facts import TYPES, check_shapes
from mailflow.runtime.catalog import asyncapi_document, catalogue, load_all

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[1]
Validator = jsonschema.Draft202012Validator


def _resolve(doc: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = doc
    for raw in pointer[2:].split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and key in node, f"{pointer}: no {key!r}"
        node = node[key]
    return node


def _walk(node: Any, path: str = "#"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}/{i}")


def _schemas(doc: dict[str, Any]):
    """Every (where, JSON Schema) of the document: each Multi Format Schema Object's schema."""
    for path, node in _walk(doc):
        if isinstance(node, dict) and node.get("schemaFormat") == SCHEMA_FORMAT:
            yield path, node["schema"]


def _envelope(event: Event, position: int = 7, tenant: str = "acme") -> Envelope:
    return Envelope(
        id=uuid.uuid4(),
        position=position,
        stream=f"{tenant}/thing-1",
        version=1,
        type=event.event_type,
        schema=event.schema_version,
        data=event.model_dump(mode="json"),
        metadata=Metadata(correlation_id=str(uuid.uuid4()), tenant=tenant, actor="test"),
        recorded_at=datetime(2026, 12, 2, 8, 0, 0, 123456, tzinfo=UTC),
    )


# -- (a) every registered type has a schema ---------------------------------------------------


def test_every_registered_event_type_has_a_pydantic_model_with_a_json_schema():
    registry = load_all()
    types = catalogue()
    assert [t.type for t in types] == registry.types()
    assert len(types) >= 60  # tenants, outbound and inbound all registered theirs
    for t in types:
        Validator.check_schema(t.json_schema)
        assert t.json_schema["type"] == "object" and t.json_schema["properties"], t.type
        assert "$defs" not in t.json_schema and '"$ref"' not in json.dumps(t.json_schema), t.type
        assert t.schema_version == registry.current_schema(t.type) >= 1


def test_load_all_registers_every_type_that_any_module_registers():
    # In a fresh interpreter: what load_all() registers, then what importing every module adds.
    code = (
        "import importlib, pkgutil, mailflow\n"
        "from mailflow.runtime.catalog import load_all\n"
        "before = set(load_all().types())\n"
        "for m in pkgutil.walk_packages(mailflow.__path__, 'mailflow.'):\n"
        "    if m.name != 'mailflow.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(set(load_all().types()) - before))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", f"types load_all() misses (add their room to ROOMS): {res.stdout}"


def test_a_type_registered_without_a_schema_fails_the_catalogue():
    class Order(Event):
        total: int

    class NotAModel:
        """Registered by mistake: register() only reads `event_type`."""

        event_type: ClassVar[str] = "OrderShipped"
        schema_version: ClassVar[int] = 1

    fresh = EventRegistry()
    fresh.register(Order)
    assert [t.type for t in event_types(fresh)] == ["Order"]
    fresh.register(cast(type[Event], NotAModel))
    with pytest.raises(CatalogError, match="'OrderShipped' is registered without a pydantic model"):
        event_types(fresh)


def test_a_type_whose_fields_pydantic_cannot_describe_fails_the_catalogue():
    class Opaque:
        pass

    class OrderPacked(Event):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        box: Opaque

    fresh = EventRegistry()
    fresh.register(OrderPacked)
    with pytest.raises(CatalogError, match="'OrderPacked' has no JSON Schema"):
        event_types(fresh)


def test_nested_models_are_inlined_so_a_schema_stands_alone():
    raw = {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/A", "description": "kept"}, "b": {"items": {"$ref": "#/$defs/A"}}},
        "$defs": {"A": {"type": "object", "properties": {"x": {"type": "integer"}}}},
    }
    assert inline_defs(raw) == {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"x": {"type": "integer"}}, "description": "kept"},
            "b": {"items": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        },
    }
    with pytest.raises(CatalogError, match="refers to itself"):
        inline_defs({"$ref": "#/$defs/N", "$defs": {"N": {"properties": {"next": {"$ref": "#/$defs/N"}}}}})


def test_the_description_is_the_first_sentence_of_the_docstring_on_one_line():
    assert one_line(None) == ""
    assert one_line("A delivery status\n    notification. Per recipient: status.\n\nMore.") == (
        "A delivery status notification."
    )
    assert (
        one_line("Blocked, filtered, ...), or a complaint: the sender")
        == "Blocked, filtered, ...), or a complaint: the sender"
    )


# -- (b) the document ---------------------------------------------------------------------------


def test_the_document_is_asyncapi_3_and_every_ref_resolves():
    doc = asyncapi_document("mailflow")
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["title"] and doc["info"]["version"]
    for name, channel in doc["channels"].items():
        assert "address" in channel and (channel["address"] is None or isinstance(channel["address"], str)), name
        for server in channel.get("servers", []):
            assert _resolve(doc, server["$ref"]).get("protocol"), name
        for message in channel["messages"].values():
            assert message["$ref"].startswith("#/components/messages/")
        params = {p.strip("{}") for p in (channel["address"] or "").split(":") if p.startswith("{")}
        assert params == set(channel.get("parameters", {})), name
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        channel_ref = op["channel"]["$ref"]
        _resolve(doc, channel_ref)
        for m in op["messages"]:
            assert m["$ref"].startswith(channel_ref + "/messages/"), (name, m)  # the channel's own messages
    for name, message in doc["components"]["messages"].items():
        assert message["payload"]["schemaFormat"] == SCHEMA_FORMAT, name
    refs = [(p, n["$ref"]) for p, n in _walk(doc) if isinstance(n, dict) and isinstance(n.get("$ref"), str)]
    assert refs
    for _, pointer in refs:
        _resolve(doc, pointer)
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {
        "mailflow:events",
        "mailflow:jobs:{priority}",
        "mailflow:dlq:{consumer}",
        "mailflow:metrics",
        "mailflow:notifications",
        None,  # the webhooks: each endpoint's own URL
    } <= addresses
    assert doc["channels"]["jobs"]["parameters"]["priority"]["enum"] == ["high", "normal", "low"]
    assert doc["operations"]["deliverWebhooks"]["bindings"]["http"]["method"] == "POST"


def test_every_registered_type_is_a_message_of_the_events_stream_and_the_announced_ones_of_their_channel():
    doc = asyncapi_document("mailflow")
    types = catalogue()
    on_stream = set(doc["channels"]["events"]["messages"])
    assert {t.type for t in types} <= on_stream
    announced = {t.type for t in types if t.channel == "notifications"}
    assert announced == set(doc["channels"]["notifications"]["messages"])
    assert announced >= {"BounceDetected", "ReplyReceived", "ComplaintReceived"}


def test_every_schema_in_the_document_is_a_self_contained_json_schema():
    doc = asyncapi_document("mailflow")
    found = list(_schemas(doc))
    assert len(found) > 2 * len(catalogue())  # each type's headers and payload, and the rest
    for where, schema in found:
        Validator.check_schema(schema)
        inner = [p for p, n in _walk(schema) if isinstance(n, dict) and ("$ref" in n or "$defs" in n)]
        assert inner == [], f"{where} is not self-contained: {inner}"


def test_the_document_is_generated_for_the_prefix_it_is_asked_for():
    doc = asyncapi(load_all(), "acme-mail")
    assert doc["channels"]["events"]["address"] == "acme-mail:events"
    assert doc["channels"]["notifications"]["address"] == "acme-mail:notifications"
    assert asyncapi_document("acme-mail") is asyncapi_document("acme-mail")  # cached for the web app


def test_docs_asyncapi_json_is_what_the_code_generates():
    committed = (ROOT / "docs" / "asyncapi.json").read_bytes()
    assert committed == render(asyncapi_document("mailflow")), (
        "docs/asyncapi.json is stale: run `mailflow events asyncapi --prefix mailflow --out docs/asyncapi.json`"
    )


# -- what the schemas accept --------------------------------------------------------------------


def _message(name: str) -> dict[str, Any]:
    return asyncapi_document("mailflow")["components"]["messages"][name]


def test_a_types_message_accepts_its_envelope_and_refuses_another_types_or_bad_data():
    from mailflow.outbound.events import JobQueued

    env = _envelope(JobQueued(job_id=str(uuid.uuid4()), queue_seq=3)).to_dict()
    payload = Validator(_message("JobQueued")["payload"]["schema"])
    assert list(payload.iter_errors(env)) == []
    assert not payload.is_valid({**env, "type": "JobStarted"})
    assert not payload.is_valid({**env, "data": {"job_id": "x"}})
    assert not payload.is_valid({**env, "data": {**env["data"], "queue_seq": "3"}})
    assert not payload.is_valid({**env, "position": None})  # on Redis every event has its position
    assert not payload.is_valid({**env, "metadata": {**env["metadata"], "extra": 1}})
    fields = {"type": "JobQueued", "tenant": "acme", "stream": env["stream"], "position": "7"}
    headers = Validator(_message("JobQueued")["headers"]["schema"])
    assert headers.is_valid(fields) and not headers.is_valid({**fields, "position": "07"})
    unregistered = Validator(_message("UnregisteredEvent")["payload"]["schema"])
    assert unregistered.is_valid({**env, "type": "OrderPlaced"}) and not unregistered.is_valid(env)


def test_webhook_bodies_as_the_deliverer_builds_them_match_their_messages():
    from mailflow.inbound import webhooks
    from mailflow.inbound.events import BounceDetected, ClassifiedRecipient, ReplyReceived

    recipient = ClassifiedRecipient(subject="ab" * 16, sealed="s1.x", status="5.1.1", reason="userunknown", hard=True)
    cases = [
        (BounceDetected(message_id="m1", recipients=[recipient], job_id="j1"), "webhook.bounce.detected"),
        (BounceDetected(message_id="m2", recipients=[recipient], delayed=True), "webhook.bounce.delayed"),
        (ReplyReceived(message_id="m3", correspondent="cd" * 16, sealed="s1.y"), "webhook.reply.received"),
    ]
    for event, name in cases:
        body = webhooks.payload(
            _envelope(event),
            {"sender": "ann@example.org", "subject": "Re", "text": "Yes"},
            [{"email": "bo@example.net"}],
        )
        body = json.loads(json.dumps(body))
        validator = Validator(_message(name)["payload"]["schema"], format_checker=jsonschema.FormatChecker())
        assert [e.message for e in validator.iter_errors(body)] == [], name
    erased = json.loads(json.dumps(webhooks.payload(_envelope(cases[0][0]), None, [None])))
    assert Validator(_message("webhook.bounce.detected")["payload"]["schema"]).is_valid(erased)
    assert not Validator(_message("webhook.bounce.delayed")["payload"]["schema"]).is_valid(erased)
    headers = {
        "content-type": "application/json",
        "webhook-id": webhooks.webhook_msg_id(str(uuid.uuid4())),
        "webhook-timestamp": "1796198400",
        "webhook-signature": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
    }
    assert Validator(_message("webhook.reply.received")["headers"]["schema"]).is_valid(headers)


def test_the_facts_sql_reads_real_types_in_their_current_shape_and_an_upcaster_for_one_stops_it():
    load_all()
    assert set(TYPES) | {"JobCreated"} <= set(registry.types())  # a renamed type would make no facts
    check_shapes(registry)  # no old shape of them is read through an upcaster today
    other = EventRegistry()
    other.upcaster("JobStarted", from_schema=1)(lambda data: data)
    with pytest.raises(RuntimeError, match="JobStarted have upcasters"):
        check_shapes(other)
