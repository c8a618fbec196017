"""The auth matrix, generated from the OpenAPI document: every operation, over real HTTP, answers
401 without credentials, 403 to a key that has every scope but its own, 404 to another tenant's
key on this tenant's ids, and 2xx to a key with exactly its scope.

A new operation joins the matrix by being in the document; it fails here until it is
authenticated, scoped and given a sample below (its path's ids and, for a body, a valid one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailflow.api.app import openapi_document
from mailflow.inbound import directory, routes, webhooks
from mailflow.outbound import campaigns, domains, segments, sending, suppressions, templates
from mailflow.outbound.contacts import import_csv_text
from mailflow.outbound.senders import Sender
from mailflow.runtime.wiring import Runtime
from mailflow.tenants import keys
from mailflow.testing.dns import DnsServer, dkim_keypair

from .api_fixtures import ApiServer, make_tenant, serve_in_thread

pytestmark = pytest.mark.integration

DOCUMENT = openapi_document()
DKIM_KEY = dkim_keypair(1024)[0].decode()


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    id: str
    scope: str
    has_body: bool
    content_type: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _operations() -> list[Operation]:
    found = []
    for path, methods in DOCUMENT["paths"].items():
        for method, op in methods.items():
            security = op.get("security") or [{}]
            scopes = [s for requirement in security for values in requirement.values() for s in values]
            content = (op.get("requestBody") or {}).get("content") or {}
            found.append(
                Operation(
                    method.upper(),
                    path,
                    op["operationId"],
                    scopes[0] if len(scopes) == 1 else f"<{len(scopes)} scopes>",
                    bool(content),
                    next(iter(content), ""),
                )
            )
    return found


OPERATIONS = _operations()


def test_every_operation_names_exactly_one_known_scope_and_a_unique_id():
    assert len(OPERATIONS) > 50
    unscoped = [str(op) for op in OPERATIONS if op.scope not in keys.SCOPES]
    assert unscoped == [], f"operations without exactly one known scope: {unscoped}"
    ids = [op.id for op in OPERATIONS]
    assert len(ids) == len(set(ids))


# -- the world the samples name ---------------------------------------------------------------


@dataclass
class World:
    """One tenant's things, one of each kind an operation's path can name."""

    tenant: str
    store: Any
    admin: str
    ids: dict[str, str] = field(default_factory=dict)


def build_world(api: ApiServer, tenant_id: str, dns: DnsServer) -> World:
    t = make_tenant(api, tenant_id)
    store, vault, settings = t.store, api.rt.vault, api.rt.settings
    w = World(tenant_id, store, t.key)
    tx = Sender("tx", f"noreply@{tenant_id}.example", "Acme", "smtp://127.0.0.1:9", "mf", DKIM_KEY)
    sending.save_sender(store, tx, vault)
    sending.save_sender(store, Sender("spare", f"spare@{tenant_id}.example", "Spare", "smtp://127.0.0.1:9"), vault)
    templates.save(store, templates.Template("welcome", "Hi {{ name }}", "<p>Hi</p>", "Hi"))
    templates.save(store, templates.Template("spare", "Spare", "<p>Spare</p>", "Spare"))
    import_csv_text(store, "email,name\nann@example.net,Ann\nbob@example.net,Bob\n")
    segments.define(store, "everyone", {"email": {"$contains": "@"}})
    segments.define(store, "spare", {"email": {"$contains": "nobody"}})
    w.ids["campaign_id"] = campaigns.create(store, name="spring", sender="tx", template="welcome", segment="everyone")
    suppressions.add(store, "blocked@example.net")
    w.ids["job_id"], _ = sending.send_transactional(
        store, sender="tx", template="welcome", to="cid@example.net", variables={"name": "Cid"}
    )
    w.ids["key_id"] = keys.create(store, "spare", ["contacts:read"])[0].id
    domains.add(store, vault, f"send.{tenant_id}.example", settings=settings)
    for d in (f"{tenant_id}.example", f"spare.{tenant_id}.example"):
        directory.add_domain(store, d)
    directory.add_mailbox(store, f"help@{tenant_id}.example", "Help")
    directory.add_mailbox(store, f"spare@{tenant_id}.example", "Spare")
    w.ids["route_id"] = routes.add_route(store, f"sales@{tenant_id}.example", "mailbox", f"help@{tenant_id}.example").id
    endpoint, _ = webhooks.add_endpoint(
        store, vault, webhooks.guard_for(settings), "http://127.0.0.1:9/hook", ["reply"]
    )
    w.ids["endpoint_id"] = endpoint.id
    return w


def path_values(w: World, op: Operation) -> dict[str, str]:
    """The ids an operation's path names, of `w`'s things. Removals name the spare ones, so
    that nothing a campaign or a route still uses is what goes."""
    t = w.tenant
    removal = op.method == "DELETE"
    by_path = {
        "/domains/{domain}": {"domain": f"send.{t}.example"},
        "/inbound-domains/{domain}": {"domain": f"spare.{t}.example" if removal else f"{t}.example"},
        "/mailboxes/{address}": {"address": f"spare@{t}.example" if removal else f"help@{t}.example"},
        "/senders/{name}": {"name": "spare" if removal else "tx"},
        "/segments/{name}": {"name": "spare" if removal else "everyone"},
        "/templates/{name}": {"name": "spare" if removal else "welcome"},
        "/contacts/{email}": {"email": "ann@example.net"},
        "/suppressions/{email}": {"email": "blocked@example.net"},
    }
    template = next((p for p in by_path if op.path.startswith(p)), None)
    values = dict(by_path[template]) if template else {}
    for name in ("campaign_id", "job_id", "key_id", "route_id", "endpoint_id"):
        if "{" + name + "}" in op.path:
            values[name] = w.ids[name]
    return values


def _future() -> str:
    return (datetime.now(UTC) + timedelta(days=1)).isoformat()


# A valid body per operation (JSON unless the operation takes another type).
BODIES: dict[str, Callable[[World], Any]] = {
    "send_message": lambda w: {
        "sender": "tx",
        "template": "welcome",
        "to": "new@example.net",
        "variables": {"name": "N"},
    },
    "create_key": lambda w: {"name": "matrix", "scopes": ["contacts:read"]},
    "add_sending_domain": lambda w: {"domain": f"news.{w.tenant}.example"},
    "put_sender": lambda w: {"from_email": f"hello@{w.tenant}.example", "relay_url": "smtp://127.0.0.1:9"},
    "add_domain": lambda w: {"domain": f"more.{w.tenant}.example"},
    "add_mailbox": lambda w: {"address": f"info@{w.tenant}.example"},
    "add_route": lambda w: {"pattern": f"info@{w.tenant}.example", "action": "drop"},
    "add_endpoint": lambda w: {"url": "http://127.0.0.1:9/other", "events": ["bounce"]},
    "create_contact": lambda w: {"email": "new@example.net", "attributes": {"name": "New"}},
    "import_contacts": lambda w: "email,name\nzed@example.net,Zed\n",
    "update_contact": lambda w: {"attributes": {"name": "Annie"}},
    "reactivate_contact": lambda w: {"reason": "asked to be mailed again"},
    "create_segment": lambda w: {"name": "pros", "filter": {"email": {"$contains": "@"}}},
    "preview_filter": lambda w: {"filter": {"email": {"$contains": "@"}}},
    "create_template": lambda w: {"name": "news", "subject": "News", "text": "News for {{ name }}"},
    "update_template": lambda w: {"subject": "Hello {{ name }}"},
    "render_template": lambda w: {"variables": {"name": "Ann"}},
    "create_campaign": lambda w: {"name": "autumn", "sender": "tx", "template": "welcome", "segment": "everyone"},
    "schedule_campaign": lambda w: {"at": _future()},
    "add_suppression": lambda w: {"email": "stop@example.net"},
}


def _start(w: World) -> None:
    campaigns.start(w.store, w.ids["campaign_id"])


def _start_and_pause(w: World) -> None:
    _start(w)
    campaigns.pause(w.store, w.ids["campaign_id"])


# What an operation's 2xx needs beyond the world.
PREPARE: dict[str, Callable[[World], None]] = {
    "pause_campaign": _start,
    "resume_campaign": _start_and_pause,
    "resend_failed": _start,
    "reactivate_contact": lambda w: suppressions.add(w.store, "ann@example.net", contact_status="bounced"),
}


def _request(client, op: Operation, w: World, *, body: bool = True):
    url = op.path.format(**path_values(w, op))
    if not op.has_body or not body:
        return client.request(op.method, url)
    sample = BODIES.get(op.id)
    assert sample is not None, f"{op}: add a valid body for {op.id!r} to BODIES"
    value = sample(w)
    if isinstance(value, str):
        return client.request(op.method, url, content=value.encode(), headers={"Content-Type": op.content_type})
    return client.request(op.method, url, json=value)


@pytest.fixture
def dns():
    with DnsServer({}) as server:
        yield server


@pytest.fixture
def matrix_api(api_settings, dns) -> Iterator[ApiServer]:
    settings = api_settings.model_copy(
        update={
            "dns_servers": [dns.address],
            "inbound_dns_timeout_s": 1.0,
            "domain_dns_timeout_s": 1.0,
            "webhooks_allow_private": True,
        }
    )
    rt = Runtime(settings, pool_size=10, operator=True)
    try:
        yield from serve_in_thread(rt)
    finally:
        rt.close()


@pytest.fixture
def worlds(matrix_api, dns) -> tuple[World, World]:
    return build_world(matrix_api, "acme", dns), build_world(matrix_api, "rival", dns)


def test_without_credentials_every_operation_is_401(matrix_api, worlds):
    acme, _ = worlds
    wrong = []
    for bad in (None, "mf_live_aaaaaaaaaaaa_" + "a" * 40):
        with matrix_api.client(bad) as c:
            for op in OPERATIONS:
                r = _request(c, op, acme)
                if r.status_code != 401 or r.headers["content-type"] != "application/problem+json":
                    wrong.append(f"{op} with {'no key' if bad is None else 'a bad key'}: {r.status_code}")
    assert wrong == []


def test_a_key_without_the_operations_scope_is_403(matrix_api, worlds):
    acme, _ = worlds
    wrong = []
    for op in OPERATIONS:
        others = [s for s in keys.SCOPES if s not in (op.scope, "admin")]
        with matrix_api.client(keys.create(acme.store, "all but one", others)[1]) as c:
            r = _request(c, op, acme)
        if r.status_code != 403:
            wrong.append(f"{op} without {op.scope}: {r.status_code} {r.text[:120]}")
    assert wrong == []


def test_another_tenants_key_finds_none_of_this_tenants_ids(matrix_api, worlds):
    acme, rival = worlds
    named = [op for op in OPERATIONS if "{" in op.path]
    assert len(named) > 30
    wrong = []
    with matrix_api.client(rival.admin) as c:
        for op in named:
            # acme's ids, rival's names: rival has its own "tx", "welcome", ... - only ids
            # and acme's own domains and addresses are foreign to it.
            values = path_values(acme, op)
            if not any(v.endswith("acme.example") or v in acme.ids.values() for v in values.values()):
                continue
            r = _request(c, op, acme)
            if r.status_code != 404:
                wrong.append(f"{op} with rival's key on acme's {values}: {r.status_code} {r.text[:120]}")
    assert wrong == []


def test_a_key_with_exactly_the_operations_scope_gets_2xx(matrix_api, dns):
    """Each operation against a tenant of its own, so that what one removes or starts is
    there, in the state it needs, for the next."""
    wrong = []
    for n, op in enumerate(OPERATIONS):
        w = build_world(matrix_api, f"t{n}", dns)
        prepare = PREPARE.get(op.id)
        if prepare is not None:
            prepare(w)
        with matrix_api.client(keys.create(w.store, "exactly", [op.scope])[1]) as c:
            r = _request(c, op, w)
        if not 200 <= r.status_code < 300:
            wrong.append(f"{op}: {r.status_code} {r.text[:200]}")
    assert wrong == []
