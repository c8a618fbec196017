"""The infra service over real HTTP: senders, inbound domains (with their MX record and a DNS
check against a loopback DNS server), mailboxes, routes and webhook endpoints, through the same
functions the CLI calls. Another tenant's names are 404, a key without the scope 403, bad input
a 422 problem; secrets (relay passwords, DKIM keys, signing secrets) are in no response but the
one that creates them and in no event; a webhook test reaches a real receiver, signed; private
addresses are refused unless MAILFLOW_WEBHOOKS_ALLOW_PRIVATE."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from standardwebhooks import Webhook

from mailflow.api.pagination import encode
from mailflow.consumers import inline
from mailflow.inbound import actions
from mailflow.outbound import sending
from mailflow.outbound.senders import dkim_record
from mailflow.runtime.wiring import Runtime
from mailflow.testing.dns import DnsServer

from .api_fixtures import ApiServer, make_tenant, serve_in_thread
from .test_inbound_actions import Hook

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Relay-Pw"
PROBLEM = "application/problem+json"


def _pem(key: object) -> str:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def dkim_pem() -> str:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture
def serve(api_settings) -> Iterator:
    """Another API server on this test's database, with some settings changed."""
    running: list[tuple[Iterator[ApiServer], Runtime]] = []

    def start(**updates: object) -> ApiServer:
        rt = Runtime(api_settings.model_copy(update=updates), pool_size=6, operator=True)
        served = serve_in_thread(rt)
        server = next(served)
        running.append((served, rt))
        return server

    yield start
    for served, rt in running:
        served.close()
        rt.close()


@pytest.fixture
def receiver() -> Iterator:
    made: list[Hook] = []

    def make(answers: dict[str, list[int | None]]) -> Hook:
        made.append(Hook(answers))
        return made[-1]

    yield make
    for h in made:
        h.close()


def events_text(api: ApiServer) -> str:
    """Every event's data and metadata, as text (an operator's connection sees all tenants')."""
    with api.rt.connect() as conn:
        return conn.execute(
            "SELECT coalesce(string_agg(data::text || metadata::text, ' '), '') FROM events"
        ).fetchone()[0]


def problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    return r.json()


def sender_body(**over: object) -> dict:
    body = {
        "from_email": "news@acme.example",
        "from_name": "Acme News",
        "relay_url": f"smtp://mailer:{PASSWORD}@relay.acme.example:587",
    }
    body.update(over)
    return body


def add_inbound(c: httpx.Client, domain: str = "support.acme.example", mailbox: str = "help") -> str:
    assert c.post("/inbound-domains", json={"domain": domain}).status_code == 201
    address = f"{mailbox}@{domain}"
    assert c.post("/mailboxes", json={"address": address, "name": "Help desk"}).status_code == 201
    return address


# -- senders -------------------------------------------------------------------------------------


def test_a_sender_is_created_replaced_listed_shown_and_deleted_and_its_secrets_never_come_back(api, acme_api, dkim_pem):
    c = api.client(acme_api.key)
    body = sender_body(dkim={"selector": "mf1", "private_key_pem": dkim_pem})
    created = c.put("/senders/news", json=body)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/api/v1/senders/news"
    out = created.json()
    assert out["relay"] == {
        "url": "smtp://mailer@relay.acme.example:587",
        "host": "relay.acme.example",
        "port": 587,
        "tls": "starttls",
        "direct": False,
        "username": "mailer",
        "password_set": True,
        "password_fingerprint": out["relay"]["password_fingerprint"],
    }
    assert out["relay"]["password_fingerprint"].startswith("hmac-sha256:")
    assert out["dkim"]["selector"] == "mf1" and out["dkim"]["private_key_set"] is True
    assert out["dkim"]["fingerprint"].startswith("sha256:")
    assert out["dkim"]["record_name"] == "mf1._domainkey.acme.example"

    replaced = c.put("/senders/news", json=body)
    assert replaced.status_code == 200 and replaced.json()["relay"] == out["relay"]
    listed = c.get("/senders")
    shown = c.get("/senders/news")
    record = c.get("/senders/news/dkim-record")
    assert [s["name"] for s in listed.json()["items"]] == ["news"] and shown.json() == replaced.json()
    with inline.reading(acme_api.store) as conn:  # type: ignore[arg-type]
        stored = sending.load_sender(conn, "news", vault=api.rt.vault)
        expected = dkim_record(sending.load_sender(conn, "news"))
    assert stored.relay.password == PASSWORD and stored.dkim_key_pem == dkim_pem  # kept, in the vault
    assert record.json()["value"] == expected.value and record.json()["name"] == "mf1._domainkey.acme.example"
    assert record.json()["strings"] == expected.strings()

    key_body = "".join(dkim_pem.strip().splitlines()[1:-1])
    logged = events_text(api)
    for r in (created, replaced, listed, shown, record):
        assert PASSWORD not in r.text and "PRIVATE KEY" not in r.text and key_body[:64] not in r.text
    assert PASSWORD not in logged and key_body[:64] not in logged and "PRIVATE KEY" not in logged

    assert c.delete("/senders/news").json() == {"deleted": True}
    problem(c.get("/senders/news"), 404)
    problem(c.delete("/senders/news"), 404)


def test_a_sender_replaced_without_its_secrets_has_none_and_a_direct_one_needs_no_host(api, acme_api):
    c = api.client(acme_api.key)
    assert c.put("/senders/news", json=sender_body()).status_code == 201
    again = c.put("/senders/news", json=sender_body(relay_url="direct://"))
    assert again.status_code == 200, again.text
    relay = again.json()["relay"]
    assert relay["direct"] is True and relay["password_set"] is False and relay["password_fingerprint"] is None
    assert again.json()["dkim"] is None
    problem(c.get("/senders/news/dkim-record"), 422)  # no DKIM key of its own


def test_senders_are_listed_a_page_at_a_time(api, acme_api):
    c = api.client(acme_api.key)
    for name in ("c", "a", "b"):
        assert c.put(f"/senders/{name}", json=sender_body(relay_url="smtp://relay.acme.example")).status_code == 201
    first = c.get("/senders", params={"limit": 2}).json()
    assert [s["name"] for s in first["items"]] == ["a", "b"] and first["next_cursor"]
    rest = c.get("/senders", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [s["name"] for s in rest["items"]] == ["c"] and rest["next_cursor"] is None


def test_a_sender_used_by_an_unsent_job_is_not_deleted(api, acme_api):
    from mailflow.outbound import templates

    c = api.client(acme_api.key)
    assert c.put("/senders/tx", json=sender_body(relay_url="smtp://127.0.0.1:9")).status_code == 201
    templates.save(acme_api.store, templates.Template("hi", "Hi", "<p>Hi</p>", "Hi"))  # type: ignore[arg-type]
    sending.send_transactional(acme_api.store, sender="tx", template="hi", to="ann@example.org")  # type: ignore[arg-type]
    problem(c.delete("/senders/tx"), 409)


# -- inbound domains, mailboxes, routes ----------------------------------------------------------


def test_an_inbound_domain_its_mailboxes_and_routes_are_added_shown_and_removed(api, acme_api):
    c = api.client(acme_api.key)
    added = c.post("/inbound-domains", json={"domain": "Support.Acme.Example"})
    assert added.status_code == 201, added.text
    host = api.rt.settings.inbound_hostname
    mx = added.json()["mx"]
    assert added.json()["domain"] == "support.acme.example" and added.json()["created"] is True
    assert mx["name"] == "support.acme.example." and mx["type"] == "MX" and mx["preference"] == 10
    assert mx["zone_line"] == f"support.acme.example. MX 10 {mx['host']}" and (host is None or host in mx["host"])
    again = c.post("/inbound-domains", json={"domain": "support.acme.example"})
    assert again.status_code == 200 and again.json()["created"] is False

    box = c.post("/mailboxes", json={"address": "Help@support.acme.example", "name": "Help desk"})
    assert box.status_code == 201 and box.json() == {"address": "help@support.acme.example"}
    route = c.post(
        "/routes",
        json={
            "pattern": "*@support.acme.example",
            "action": "mailbox",
            "target": "help@support.acme.example",
            "headers": ["Subject: invoice"],
            "priority": 5,
        },
    )
    assert route.status_code == 201, route.text
    r = route.json()
    assert (r["kind"], r["action"], r["priority"], r["headers"]) == (
        "catch-all",
        "mailbox",
        5,
        [{"name": "subject", "regex": "invoice"}],
    )
    reject = c.post(
        "/routes", json={"pattern": "/^spam-.*@support\\.acme\\.example$/", "action": "reject", "target": "Go away"}
    )
    assert reject.status_code == 201 and reject.json()["description"] == 'reject "Go away"'

    listed = c.get("/inbound-domains").json()["items"]
    assert [(d["domain"], d["mailboxes"]) for d in listed] == [("support.acme.example", 1)]
    details = c.get("/inbound-domains/support.acme.example").json()
    assert [b["address"] for b in details["mailboxes"]] == ["help@support.acme.example"]
    assert {x["id"] for x in details["routes"]} == {r["id"], reject.json()["id"]}
    assert details["messages"] == {"received": 0, "by_state": {}, "in_mailboxes": 0, "unread": 0}
    boxes = c.get("/mailboxes").json()["items"]
    assert [(b["address"], b["name"], b["messages"]) for b in boxes] == [("help@support.acme.example", "Help desk", 0)]
    shown = c.get("/mailboxes/help@support.acme.example").json()
    assert [x["id"] for x in shown["routes"]] == [r["id"]] and shown["latest"] == []
    assert [x["id"] for x in c.get("/routes").json()["items"]] == [r["id"], reject.json()["id"]]
    assert c.get(f"/routes/{r['id']}").json() == r

    problem(c.delete("/mailboxes/help@support.acme.example"), 409)  # a route delivers to it
    assert c.delete(f"/routes/{r['id']}").json() == {"deleted": True}
    problem(c.get(f"/routes/{r['id']}"), 404)
    assert c.delete("/mailboxes/help@support.acme.example").status_code == 200
    problem(c.get("/mailboxes/help@support.acme.example"), 404)
    assert c.delete("/inbound-domains/support.acme.example").status_code == 200
    problem(c.get("/inbound-domains/support.acme.example"), 404)


def test_routes_are_listed_in_the_order_they_are_tried_a_page_at_a_time(api, acme_api):
    c = api.client(acme_api.key)
    add_inbound(c)
    made = [
        c.post("/routes", json={"pattern": f"r{i}@support.acme.example", "action": "drop", "priority": p}).json()["id"]
        for i, p in enumerate((50, 10, 50, 10))
    ]
    expected = [made[1], made[3], made[0], made[2]]
    seen, cursor = [], None
    while True:
        page = c.get("/routes", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen += [x["id"] for x in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected


def test_mailboxes_and_domains_are_listed_a_page_at_a_time(api, acme_api):
    c = api.client(acme_api.key)
    for d in ("b.acme.example", "a.acme.example", "c.acme.example"):
        add_inbound(c, d, "x")
    first = c.get("/mailboxes", params={"limit": 2}).json()
    rest = c.get("/mailboxes", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [b["address"] for b in first["items"] + rest["items"]] == [
        "x@a.acme.example",
        "x@b.acme.example",
        "x@c.acme.example",
    ]
    domains = c.get("/inbound-domains", params={"limit": 1}).json()
    assert [d["domain"] for d in domains["items"]] == ["a.acme.example"] and domains["next_cursor"]


def test_the_domain_check_asks_the_configured_dns_server_and_says_whether_the_mx_points_here(serve):
    records = {
        ("good.acme.example", "MX"): ["10 mx.mailflow.test."],
        ("good.acme.example", "TXT"): ['"v=spf1 -all"'],
        ("_dmarc.good.acme.example", "TXT"): ['"v=DMARC1; p=reject"'],
        ("elsewhere.acme.example", "MX"): ["10 mx.other.example."],
        ("mx.mailflow.test", "A"): ["192.0.2.25"],
    }
    with DnsServer(records, silent={"slow.acme.example"}) as dns:
        api = serve(dns_servers=[dns.address], inbound_hostname="mx.mailflow.test", inbound_dns_timeout_s=0.5)
        c = api.client(make_tenant(api, "acme").key)
        for d in ("good.acme.example", "elsewhere.acme.example", "nowhere.acme.example", "slow.acme.example"):
            assert c.post("/inbound-domains", json={"domain": d}).status_code == 201
        good = c.get("/inbound-domains/good.acme.example/check").json()
        assert (good["ok"], good["status"], good["here"], good["spf"], good["dmarc"]) == (
            True,
            "ok",
            "mx.mailflow.test",
            "present",
            "present",
        )
        assert good["mx"] == [{"preference": 10, "host": "mx.mailflow.test"}]
        assert good["publish"]["zone_line"] == "good.acme.example. MX 10 mx.mailflow.test."
        wrong = c.get("/inbound-domains/elsewhere.acme.example/check").json()
        assert (wrong["ok"], wrong["status"]) == (False, "wrong")
        assert c.get("/inbound-domains/nowhere.acme.example/check").json()["status"] == "missing"
        started = time.monotonic()
        slow = c.get("/inbound-domains/slow.acme.example/check")
        assert slow.status_code == 200 and slow.json()["status"] == "temperror"
        assert time.monotonic() - started < 5  # each question waits at most the timeout
        problem(c.get("/inbound-domains/unknown.acme.example/check"), 404)


def test_the_route_secret_is_rotated_and_shown_once(api, acme_api):
    c = api.client(acme_api.key)
    first = c.post("/routes/secret/rotate")
    second = c.post("/routes/secret/rotate")
    assert first.status_code == 200 and first.json()["secret"].startswith("whsec_")
    assert second.json()["secret"] != first.json()["secret"]
    with inline.reading(acme_api.store) as conn:  # type: ignore[arg-type]
        assert actions.webhook_secret(conn, api.rt.vault, "acme") == second.json()["secret"]
    logged = events_text(api)
    for r in (first, second):
        assert r.json()["secret"].removeprefix("whsec_") not in logged


def test_a_route_that_would_post_to_a_private_address_is_refused_unless_allowed(api, acme_api, serve):
    c = api.client(acme_api.key)
    add_inbound(c)
    for url in ("http://169.254.169.254/latest/meta-data", "http://127.0.0.1:9/hook", "http://10.1.2.3/"):
        body = problem(
            c.post("/routes", json={"pattern": "*@support.acme.example", "action": "http", "target": url}), 422
        )
        assert "refused" in body["detail"]
    allowed = serve(webhooks_allow_private=True)
    ok = allowed.client(acme_api.key).post(
        "/routes", json={"pattern": "*@support.acme.example", "action": "http", "target": "http://127.0.0.1:9/hook"}
    )
    assert ok.status_code == 201, ok.text


# -- webhooks ------------------------------------------------------------------------------------


def test_a_webhook_endpoint_is_added_tested_against_a_real_receiver_disabled_enabled_and_removed(serve, receiver):
    api = serve(webhooks_allow_private=True)
    acme = make_tenant(api, "acme")
    c = api.client(acme.key)
    hook = receiver({"/in": [200, 500]})
    added = c.post("/webhooks", json={"url": hook.url("/in"), "events": ["reply", "bounce"]})
    assert added.status_code == 201, added.text
    ep = added.json()
    secret = ep["secret"]
    assert secret.startswith("whsec_") and ep["events"] == ["bounce", "reply"] and ep["status"] == "active"

    tested = c.post(f"/webhooks/{ep['id']}/test")
    assert tested.status_code == 200, tested.text
    assert (tested.json()["outcome"], tested.json()["status"]) == ("done", 200)
    [request] = hook.hits("/in")
    payload = Webhook(secret).verify(request["body"], request["headers"])
    assert payload["type"] == "webhook.test" and payload["data"] == {"endpoint_id": ep["id"], "tenant": "acme"}
    failed = c.post(f"/webhooks/{ep['id']}/test").json()
    assert (failed["outcome"], failed["status"]) == ("final", 500)

    first = c.get(f"/webhooks/{ep['id']}/deliveries", params={"limit": 1})
    assert first.status_code == 200, first.text
    rest = c.get(f"/webhooks/{ep['id']}/deliveries", params={"limit": 1, "cursor": first.json()["next_cursor"]})
    attempts = first.json()["items"] + rest.json()["items"]
    assert [(a["type"], a["outcome"], a["status"]) for a in attempts] == [
        ("webhook.test", "final", 500),
        ("webhook.test", "done", 200),
    ]
    assert rest.json()["next_cursor"] is None

    disabled = c.post(f"/webhooks/{ep['id']}/disable").json()
    assert disabled["status"] == "disabled" and disabled["disabled_reason"].startswith("disabled by ")
    assert c.post(f"/webhooks/{ep['id']}/enable").json()["status"] == "active"
    listed = c.get("/webhooks")
    shown = c.get(f"/webhooks/{ep['id']}")
    assert [e["id"] for e in listed.json()["items"]] == [ep["id"]] and shown.json()["fingerprint"] == ep["fingerprint"]
    for r in (tested, first, rest, listed, shown):
        assert secret not in r.text and "secret" not in r.json()
    logged = events_text(api)
    assert secret not in logged and secret.removeprefix("whsec_") not in logged

    assert c.delete(f"/webhooks/{ep['id']}").json() == {"deleted": True}
    problem(c.get(f"/webhooks/{ep['id']}"), 404)
    problem(c.get(f"/webhooks/{ep['id']}/deliveries"), 404)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://10.0.0.7/hook",
        "http://localhost/hook",
        "http://0.0.0.0/hook",
    ],
)
def test_a_webhook_endpoint_at_a_private_address_is_refused(api, acme_api, url):
    body = problem(api.client(acme_api.key).post("/webhooks", json={"url": url, "events": ["all"]}), 422)
    assert "refused" in body["detail"] or "resolve" in body["detail"]
    assert api.client(acme_api.key).get("/webhooks").json()["items"] == []


def test_webhook_endpoints_are_listed_a_page_at_a_time(api, acme_api):
    c = api.client(acme_api.key)
    made = [
        c.post("/webhooks", json={"url": f"https://93.184.216.34/h{i}", "events": ["all"]}).json()["id"]
        for i in range(3)
    ]
    first = c.get("/webhooks", params={"limit": 2}).json()
    rest = c.get("/webhooks", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [e["id"] for e in first["items"] + rest["items"]] == made and rest["next_cursor"] is None


# -- tenants, scopes, bad input ------------------------------------------------------------------


def _acme_things(c: httpx.Client) -> dict[str, str]:
    assert c.put("/senders/news", json=sender_body()).status_code == 201
    address = add_inbound(c)
    route = c.post("/routes", json={"pattern": "*@support.acme.example", "action": "mailbox", "target": address})
    hook = c.post("/webhooks", json={"url": "https://93.184.216.34/hook", "events": ["all"]})
    assert route.status_code == 201 and hook.status_code == 201, route.text + hook.text
    return {"route": route.json()["id"], "webhook": hook.json()["id"], "mailbox": address}


def test_another_tenants_names_are_not_found(api, acme_api, rival_api):
    ids = _acme_things(api.client(acme_api.key))
    rival = api.client(rival_api.key)
    for method, path in [
        ("GET", "/senders/news"),
        ("GET", "/senders/news/dkim-record"),
        ("DELETE", "/senders/news"),
        ("GET", "/inbound-domains/support.acme.example"),
        ("GET", "/inbound-domains/support.acme.example/check"),
        ("DELETE", "/inbound-domains/support.acme.example"),
        ("GET", f"/mailboxes/{ids['mailbox']}"),
        ("DELETE", f"/mailboxes/{ids['mailbox']}"),
        ("GET", f"/routes/{ids['route']}"),
        ("DELETE", f"/routes/{ids['route']}"),
        ("GET", f"/webhooks/{ids['webhook']}"),
        ("GET", f"/webhooks/{ids['webhook']}/deliveries"),
        ("POST", f"/webhooks/{ids['webhook']}/test"),
        ("POST", f"/webhooks/{ids['webhook']}/disable"),
        ("POST", f"/webhooks/{ids['webhook']}/enable"),
        ("DELETE", f"/webhooks/{ids['webhook']}"),
    ]:
        problem(rival.request(method, path), 404)
    for path in ("/senders", "/inbound-domains", "/mailboxes", "/routes", "/webhooks"):
        assert rival.get(path).json()["items"] == [], path
    # A mailbox or route of rival's at acme's domain: refused without saying whose it is.
    problem(rival.post("/mailboxes", json={"address": "x@support.acme.example"}), 422)
    problem(rival.post("/inbound-domains", json={"domain": "support.acme.example"}), 409)
    problem(rival.post("/routes", json={"pattern": "*@support.acme.example", "action": "drop"}), 422)
    # ... and acme's things are all still there.
    acme = api.client(acme_api.key)
    assert acme.get(f"/webhooks/{ids['webhook']}").json()["status"] == "active"
    assert acme.get(f"/routes/{ids['route']}").status_code == 200 and acme.get("/senders/news").status_code == 200


OPERATIONS = [
    ("GET", "/senders", "infra:read"),
    ("PUT", "/senders/news", "infra:write"),
    ("GET", "/senders/news", "infra:read"),
    ("GET", "/senders/news/dkim-record", "infra:read"),
    ("DELETE", "/senders/news", "infra:write"),
    ("POST", "/inbound-domains", "infra:write"),
    ("GET", "/inbound-domains", "infra:read"),
    ("GET", "/inbound-domains/support.acme.example", "infra:read"),
    ("GET", "/inbound-domains/support.acme.example/check", "infra:read"),
    ("DELETE", "/inbound-domains/support.acme.example", "infra:write"),
    ("POST", "/mailboxes", "infra:write"),
    ("GET", "/mailboxes", "infra:read"),
    ("GET", "/mailboxes/help@support.acme.example", "infra:read"),
    ("DELETE", "/mailboxes/help@support.acme.example", "infra:write"),
    ("POST", "/routes", "infra:write"),
    ("GET", "/routes", "infra:read"),
    ("GET", "/routes/abcd1234", "infra:read"),
    ("DELETE", "/routes/abcd1234", "infra:write"),
    ("POST", "/routes/secret/rotate", "infra:write"),
    ("POST", "/webhooks", "webhooks:write"),
    ("GET", "/webhooks", "webhooks:read"),
    ("GET", "/webhooks/abcd1234", "webhooks:read"),
    ("GET", "/webhooks/abcd1234/deliveries", "webhooks:read"),
    ("POST", "/webhooks/abcd1234/test", "webhooks:write"),
    ("POST", "/webhooks/abcd1234/disable", "webhooks:write"),
    ("POST", "/webhooks/abcd1234/enable", "webhooks:write"),
    ("DELETE", "/webhooks/abcd1234", "webhooks:write"),
]


def test_a_key_without_the_scope_is_refused_and_one_with_it_gets_past_the_gate(api, acme_api):
    reads = api.client(acme_api.key_with("infra:read", "webhooks:read"))
    writes = api.client(acme_api.key_with("infra:write", "webhooks:write"))
    other = api.client(acme_api.key_with("contacts:read", "contacts:write", "messages:send"))
    nobody = api.client()
    for method, path, scope in OPERATIONS:
        allowed, refused = (reads, writes) if scope.endswith(":read") else (writes, reads)
        problem(refused.request(method, path, json={}), 403)  # a :write scope does not imply :read
        problem(other.request(method, path, json={}), 403)
        problem(nobody.request(method, path, json={}), 401)
        assert allowed.request(method, path, json={}).status_code not in (401, 403), (method, path)


def test_the_openapi_document_names_each_operation_its_scope_and_its_problems(api):
    doc = api.client().get("/openapi.json").json()
    for method, path, scope in OPERATIONS:
        template = (
            path.replace("news", "{name}")
            .replace("support.acme.example", "{domain}")
            .replace("help@{domain}", "{address}")
            .replace("/routes/abcd1234", "/routes/{route_id}")
            .replace("abcd1234", "{endpoint_id}")
        )
        op = doc["paths"][template][method.lower()]
        assert op["description"], (method, template)
        assert {"401", "403", "422"} <= set(op["responses"]), (method, template)
        assert [s for sec in op["security"] for s in sec.values()] == [[scope]], (method, template)
        if "{" in template and method != "PUT":  # a PUT creates what is not there
            assert "404" in op["responses"], (method, template)
    put = doc["paths"]["/senders/{name}"]["put"]["responses"]
    assert {"200", "201"} <= set(put)


def _rsa_less_pem() -> str:
    return _pem(ec.generate_private_key(ec.SECP256R1()))


BAD = [
    ("PUT", "/senders/bad name", sender_body()),
    ("PUT", "/senders/" + "n" * 101, sender_body()),
    ("PUT", "/senders/news", {**sender_body(), "surprise": 1}),
    ("PUT", "/senders/news", sender_body(from_email="")),
    ("PUT", "/senders/news", sender_body(from_email="not an address")),
    ("PUT", "/senders/news", sender_body(from_email="ünïcødé@exa mple")),
    ("PUT", "/senders/news", sender_body(from_name="Evil\r\nBcc: all@example.org")),
    ("PUT", "/senders/news", sender_body(relay_url="ftp://relay.acme.example")),
    ("PUT", "/senders/news", sender_body(relay_url="smtp://relay.acme.example?tls=maybe")),
    ("PUT", "/senders/news", sender_body(relay_url="smtp://relay.acme.example:99999")),
    ("PUT", "/senders/news", sender_body(relay_url="x" * 2001)),
    ("PUT", "/senders/news", sender_body(dkim={"selector": "mf1", "private_key_pem": "not a key"})),
    ("PUT", "/senders/news", sender_body(dkim={"selector": "bad selector", "private_key_pem": "k"})),
    ("PUT", "/senders/news", sender_body(dkim={"selector": "mf1"})),
    ("PUT", "/senders/news", sender_body(from_email=123)),
    ("PUT", "/senders/news", []),
    ("POST", "/inbound-domains", {"domain": ""}),
    ("POST", "/inbound-domains", {"domain": "not a domain"}),
    ("POST", "/inbound-domains", {"domain": "ドメイン.テスト"}),
    ("POST", "/inbound-domains", {"domain": "a" * 300}),
    ("POST", "/inbound-domains", {"domain": ["acme.example"]}),
    ("POST", "/mailboxes", {"address": "help+tag@support.acme.example"}),
    ("POST", "/mailboxes", {"address": "help@nowhere.example"}),
    ("POST", "/mailboxes", {"address": "no-at-sign"}),
    ("POST", "/mailboxes", {"address": "x@support.acme.example", "name": "a" * 201}),
    ("POST", "/routes", {"pattern": "*@support.acme.example", "action": "teleport"}),
    ("POST", "/routes", {"pattern": "*@support.acme.example", "action": "drop", "priority": "high"}),
    ("POST", "/routes", {"pattern": "*@support.acme.example", "action": "drop", "priority": 10**7}),
    ("POST", "/routes", {"pattern": "*@support.acme.example", "action": "drop", "target": "x"}),
    ("POST", "/routes", {"pattern": "/(a+)+@x/", "action": "drop"}),
    ("POST", "/routes", {"pattern": "", "action": "drop"}),
    ("POST", "/routes", {"pattern": "*@elsewhere.example", "action": "drop"}),
    ("POST", "/routes", {"pattern": "*@support.acme.example", "action": "drop", "headers": ["no colon"]}),
    ("POST", "/routes", {"pattern": "*@support.acme.example", "action": "http", "target": "ftp://x.example/"}),
    (
        "POST",
        "/routes",
        {"pattern": "*@support.acme.example", "action": "http", "target": "https://a.example/?token=1"},
    ),
    ("POST", "/routes", {"pattern": "*@support.acme.example", "action": "forward", "target": "not an address"}),
    ("POST", "/webhooks", {"url": "https://93.184.216.34/", "events": "reply"}),
    ("POST", "/webhooks", {"url": "https://93.184.216.34/", "events": []}),
    ("POST", "/webhooks", {"url": "https://93.184.216.34/", "events": ["replies"]}),
    ("POST", "/webhooks", {"url": "https://user:pw@93.184.216.34/", "events": ["all"]}),
    ("POST", "/webhooks", {"url": "gopher://93.184.216.34/", "events": ["all"]}),
    ("POST", "/webhooks", {"url": "https://no-such-host.invalid/", "events": ["all"]}),
    ("POST", "/webhooks", {"url": "HTtP://\u00c2\u011b\u0109y^\u0119K", "events": ["all"]}),  # no IDNA name
    ("POST", "/webhooks", {"url": "http://a..b/", "events": ["all"]}),
    ("POST", "/webhooks", {"url": "http://xn--/", "events": ["all"]}),
    ("POST", "/webhooks", {"url": "http://[zz]/", "events": ["all"]}),
    ("POST", "/routes", {"pattern": "*@support.acme.example", "action": "http", "target": "http://[::1/"}),
    ("POST", "/routes", {"pattern": "*@support.acme.example", "action": "http", "target": "http://xn--/"}),
    ("GET", "/senders?limit=0", None),
    ("GET", "/senders?limit=501", None),
    ("GET", "/senders?cursor=!!!", None),
    ("GET", f"/senders?cursor={encode([1])}", None),
    ("GET", f"/routes?cursor={encode(['a', 'b'])}", None),
    ("GET", f"/routes?cursor={encode([1, 2**63])}", None),
    ("GET", f"/routes?cursor={base64.urlsafe_b64encode(b'[1, 1000000000000000000000000000]').decode()}", None),
    ("GET", f"/senders?cursor={encode(['a' + chr(0)])}", None),
    ("GET", f"/webhooks?cursor={encode(['not a time', 'x'])}", None),
    ("GET", f"/webhooks?cursor={encode(['2026-12-02T00:00:00+00:00', 3])}", None),
    ("GET", f"/mailboxes?cursor={encode([{'a': 1}])}", None),
    ("GET", "/inbound-domains/not_a_domain!", None),
    ("GET", "/inbound-domains/" + "a" * 254, None),
    ("GET", "/mailboxes/help@support.acme.example?latest=-1", None),
]


def test_bad_input_is_a_422_problem_and_changes_nothing(api, acme_api):
    c = api.client(acme_api.key)
    add_inbound(c)
    ep = c.post("/webhooks", json={"url": "https://93.184.216.34/hook", "events": ["all"]}).json()["id"]
    before = events_text(api)
    bad = BAD + [
        ("GET", f"/webhooks/{ep}/deliveries?cursor={encode(['2026-12-02T00:00:00+00:00', 'not-a-uuid', 1])}", None),
        ("GET", f"/webhooks/{ep}/deliveries?cursor={encode(['2026-12-02T00:00:00+00:00', str(ep), -1])}", None),
        ("PUT", "/senders/news", sender_body(dkim={"selector": "mf1", "private_key_pem": _rsa_less_pem()})),
    ]
    for method, path, body in bad:
        r = c.request(method, path, json=body) if body is not None else c.request(method, path)
        got = problem(r, 422)
        assert got["detail"] and got["status"] == 422, (method, path)
        assert PASSWORD not in r.text
    assert events_text(api) == before


NASTY = ["%00", "..%2F..%2Fetc", " ", "ü" * 50, "x" * 250, "'; DROP TABLE senders; --", "%F0%9F%92%A9", "a@b", "1e9"]


def test_nasty_names_in_paths_are_a_4xx_never_a_5xx(api, acme_api):
    c = api.client(acme_api.key)
    for name in NASTY:
        for path in (
            f"/senders/{name}",
            f"/senders/{name}/dkim-record",
            f"/inbound-domains/{name}",
            f"/inbound-domains/{name}/check",
            f"/mailboxes/{name}",
            f"/routes/{name}",
            f"/webhooks/{name}",
            f"/webhooks/{name}/deliveries",
        ):
            for method in ("GET", "DELETE"):
                r = c.request(method, path)
                assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
                if r.status_code != 405:
                    assert r.headers["content-type"].startswith(PROBLEM), (method, path)


def test_a_secret_shown_once_is_not_kept_in_plaintext_for_an_idempotent_replay(api, acme_api):
    c = api.client(acme_api.key, **{"Idempotency-Key": "add-hook-1"})
    created = c.post("/webhooks", json={"url": "https://93.184.216.34/hook", "events": ["all"]})
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    with api.rt.connect() as conn:
        kept = conn.execute("SELECT coalesce(string_agg(encode(response, 'escape'), ' '), '') FROM api_idempotency")
        assert secret.removeprefix("whsec_") not in kept.fetchone()[0]
    # The repeat still answers as the first did: the kept answer is decrypted for it.
    again = c.post("/webhooks", json={"url": "https://93.184.216.34/hook", "events": ["all"]})
    assert again.headers["idempotent-replayed"] == "true" and again.json()["secret"] == secret
