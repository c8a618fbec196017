"""The published contracts hold for what mailflow really writes: every entry a full `mailflow
demo` puts on `<prefix>:events`, and every message on `<prefix>:notifications`, validated as an
integrator in another language would - the AsyncAPI document, redis-py and jsonschema, no
mailflow code - against the schema of its type."""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis

from .conftest import run_cli, wait_until

pytestmark = pytest.mark.process

DEMO = ("--contacts", "200", "--transactional", "3")  # enough for retries and failures to occur


# -- the outside consumer: the AsyncAPI document, redis-py and jsonschema alone -----------------


class Contract:
    """The validators of one AsyncAPI document's messages."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.messages = doc["components"]["messages"]
        self._cache: dict[tuple[str, str], jsonschema.protocols.Validator] = {}

    def message_of(self, channel: str, type_name: str) -> str | None:
        """The channel's message for an event type (its name is the type), if the channel has one."""
        return type_name if type_name in self.doc["channels"][channel]["messages"] else None

    def errors(self, message: str, part: str, instance: Any) -> list[str]:
        key = (message, part)
        if key not in self._cache:
            schema = self.messages[message][part]["schema"]
            self._cache[key] = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        return [
            f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message[:300]}"
            for e in self._cache[key].iter_errors(instance)
        ]


def entry_violations(contract: Contract, entry_id: str, fields: dict[str, str]) -> list[str]:
    """What is wrong with one `<prefix>:events` entry: its fields, its envelope, its data."""
    where = f"entry {entry_id}"
    if "event" not in fields:
        return [f"{where}: no `event` field"]
    try:
        env = json.loads(fields["event"])
    except json.JSONDecodeError as exc:
        return [f"{where}: `event` is not JSON: {exc}"]
    headers = {k: v for k, v in fields.items() if k != "event"}
    name = contract.message_of("events", str(headers.get("type")))
    if name is None:
        return [f"{where}: type {headers.get('type')!r} is not in the catalogue"]
    found = [f"{where} {name} fields {e}" for e in contract.errors(name, "headers", headers)]
    found += [f"{where} {name} envelope {e}" for e in contract.errors(name, "payload", env)]
    if isinstance(env, dict):
        meta = env.get("metadata") or {}
        same = {
            "type": env.get("type"),
            "stream": env.get("stream"),
            "position": str(env.get("position")),
            "tenant": meta.get("tenant") if isinstance(meta, dict) else None,
        }
        found += [
            f"{where}: field {k}={headers.get(k)!r}, envelope {v!r}" for k, v in same.items() if headers.get(k) != v
        ]
        if entry_id != f"{env.get('position')}-0":
            found.append(f"{where}: the entry ID is not <position>-0 (position {env.get('position')})")
    return found


def notification_violations(contract: Contract, channel: str, raw: bytes, published: dict[str, bytes]) -> list[str]:
    """What is wrong with one pub/sub message: it must be an announced type's envelope, exactly
    the `event` field of that event's stream entry."""
    env = json.loads(raw)
    name = contract.message_of(channel, str(env.get("type")))
    if name is None:
        return [f"{channel}: {env.get('type')!r} is not announced here"]
    found = [f"{channel} {name} {e}" for e in contract.errors(name, "payload", env)]
    if published.get(str(env.get("position"))) != raw:
        found.append(f"{channel}: position {env.get('position')} is not the stream entry's `event`, byte for byte")
    return found


# -- the tests ------------------------------------------------------------------------------------


def test_the_outside_consumer_reports_what_breaks_the_contract():
    doc = json.loads((Path(__file__).resolve().parents[1] / "docs" / "asyncapi.json").read_text())
    contract = Contract(doc)
    env = {
        "id": "01a220ba-121c-7895-803d-a5becc876c97",
        "position": 4,
        "stream": "acme/job-1",
        "version": 2,
        "type": "JobQueued",
        "schema": 1,
        "data": {"job_id": "1", "queue_seq": 9},
        "metadata": {"correlation_id": None, "causation_id": None, "tenant": "acme", "actor": "queuer"},
        "recorded_at": "2026-11-28T04:57:18.104690Z",
    }
    fields = {"type": "JobQueued", "tenant": "acme", "stream": "acme/job-1", "position": "4"}

    def check(entry_id: str = "4-0", **changes: Any) -> list[str]:
        event = {**env, **changes.pop("env", {})}
        return entry_violations(contract, entry_id, {**fields, **changes, "event": json.dumps(event)})

    assert check() == []
    assert "queue_seq" in " ".join(check(env={"data": {"job_id": "1", "queue_seq": "9"}}))
    assert "not in the catalogue" in " ".join(check(type="OrderPlaced"))
    assert "field stream" in " ".join(check(stream="acme/job-2"))
    assert "<position>-0" in " ".join(check("5-0"))
    assert "recorded_at" in " ".join(check(env={"recorded_at": "2026-11-28 04:57:18"}))
    assert entry_violations(contract, "4-0", fields) == ["entry 4-0: no `event` field"]


class Subscriber:
    """Collects every message of a pub/sub channel from now on, in a thread."""

    def __init__(self, url: str, channel: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel)
        self.pubsub.get_message(timeout=5)  # the subscription is confirmed before anything is published
        self.received: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if msg and msg["type"] == "message":
                self.received.append(msg["data"])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pubsub.close()
        self.client.close()


def test_every_entry_of_a_full_demo_matches_the_asyncapi_document_as_an_outside_consumer_validates_it(
    env, procs, redis_url, operator_store, r
):
    # The document as an integrator gets it, for this installation's prefix.
    doc = json.loads(run_cli(env, "events", "asyncapi").stdout)
    contract = Contract(doc)
    events_key = doc["channels"]["events"]["address"]
    notifications_key = doc["channels"]["notifications"]["address"]
    assert events_key == f"{env['MAILFLOW_REDIS_PREFIX']}:events"
    sub = Subscriber(redis_url, notifications_key)
    try:
        # The tenants room has its events too (the demo runs as the default tenant).
        for args in (
            ("create", "acme", "--name", "Acme"),
            ("limits", "acme", "--per-hour", "100"),
            ("suspend", "acme", "--reason", "test"),
            ("resume", "acme"),
        ):
            assert run_cli(env, "tenants", *args).returncode == 0
        res = run_cli(env, "demo", *DEMO, "--json", timeout=280)
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads(res.stdout)
        assert summary["ok"] and summary["inbound"]["came_back"]["answers"], summary
        # The demo stops its pipeline before the mail comes back and a reader is erased; a relay
        # publishes the rest, as `mailflow up` would have.
        head = operator_store.sync()
        relay = procs.start("relay")

        def relayed() -> bool:
            last = r.xrevrange(events_key, count=1)
            return bool(last) and int(last[0][0].split(b"-")[0]) >= head

        wait_until(relayed, 90, 0.2, "the relay to publish every event")
        relay.send_signal(signal.SIGTERM)
        relay.wait(30)
        entries = r.xrange(events_key)
        announced = sum(1 for _, f in entries if contract.message_of("notifications", f[b"type"].decode()))
        wait_until(lambda: len(sub.received) >= announced, 10, what="every announcement")
    finally:
        sub.close()

    violations: list[str] = []
    published: dict[str, bytes] = {}
    for entry_id, raw in entries:
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        violations += entry_violations(contract, entry_id.decode(), fields)
        published[fields.get("position", "")] = raw.get(b"event", b"")
    for message in sub.received:
        violations += notification_violations(contract, "notifications", message, published)
    types = Counter(f[b"type"].decode() for _, f in entries)
    print(f"validated {len(entries)} entries of {len(types)} event types and {len(sub.received)} notifications")
    print(dict(sorted(types.items())))
    assert violations == [], "\n".join(violations[:50])
    assert [int(e.split(b"-")[0]) for e, _ in entries] == list(range(1, head + 1))  # dense, nothing missing
    assert len(types) >= 35, sorted(types)
    assert {"TenantCreated", "JobCompleted", "MessageReceived", "BounceDetected", "WebhookDelivered"} <= set(types)
    assert len(sub.received) == announced >= 10  # every bounce, complaint, auto-reply, reply and other


def test_events_types_and_events_asyncapi_on_the_command_line(env, tmp_path):
    listed = json.loads(run_cli(env, "events", "types", "--json").stdout)
    by_type = {t["type"]: t for t in listed}
    assert by_type["ReplyReceived"]["channel"] == "notifications" and by_type["JobQueued"]["channel"] is None
    assert by_type["ContactsImported"]["schema"] == 2
    assert by_type["JobQueued"]["json_schema"]["required"] == ["job_id", "queue_seq"]
    assert all(set(t) == {"type", "schema", "channel", "description", "json_schema"} for t in listed)
    human = run_cli(env, "events", "types")
    assert human.returncode == 0 and f"{len(listed)} event types" in human.stdout
    assert max(len(line) for line in human.stdout.splitlines()) <= 80
    assert "ReplyReceived" in human.stdout and "notifications" in human.stdout
    printed = run_cli(env, "events", "asyncapi", "--prefix", "mailflow")
    written = run_cli(env, "events", "asyncapi", "--prefix", "mailflow", "--out", str(tmp_path / "a.json"))
    assert written.returncode == 0 and (tmp_path / "a.json").read_text() == printed.stdout
    assert printed.stdout == (Path(__file__).resolve().parents[1] / "docs" / "asyncapi.json").read_text()
    bad = run_cli(env, "events", "asyncapi", "--out", str(tmp_path / "missing" / "a.json"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: --out") and "Traceback" not in bad.stderr
