"""The campaign service over HTTP (issue #12): contacts (with the streamed import), segments,
templates, campaigns and suppressions, through a real uvicorn - happy paths, tenant isolation
(404), scopes (403), bad input (422 problem+json), cursor pagination, the body limit of an import
(413), jobs made by a campaign started over the API, and the request id in the events."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mailflow.outbound import sending, streams
from mailflow.outbound.senders import Sender
from mailflow.runtime.wiring import Runtime

from .api_fixtures import ApiServer, Tenant, make_tenant, serve_in_thread

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"]
    return body


def all_pages(client: httpx.Client, path: str, limit: int, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        body = ok(client.get(path, params={**params, "limit": limit, **({"cursor": cursor} if cursor else {})}))
        assert len(body["items"]) <= limit
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the pages never ended")


@pytest.fixture
def acme(acme_api: Tenant, api: ApiServer) -> Iterator[httpx.Client]:
    with api.client(acme_api.key) as c:
        yield c


@pytest.fixture
def rival(rival_api: Tenant, api: ApiServer) -> Iterator[httpx.Client]:
    with api.client(rival_api.key) as c:
        yield c


def catalog(acme: httpx.Client, tenant: Tenant) -> None:
    """A sender (set up as the CLI does), a template, a segment and three contacts."""
    sending.save_sender(tenant.store, Sender("news", "news@example.org", "News", "smtp://127.0.0.1:1"))  # type: ignore[arg-type]
    ok(acme.post("/templates", json={"name": "hello", "subject": "Hi {{ name }}", "text": "Hello {{ name }}"}), 201)
    ok(acme.post("/segments", json={"name": "nl", "filter": {"attributes.country": "NL"}}), 201)
    for i, country in enumerate(["NL", "NL", "BE"]):
        ok(
            acme.post(
                "/contacts", json={"email": f"p{i}@example.net", "attributes": {"name": f"P{i}", "country": country}}
            ),
            201,
        )


# -- contacts --------------------------------------------------------------------------------------


def test_a_contact_is_created_shown_changed_listed_deleted_and_erased(acme: httpx.Client) -> None:
    created = ok(
        acme.post("/contacts", json={"email": "Ann@Example.NET", "attributes": {"plan": "pro", "age": 41}}), 201
    )
    assert created["email"] == "ann@example.net" and created["status"] == "active"
    assert created["attributes"] == {"plan": "pro", "age": 41} and created["suppression"] is None
    problem(acme.post("/contacts", json={"email": "ann@example.net"}), 409)

    changed = ok(
        acme.patch("/contacts/ANN@example.net", json={"attributes": {"plan": "team", "age": None, "名": "アン"}})
    )
    assert changed["attributes"] == {"plan": "team", "名": "アン"}
    assert ok(acme.get("/contacts/ann@example.net"))["attributes"] == changed["attributes"]

    ok(acme.post("/contacts", json={"email": "bob@example.net"}), 201)
    assert [c["email"] for c in ok(acme.get("/contacts"))["items"]] == ["ann@example.net", "bob@example.net"]

    deleted = ok(acme.delete("/contacts/bob@example.net"))
    assert deleted == {"email": "bob@example.net", "deleted": True, "jobs_ended": 0}
    problem(acme.get("/contacts/bob@example.net"), 404)
    problem(acme.delete("/contacts/bob@example.net"), 404)
    ok(acme.post("/contacts", json={"email": "bob@example.net"}), 201)  # a deleted contact may come back

    erased = ok(acme.post("/contacts/ann@example.net/erase"))
    assert erased == {"email": "ann@example.net", "contact": True, "jobs": 0, "cancelled": 0, "already": False}
    assert ok(acme.post("/contacts/ann@example.net/erase"))["already"] is True
    problem(acme.get("/contacts/ann@example.net"), 404)
    assert "erased" in problem(acme.post("/contacts", json={"email": "ann@example.net"}), 409)["detail"]


def test_a_suppressed_contact_is_reactivated_with_a_reason(acme: httpx.Client) -> None:
    ok(acme.post("/contacts", json={"email": "cy@example.net"}), 201)
    problem(acme.post("/contacts/cy@example.net/reactivate", json={"reason": "why not"}), 409)  # nothing to undo
    ok(acme.post("/suppressions", json={"email": "cy@example.net", "reason": "bounce", "detail": "550 5.1.1"}), 201)
    assert ok(acme.get("/contacts/cy@example.net"))["suppression"]["reason"] == "bounce"
    problem(acme.post("/contacts/cy@example.net/reactivate", json={"reason": ""}), 422)
    r = ok(acme.post("/contacts/cy@example.net/reactivate", json={"reason": "mailbox fixed, ticket 42"}))
    assert r == {
        "email": "cy@example.net",
        "status": "active",
        "previous_status": "active",
        "suppression_lifted": "bounce",
    }
    assert ok(acme.get("/contacts/cy@example.net"))["suppression"] is None


def test_contacts_are_listed_by_status_and_segment(acme: httpx.Client, acme_api: Tenant) -> None:
    catalog(acme, acme_api)
    ok(acme.post("/suppressions", json={"email": "p1@example.net"}), 201)
    assert [c["email"] for c in ok(acme.get("/contacts", params={"segment": "nl"}))["items"]] == [
        "p0@example.net",
        "p1@example.net",
    ]
    assert len(ok(acme.get("/contacts", params={"status": "active"}))["items"]) == 3
    assert ok(acme.get("/contacts", params={"status": "bounced"}))["items"] == []
    problem(acme.get("/contacts", params={"segment": "nope"}), 404)
    problem(acme.get("/contacts", params={"status": "gone"}), 422)


# -- the import ------------------------------------------------------------------------------------


def test_a_csv_import_reports_its_bad_lines_and_imports_the_rest(acme: httpx.Client) -> None:
    ok(acme.post("/contacts", json={"email": "known@example.net", "attributes": {"a": 1}}), 201)
    body = (
        "email,name,zip\n"
        "ann@example.net,Ann,0123\n"
        "not-an-address,X,1\n"
        "KNOWN@example.net,Known,2\n"
        "ann@example.net,Again,3\n"
        "bob@example.net,Bob,4,extra\n"
        "zoë@example.net,Zoë,5\n"
    )
    report = ok(
        acme.post("/contacts/import", content=body.encode(), headers={"Content-Type": "text/csv; charset=utf-8"})
    )
    assert {
        k: report[k] for k in ("rows", "imported", "created", "updated", "duplicates_in_file", "rejected_count")
    } == {
        "rows": 6,
        "imported": 3,
        "created": 2,
        "updated": 1,
        "duplicates_in_file": 1,
        "rejected_count": 2,
    }
    assert [(r["line"], r["value"]) for r in report["rejected"]] == [(3, "not-an-address"), (6, "")]
    assert all(r["reason"] for r in report["rejected"])
    assert ok(acme.get("/contacts/ann@example.net"))["attributes"] == {"name": "Ann", "zip": "0123"}
    assert ok(acme.get("/contacts/known@example.net"))["attributes"] == {"a": 1, "name": "Known", "zip": 2}


def test_a_json_lines_import_reports_its_bad_lines_and_imports_the_rest(acme: httpx.Client) -> None:
    lines = [
        '{"email": "ann@example.net", "plan": "pro", "tags": ["a", "b"], "n": 3}',
        "",
        "{not json",
        '["email"]',
        '{"name": "no address"}',
        '{"email": "nope"}',
        '{"email": "bob@example.net", "bad": "nul \\u0000 inside"}',
        '{"email": "bob@example.net", "big": 123456789012345678901234567890}',
        '{"email": "cy@example.net", "gone": null}',
    ]
    report = ok(
        acme.post(
            "/contacts/import", content="\n".join(lines).encode(), headers={"Content-Type": "application/x-ndjson"}
        )
    )
    assert report["imported"] == 2 and report["created"] == 2 and report["rejected_count"] == 6
    assert [r["line"] for r in report["rejected"]] == [3, 4, 5, 6, 7, 8]
    assert ok(acme.get("/contacts/ann@example.net"))["attributes"] == {"plan": "pro", "tags": ["a", "b"], "n": 3}
    assert ok(acme.get("/contacts/cy@example.net"))["attributes"] == {}


def test_an_import_streamed_in_chunks_is_imported_whole(acme: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"email,n\n"
        for i in range(2500):
            yield f"person{i}@example.net,{i}\n".encode()

    report = ok(acme.post("/contacts/import", content=chunks(), headers={"Content-Type": "text/csv"}))
    assert report["imported"] == 2500 and report["rejected_count"] == 0
    assert len(all_pages(acme, "/contacts", 500)) == 2500


def test_an_import_that_is_not_utf8_or_of_another_type_imports_nothing(acme: httpx.Client) -> None:
    bad = "email\nann@example.net\nzoë@example.net\n".encode("latin-1")
    assert (
        "line 3"
        in problem(acme.post("/contacts/import", content=bad, headers={"Content-Type": "text/csv"}), 422)["detail"]
    )
    nul = b"email\nann@example.net\n\x00\n"
    problem(acme.post("/contacts/import", content=nul, headers={"Content-Type": "text/csv"}), 422)
    problem(acme.post("/contacts/import", content=b"name\nx\n", headers={"Content-Type": "text/csv"}), 422)
    problem(acme.post("/contacts/import", content=b"", headers={"Content-Type": "text/csv"}), 422)
    problem(acme.post("/contacts/import", json=[{"email": "ann@example.net"}]), 415)
    problem(acme.post("/contacts/import", content=b"email\nann@example.net\n"), 415)
    assert ok(acme.get("/contacts"))["items"] == []


@pytest.fixture
def small_import_api(api_settings: Any) -> Iterator[ApiServer]:
    rt = Runtime(api_settings.model_copy(update={"api_max_import_bytes": 2048}), pool_size=4, operator=True)
    try:
        yield from serve_in_thread(rt)
    finally:
        rt.close()


def test_an_import_larger_than_the_limit_is_413_and_imports_nothing(small_import_api: ApiServer) -> None:
    tenant = make_tenant(small_import_api, "acme")
    body = b"email\n" + b"".join(f"p{i}@example.net\n".encode() for i in range(300))
    assert len(body) > 2048
    with small_import_api.client(tenant.key) as c:
        problem(c.post("/contacts/import", content=body, headers={"Content-Type": "text/csv"}), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
            for i in range(0, len(body), 500):
                yield body[i : i + 500]

        problem(c.post("/contacts/import", content=chunks(), headers={"Content-Type": "text/csv"}), 413)
        assert ok(c.get("/contacts"))["items"] == []
        small = b"email\nann@example.net\n"
        assert ok(c.post("/contacts/import", content=small, headers={"Content-Type": "text/csv"}))["imported"] == 1


# -- segments and templates ------------------------------------------------------------------------


def test_segments_are_saved_previewed_listed_and_deleted(acme: httpx.Client, acme_api: Tenant) -> None:
    catalog(acme, acme_api)
    seg = ok(acme.get("/segments/nl"))
    assert seg["filter"] == {"attributes.country": "NL"} and seg["count"] == 2
    problem(acme.post("/segments", json={"name": "nl", "filter": {}}), 409)
    pv = ok(acme.post("/segments/preview", json={"filter": {"attributes.country": {"$in": ["BE"]}}, "sample": 5}))
    assert pv["count"] == 1 and [c["email"] for c in pv["sample"]] == ["p2@example.net"]
    pv = ok(acme.get("/segments/nl/preview", params={"sample": 1}))
    assert pv["count"] == 2 and len(pv["sample"]) == 1
    bad = problem(acme.post("/segments/preview", json={"filter": {"attributes.age": {"$between": 1}}}), 422)
    assert "$between" in bad["detail"]
    problem(acme.post("/segments", json={"name": "x", "filter": {"nope": 1}}), 422)
    ok(acme.post("/segments", json={"name": "all", "filter": {}}), 201)
    assert [s["name"] for s in ok(acme.get("/segments"))["items"]] == ["all", "nl"]
    assert ok(acme.delete("/segments/all")) == {"deleted": True}
    problem(acme.get("/segments/all"), 404)
    problem(acme.delete("/segments/all"), 404)


def test_templates_are_created_changed_rendered_and_deleted(acme: httpx.Client, acme_api: Tenant) -> None:
    catalog(acme, acme_api)
    problem(acme.post("/templates", json={"name": "hello", "subject": "x", "text": "y"}), 409)
    bad = problem(acme.post("/templates", json={"name": "broken", "subject": "Hi {{ name", "text": "x"}), 422)
    assert "subject" in bad["detail"]
    problem(acme.post("/templates", json={"name": "empty", "subject": "Hi"}), 422)  # no body
    tpl = ok(acme.patch("/templates/hello", json={"html": "<p>Hello {{ name }} {{ unsubscribe_url }}</p>"}))
    assert tpl["subject"] == "Hi {{ name }}" and tpl["text"] == "Hello {{ name }}" and "<p>" in tpl["html"]
    r = ok(acme.post("/templates/hello/render", json={"variables": {"name": "<Ann>"}}))
    assert r["subject"] == "Hi <Ann>" and r["text"] == "Hello <Ann>" and "&lt;Ann&gt;" in r["html"]
    assert "<unsubscribe_url>" in r["html"] or "&lt;unsubscribe_url&gt;" in r["html"]
    r = ok(acme.post("/templates/hello/render", json={"contact": "p2@example.net"}))
    assert r["subject"] == "Hi P2"
    missing = problem(acme.post("/templates/hello/render", json={}), 422)
    assert "name" in missing["detail"]
    problem(acme.post("/templates/hello/render", json={"contact": "nobody@example.net"}), 404)
    problem(acme.post("/templates/nope/render", json={}), 404)
    assert [t["name"] for t in ok(acme.get("/templates"))["items"]] == ["hello"]
    assert ok(acme.delete("/templates/hello")) == {"deleted": True}
    problem(acme.get("/templates/hello"), 404)


# -- campaigns -------------------------------------------------------------------------------------


def create_campaign(acme: httpx.Client, name: str = "spring") -> dict[str, Any]:
    return ok(acme.post("/campaigns", json={"name": name, "sender": "news", "template": "hello", "segment": "nl"}), 201)


def test_a_campaign_started_over_the_api_creates_its_jobs(acme: httpx.Client, acme_api: Tenant) -> None:
    catalog(acme, acme_api)
    c = create_campaign(acme)
    assert c["status"] == "draft" and c["recipients"] == 0
    problem(
        acme.post("/campaigns", json={"name": "spring", "sender": "news", "template": "hello", "segment": "nl"}), 409
    )
    problem(acme.post("/campaigns", json={"name": "x", "sender": "news", "template": "nope", "segment": "nl"}), 404)
    problem(acme.post(f"/campaigns/{c['id']}/pause"), 409)  # not running
    problem(acme.post(f"/campaigns/{c['id']}/resend-failed"), 409)  # not started
    problem(acme.delete("/segments/nl"), 409)  # the campaign uses it

    started = ok(acme.post(f"/campaigns/{c['id']}/start"), 202)
    assert started == {"id": c["id"], "status": "running", "jobs_created": 2}
    assert ok(acme.post(f"/campaigns/{c['id']}/start"), 202)["jobs_created"] == 0  # once only

    jobs = ok(acme.get("/jobs", params={"campaign_id": c["id"]}))["items"]
    assert sorted(j["email"] for j in jobs) == ["p0@example.net", "p1@example.net"]
    assert {j["state"] for j in jobs} == {"pending"} and {j["priority"] for j in jobs} == {"normal"}
    status = ok(acme.get(f"/campaigns/{c['id']}/status"))
    assert status["status"] == "running" and status["total"] == 2 and status["jobs"]["pending"] == 2
    recipients = ok(acme.get(f"/campaigns/{c['id']}/recipients"))["items"]
    assert sorted(r["job_id"] for r in recipients) == sorted(j["id"] for j in jobs)
    assert all(r["state"] == "pending" and r["feedback"] is None for r in recipients)

    assert ok(acme.post(f"/campaigns/{c['id']}/pause"))["status"] == "paused"
    assert ok(acme.post(f"/campaigns/{c['id']}/resume"))["status"] == "running"
    assert ok(acme.post(f"/campaigns/{c['id']}/resend-failed"), 202)["jobs_created"] == 0

    # Deleting a contact ends its unsent campaign job: it is not mailed.
    assert ok(acme.delete("/contacts/p1@example.net"))["jobs_ended"] == 1
    cancelled = ok(acme.post(f"/campaigns/{c['id']}/cancel"))
    assert cancelled == {"id": c["id"], "status": "cancelled", "jobs_ended": 1}
    problem(acme.post(f"/campaigns/{c['id']}/start"), 409)
    failed = ok(acme.get(f"/campaigns/{c['id']}/recipients", params={"state": "failed"}))["items"]
    assert sorted((r["failure_kind"], r["last_reply"]) for r in failed) == [
        ("cancelled", "campaign cancelled"),
        ("suppressed", "not sent: the contact was deleted"),
    ]
    assert ok(acme.get(f"/campaigns/{c['id']}"))["status"] == "cancelled"


def test_a_campaign_is_scheduled_and_an_empty_segment_does_not_start(acme: httpx.Client, acme_api: Tenant) -> None:
    catalog(acme, acme_api)
    ok(acme.post("/segments", json={"name": "nobody", "filter": {"attributes.country": "FR"}}), 201)
    c = ok(
        acme.post("/campaigns", json={"name": "empty", "sender": "news", "template": "hello", "segment": "nobody"}), 201
    )
    problem(acme.post(f"/campaigns/{c['id']}/start"), 422)
    assert ok(acme.get(f"/campaigns/{c['id']}"))["status"] == "draft"
    problem(acme.post(f"/campaigns/{c['id']}/schedule", json={"at": "2031-01-01T09:00:00"}), 422)  # no time zone
    s = ok(acme.post(f"/campaigns/{c['id']}/schedule", json={"at": "2031-01-01T09:00:00+01:00"}))
    assert s["status"] == "scheduled" and s["scheduled_at"].startswith("2031-01-01T08:00:00")
    assert [x["name"] for x in ok(acme.get("/campaigns", params={"status": "scheduled"}))["items"]] == ["empty"]


# -- suppressions ----------------------------------------------------------------------------------


def test_suppressions_are_added_listed_and_removed(acme: httpx.Client) -> None:
    added = ok(acme.post("/suppressions", json={"email": "Eve@Example.net", "reason": "complaint"}), 201)
    assert added == {"email": "eve@example.net", "reason": "complaint"}
    listed = ok(acme.get("/suppressions"))["items"]
    assert [(s["email"], s["reason"]) for s in listed] == [("eve@example.net", "complaint")]
    assert ok(acme.get("/suppressions", params={"reason": "manual"}))["items"] == []
    r = ok(acme.delete("/suppressions/eve@example.net"))
    assert r == {"email": "eve@example.net", "contact_status": None, "still_stopped": False}
    problem(acme.delete("/suppressions/eve@example.net"), 404)
    problem(acme.post("/suppressions", json={"email": "eve@example.net", "reason": "erased"}), 422)
    ok(acme.post("/contacts/gone@example.net/erase"))
    assert [s["email"] for s in ok(acme.get("/suppressions"))["items"]] == [None]
    problem(acme.delete("/suppressions/gone@example.net"), 409)
    problem(acme.post("/suppressions", json={"email": "gone@example.net"}), 409)


# -- pagination ------------------------------------------------------------------------------------


def test_every_listing_returns_each_item_once_across_its_pages(acme: httpx.Client, acme_api: Tenant) -> None:
    catalog(acme, acme_api)
    for i in range(4):
        ok(acme.post("/contacts", json={"email": f"more{i}@example.net"}), 201)
        ok(acme.post("/segments", json={"name": f"s{i}", "filter": {"email": f"more{i}@example.net"}}), 201)
        ok(acme.post("/templates", json={"name": f"t{i}", "subject": "S", "text": "T"}), 201)
        ok(acme.post("/suppressions", json={"email": f"more{i}@example.net"}), 201)
        create_campaign(acme, f"c{i}")
    ok(acme.post("/suppressions", json={"email": "p0@example.net"}), 201)
    c0 = ok(acme.get("/campaigns", params={"limit": 500}))["items"][-1]["id"]
    ok(acme.post(f"/campaigns/{c0}/start"), 202)

    def once(path: str, key: str, total: int, **params: Any) -> None:
        for limit in (1, 2, 3):
            seen = [item[key] for item in all_pages(acme, path, limit, **params)]
            assert len(seen) == len(set(seen)) == total, (path, limit, seen)

    once("/contacts", "email", 7)
    once("/segments", "name", 5)
    once("/templates", "name", 5)
    once("/campaigns", "id", 4)
    once("/suppressions", "subject", 5)
    once(f"/campaigns/{c0}/recipients", "job_id", 1)
    for path in ("/contacts", "/segments", "/templates", "/campaigns", "/suppressions", f"/campaigns/{c0}/recipients"):
        for cursor in ("garbage", "WzEsMiwzXQ", "eyJhIjoxfQ"):  # not base64 JSON, [1,2,3], {"a":1}
            problem(acme.get(path, params={"cursor": cursor}), 422)
    for path in ("/contacts", "/campaigns", "/suppressions", f"/campaigns/{c0}/recipients"):
        problem(acme.get(path, params={"cursor": "WyJ4Il0"}), 422)  # ["x"]: not an id
    problem(acme.get("/campaigns", params={"cursor": "WyJ4IiwgIjEiXQ"}), 422)  # ["x", "1"]: not a time and an id


# -- isolation, scopes, bad input ------------------------------------------------------------------


def test_another_tenants_ids_and_names_are_not_found(acme: httpx.Client, acme_api: Tenant, rival: httpx.Client) -> None:
    catalog(acme, acme_api)
    c = create_campaign(acme)
    ok(acme.post("/suppressions", json={"email": "p2@example.net"}), 201)
    for method, path, body in [
        ("GET", "/contacts/p0@example.net", None),
        ("PATCH", "/contacts/p0@example.net", {"attributes": {"x": 1}}),
        ("DELETE", "/contacts/p0@example.net", None),
        ("POST", "/contacts/p0@example.net/reactivate", {"reason": "r"}),
        ("GET", "/contacts?segment=nl", None),
        ("GET", "/segments/nl", None),
        ("GET", "/segments/nl/preview", None),
        ("DELETE", "/segments/nl", None),
        ("GET", "/templates/hello", None),
        ("PATCH", "/templates/hello", {"subject": "mine now"}),
        ("DELETE", "/templates/hello", None),
        ("POST", "/templates/hello/render", {"variables": {"name": "x"}}),
        ("GET", f"/campaigns/{c['id']}", None),
        ("GET", f"/campaigns/{c['id']}/status", None),
        ("GET", f"/campaigns/{c['id']}/recipients", None),
        ("POST", f"/campaigns/{c['id']}/start", None),
        ("POST", f"/campaigns/{c['id']}/schedule", {"at": "2031-01-01T00:00:00Z"}),
        ("POST", f"/campaigns/{c['id']}/pause", None),
        ("POST", f"/campaigns/{c['id']}/resume", None),
        ("POST", f"/campaigns/{c['id']}/cancel", None),
        ("POST", f"/campaigns/{c['id']}/resend-failed", None),
        ("DELETE", "/suppressions/p2@example.net", None),
        ("POST", "/campaigns", {"name": "theirs", "sender": "news", "template": "hello", "segment": "nl"}),
    ]:
        problem(rival.request(method, path, json=body), 404)
    for path in ("/contacts", "/segments", "/templates", "/campaigns", "/suppressions"):
        assert ok(rival.get(path))["items"] == [], path
    assert ok(acme.get(f"/campaigns/{c['id']}"))["status"] == "draft"
    assert ok(acme.get("/templates/hello"))["subject"] == "Hi {{ name }}"
    assert ok(acme.get("/contacts/p0@example.net"))["attributes"] == {"name": "P0", "country": "NL"}


@pytest.mark.parametrize(
    ("scopes", "method", "path", "body"),
    [
        (("contacts:read",), "POST", "/contacts", {"email": "a@example.net"}),
        (("contacts:read",), "POST", "/suppressions", {"email": "a@example.net"}),
        (("contacts:read",), "POST", "/segments", {"name": "s", "filter": {}}),
        (("campaigns:read",), "GET", "/contacts", None),
        (("campaigns:read",), "GET", "/segments", None),
        (("campaigns:read",), "POST", "/templates", {"name": "t", "subject": "s", "text": "t"}),
        (("campaigns:write",), "GET", "/campaigns", None),
        (("contacts:write",), "GET", "/suppressions", None),
        (
            ("contacts:write", "contacts:read"),
            "POST",
            "/campaigns",
            {"name": "c", "sender": "s", "template": "t", "segment": "g"},
        ),
        (("messages:send",), "POST", "/contacts/import", None),
    ],
)
def test_a_key_without_the_scope_is_403(
    api: ApiServer, acme_api: Tenant, scopes: tuple[str, ...], method: str, path: str, body: Any
) -> None:
    with api.client(acme_api.key_with(*scopes)) as c:
        problem(c.request(method, path, json=body), 403)
    with api.client() as anonymous:
        problem(anonymous.request(method, path, json=body), 401)


def test_the_scope_that_is_needed_is_enough(api: ApiServer, acme_api: Tenant) -> None:
    with api.client(acme_api.key_with("contacts:write")) as w, api.client(acme_api.key_with("contacts:read")) as r:
        ok(w.post("/contacts", json={"email": "a@example.net"}), 201)
        assert [c["email"] for c in ok(r.get("/contacts"))["items"]] == ["a@example.net"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/contacts", {}),
        ("POST", "/contacts", {"email": ""}),
        ("POST", "/contacts", {"email": "not an address"}),
        ("POST", "/contacts", {"email": "a" * 5000 + "@example.net"}),
        ("POST", "/contacts", {"email": "a@example.net", "attributes": "x"}),
        ("POST", "/contacts", {"email": "a@example.net", "attributes": {"x": "nul\u0000"}}),
        ("POST", "/contacts", {"email": "a@example.net", "attributes": {"x": 10**30}}),
        ("POST", "/contacts", {"email": "a@example.net", "attributes": {"email": "b@example.net"}}),
        ("POST", "/contacts", {"email": "a@example.net", "attributes": {"": 1}}),
        ("POST", "/contacts", {"email": "a@example.net", "unknown": 1}),
        ("POST", "/contacts", {"email": 42}),
        ("PATCH", "/contacts/a@example.net", {"attributes": {}}),
        ("GET", "/contacts/not-an-address", None),
        ("GET", "/contacts/%00@example.net", None),
        ("GET", "/contacts?limit=0", None),
        ("GET", "/contacts?limit=100000", None),
        ("GET", "/contacts?segment=bad%20name", None),
        ("POST", "/contacts/import?source=bad%00", None),
        ("POST", "/segments", {"name": "", "filter": {}}),
        ("POST", "/segments", {"name": "ü" * 10, "filter": {}}),
        ("POST", "/segments", {"name": "s", "filter": []}),
        ("POST", "/segments", {"name": "s", "filter": {"email": {"$contains": "\u0000"}}}),
        ("POST", "/segments", {"name": "s", "filter": {"created_at": {"$gt": "yesterday"}}}),
        ("POST", "/segments/preview", {"filter": {}, "sample": -1}),
        ("POST", "/segments/preview", {"filter": {"status": "gone"}}),
        ("GET", "/segments/a%20b", None),
        ("POST", "/templates", {"name": "t", "subject": "", "text": "x"}),
        ("POST", "/templates", {"name": "t", "subject": "s", "text": "x" * 600_000}),
        ("POST", "/templates", {"name": "t", "subject": "s", "text": "{% for %}"}),
        ("POST", "/templates", {"name": "t", "subject": "s\u0000", "text": "x"}),
        ("PATCH", "/templates/t", {"subject": ""}),
        ("POST", "/campaigns", {"name": "", "sender": "news", "template": "hello", "segment": "nl"}),
        ("POST", "/campaigns", {"name": "c", "sender": "", "template": "hello", "segment": "nl"}),
        ("POST", "/campaigns", {"name": "c", "sender": "a/b", "template": "hello", "segment": "nl"}),
        ("GET", "/campaigns/not-a-uuid", None),
        ("GET", "/campaigns/not-a-uuid/recipients", None),
        ("POST", "/campaigns/12345/start", None),
        ("GET", "/campaigns?status=gone", None),
        ("GET", "/campaigns/00000000-0000-4000-8000-000000000001/recipients?state=lost", None),
        ("POST", "/campaigns/00000000-0000-4000-8000-000000000001/schedule", {"at": "soon"}),
        ("POST", "/suppressions", {"email": "a@example.net", "reason": "Not A Word"}),
        ("POST", "/suppressions", {"email": "a@example.net", "detail": "d" * 501}),
        ("DELETE", "/suppressions/nope", None),
        ("GET", "/suppressions?reason=%00", None),
    ],
)
def test_bad_input_is_a_422_problem(acme: httpx.Client, method: str, path: str, body: Any) -> None:
    response = acme.request(method, path, json=body) if body is not None else acme.request(method, path)
    if path.startswith("/contacts/import"):
        response = acme.post(path, content=b"email\na@example.net\n", headers={"Content-Type": "text/csv"})
    problem(response, 422)


def test_ids_and_names_that_do_not_exist_are_404(acme: httpx.Client) -> None:
    cid = uuid.uuid4()
    for method, path in [
        ("GET", f"/campaigns/{cid}"),
        ("GET", f"/campaigns/{cid}/status"),
        ("GET", f"/campaigns/{cid}/recipients"),
        ("POST", f"/campaigns/{cid}/start"),
        ("POST", f"/campaigns/{cid}/cancel"),
        ("GET", "/segments/nope"),
        ("GET", "/templates/nope"),
        ("PATCH", "/templates/nope"),
        ("GET", "/contacts/nobody@example.net"),
        ("POST", "/contacts/nobody@example.net/reactivate"),
    ]:
        body = {"subject": "s"} if method == "PATCH" else {"reason": "r"} if "reactivate" in path else None
        problem(acme.request(method, path, json=body), 404)


# -- the request id --------------------------------------------------------------------------------


def test_the_events_a_request_appends_carry_its_request_id(acme: httpx.Client, acme_api: Tenant) -> None:
    catalog(acme, acme_api)
    store: Any = acme_api.store
    created = acme.post(
        "/campaigns",
        json={"name": "traced", "sender": "news", "template": "hello", "segment": "nl"},
        headers={"X-Request-Id": "req-create-1"},
    )
    cid = ok(created, 201)["id"]
    assert created.headers["x-request-id"] == "req-create-1"
    ok(acme.post(f"/campaigns/{cid}/start", headers={"X-Request-Id": "req-start-1"}), 202)
    history = store.read_stream(streams.campaign(cid))
    assert [(e.type, e.metadata.correlation_id) for e in history] == [
        ("CampaignCreated", "req-create-1"),
        ("CampaignStarted", "req-start-1"),
    ]
    assert all(e.metadata.actor and e.metadata.actor.startswith("api-key:") for e in history)
    job = ok(acme.get("/jobs", params={"campaign_id": cid}))["items"][0]
    job_events = store.read_stream(streams.job(job["id"]))
    assert [(e.type, e.metadata.correlation_id) for e in job_events] == [("JobCreated", "req-start-1")]

    ok(acme.patch("/contacts/p0@example.net", json={"attributes": {"x": 1}}, headers={"X-Request-Id": "req-patch-1"}))
    subject = ok(acme.get("/contacts/p0@example.net"))["subject"]
    assert store.read_stream(streams.contact(subject))[-1].metadata.correlation_id == "req-patch-1"
    report = acme.post(
        "/contacts/import",
        content=b"email\nnew@example.net\n",
        headers={"Content-Type": "text/csv", "X-Request-Id": "req-import-1"},
    )
    assert ok(report)["imported"] == 1
    with store.pool.connection() as conn:
        (metadata,) = conn.execute(
            "SELECT metadata FROM events WHERE type = 'ContactsImported' ORDER BY recorded_at DESC LIMIT 1"
        ).fetchone()
    assert metadata["correlation_id"] == "req-import-1"


def test_an_import_repeated_with_its_idempotency_key_imports_once(acme: httpx.Client) -> None:
    headers = {"Content-Type": "text/csv", "Idempotency-Key": "import-1"}
    first = ok(acme.post("/contacts/import", content=b"email\nann@example.net\n", headers=headers))
    again = acme.post("/contacts/import", content=b"email\nann@example.net\n", headers=headers)
    assert ok(again) == first and again.headers["idempotent-replayed"] == "true"
    problem(acme.post("/contacts/import", content=b"email\nbob@example.net\n", headers=headers), 422)
