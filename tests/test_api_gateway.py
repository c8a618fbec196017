"""The gateway over real HTTP: keys (401, revocation at once, expiry, networks), scopes (403),
rate limits (429 + Retry-After), Idempotency-Key, X-Request-Id as correlation id, body limits,
problem+json for every error."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from mailflow.api.auth import Gate
from mailflow.runtime.wiring import Runtime
from mailflow.tenants import keys

from .api_fixtures import make_tenant, serve_in_thread

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def _problem(r, status):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["title"] and body["request_id"] == r.headers["x-request-id"]
    return body


def test_no_key_or_a_bad_key_is_401_problem_json(api, acme_api):
    with api.client() as c:
        body = _problem(c.get("/keys"), 401)
        assert "Bearer" in body["detail"]
    for bad in ("nonsense", "mf_live_aaaaaaaaaaaa_" + "a" * 40, acme_api.key[:-1] + "x"):
        with api.client(bad) as c:
            r = c.get("/keys")
            _problem(r, 401)
            assert r.headers["www-authenticate"].startswith("Bearer")


def test_a_key_without_the_scope_is_403_and_with_it_2xx(api, acme_api):
    reader = acme_api.key_with("messages:read")
    with api.client(reader) as c:
        assert "admin" in _problem(c.get("/keys"), 403)["detail"]
        assert c.get("/jobs").status_code == 403  # campaigns:read
    with api.client(acme_api.key_with("campaigns:read")) as c:
        assert c.get("/jobs").status_code == 200


def test_revocation_takes_effect_at_the_next_request(api, acme_api):
    victim = acme_api.key_with("campaigns:read")
    with api.client(victim) as c:
        assert c.get("/jobs").status_code == 200
    with api.client(acme_api.key) as admin:
        r = admin.delete(f"/keys/{keys.parse(victim)}")
        assert r.status_code == 200 and r.json()["revoked"] is True
        assert admin.delete(f"/keys/{keys.parse(victim)}").json()["revoked"] is False
    with api.client(victim) as c:
        assert "revoked" in _problem(c.get("/jobs"), 401)["detail"]


def test_an_expired_key_is_refused(api, acme_api):
    _, token = keys.create(
        acme_api.store, "short", ["campaigns:read"], expires_at=datetime.now(UTC) + timedelta(seconds=1)
    )
    with api.client(token) as c:
        assert c.get("/jobs").status_code == 200
        time.sleep(1.1)
        assert "expired" in _problem(c.get("/jobs"), 401)["detail"]


def test_a_new_key_is_shown_once_and_stored_only_as_a_hash(api, acme_api, db):
    with api.client(acme_api.key) as c:
        r = c.post("/keys", json={"name": "ci", "scopes": ["messages:send"]})
        assert r.status_code == 201, r.text
        token = r.json()["key"]
        listed = c.get("/keys").json()
    assert keys.parse(token) == r.json()["id"]
    assert all("key" not in k for k in listed)
    assert token not in str(listed)
    logged = db.execute("SELECT data::text, metadata::text FROM events").fetchall()
    assert not any(token in d or token.split("_")[-1] in d for row in logged for d in row)
    stored = db.execute("SELECT hash FROM api_key_hashes WHERE id = %s", (keys.parse(token),)).fetchone()[0]
    assert bytes(stored) == keys.digest(token)


def test_another_tenants_key_is_not_found(api, acme_api, rival_api):
    with api.client(rival_api.key) as c:
        _problem(c.delete(f"/keys/{keys.parse(acme_api.key)}"), 404)
        assert keys.parse(acme_api.key) not in str(c.get("/keys").json())


def test_last_use_is_recorded_and_uses_and_failures_are_counted(api, acme_api):
    with api.client(acme_api.key) as c:
        for _ in range(3):
            assert c.get("/jobs").status_code == 200
        listed = {k["id"]: k for k in c.get("/keys").json()}
    assert listed[keys.parse(acme_api.key)]["last_used_at"] is not None
    with api.client(acme_api.key[:-1] + "x") as c:
        c.get("/jobs")
    usage = Gate(api.rt.store, api.rt.redis, api.rt.keys, api.rt.settings, api.rt.vault).usage()
    assert usage["uses"][keys.parse(acme_api.key)] >= 4
    assert usage["auth_failures"][keys.parse(acme_api.key)] == 1


def test_the_request_id_is_echoed_and_is_the_correlation_id_of_the_events_it_appends(api, acme_api, db):
    with api.client(acme_api.key, **{"X-Request-Id": "trace-42.abc"}) as c:
        r = c.post("/keys", json={"name": "traced", "scopes": ["admin"]})
    assert r.status_code == 201 and r.headers["x-request-id"] == "trace-42.abc"
    md = db.execute("SELECT metadata FROM events WHERE type = 'ApiKeyCreated' AND data->>'name' = 'traced'").fetchone()[
        0
    ]
    assert md["correlation_id"] == "trace-42.abc"
    assert md["actor"] == f"api-key:{keys.parse(acme_api.key)}"
    with api.client(acme_api.key, **{"X-Request-Id": "bad id with spaces"}) as c:
        generated = c.get("/jobs").headers["x-request-id"]
    assert generated.startswith("req_")


def test_a_repeat_with_the_idempotency_key_returns_the_first_response(api, acme_api, db):
    body = {"name": "once", "scopes": ["campaigns:read"]}
    with api.client(acme_api.key, **{"Idempotency-Key": "create-once"}) as c:
        first = c.post("/keys", json=body)
        second = c.post("/keys", json=body)
        changed = c.post("/keys", json={**body, "name": "twice"})
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert second.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert _problem(changed, 422)["type"].endswith("idempotency-mismatch")
    assert db.execute("SELECT count(*) FROM api_keys WHERE name = 'once'").fetchone()[0] == 1
    # the same key in another tenant is another request
    with api.client(make_tenant(api, "other").key, **{"Idempotency-Key": "create-once"}) as c:
        assert c.post("/keys", json=body).status_code == 201
    assert db.execute("SELECT count(*) FROM api_keys WHERE name = 'once'").fetchone()[0] == 2


def test_copies_sent_at_once_act_once(api, acme_api, db):
    body = {"name": "raced", "scopes": ["campaigns:read"]}
    answers: list[int] = []
    start = threading.Barrier(6)

    def send():
        with api.client(acme_api.key, **{"Idempotency-Key": "race-1"}) as c:
            start.wait()
            answers.append(c.post("/keys", json=body).status_code)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(answers) <= {201, 409} and 201 in answers
    assert db.execute("SELECT count(*) FROM api_keys WHERE name = 'raced'").fetchone()[0] == 1


def test_a_request_that_failed_frees_its_idempotency_key(api, acme_api):
    with api.client(acme_api.key, **{"Idempotency-Key": "retry-me"}) as c:
        assert c.post("/keys", json={"name": "x", "scopes": ["nope"]}).status_code == 422
        assert c.post("/keys", json={"name": "x", "scopes": ["nope"]}).status_code == 422  # acted again, not 409
        fixed = c.post("/keys", json={"name": "x", "scopes": ["admin"]})  # a corrected body may use the key
        assert fixed.status_code == 201
        assert c.post("/keys", json={"name": "x", "scopes": ["admin"]}).json() == fixed.json()
    with api.client(acme_api.key, **{"Idempotency-Key": "a" * 256}) as c:
        _problem(c.post("/keys", json={"name": "x", "scopes": ["admin"]}), 422)


def test_validation_errors_name_the_fields(api, acme_api):
    with api.client(acme_api.key) as c:
        body = _problem(c.post("/keys", json={"scopes": "admin", "extra": 1}), 422)
        fields = {e["field"] for e in body["errors"]}
        assert {"name", "scopes", "extra"} <= fields
        _problem(c.get("/jobs/not-a-uuid"), 422)
        _problem(c.get("/jobs", params={"limit": 0}), 422)
        _problem(c.get("/jobs", params={"cursor": "forged"}), 422)
        _problem(c.get("/nowhere"), 404)
        _problem(c.put("/keys"), 405)


def test_security_headers_are_on_every_answer(api, acme_api):
    with api.client(acme_api.key) as c:
        for r in (c.get("/jobs"), c.get("/nowhere"), c.get("/openapi.json")):
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["x-frame-options"] == "DENY"
            assert "default-src 'none'" in r.headers["content-security-policy"]
        assert "access-control-allow-origin" not in c.get("/jobs", headers={"Origin": "https://evil.test"}).headers


def test_docs_are_served_from_the_package(api):
    with api.client() as c:
        page = c.get("/docs")
        assert page.status_code == 200 and "/api/v1/static/swagger-ui/swagger-ui-bundle.js" in page.text
        assert "cdn" not in page.text.lower()
        js = c.get("/static/swagger-ui/swagger-ui-bundle.js")
        assert js.status_code == 200 and len(js.content) > 100_000
        assert c.get("/openapi.json").json()["openapi"].startswith("3.1")


@pytest.fixture
def strict_api(settings):
    rt = Runtime(
        settings.model_copy(
            update={
                "api_rate_per_key": 2.0,
                "api_burst_per_key": 5,
                "api_rate_per_tenant": 1000.0,
                "api_max_body_bytes": 2048,
                "api_trusted_proxies": ["127.0.0.1/32"],
            }
        ),
        pool_size=6,
        operator=True,
    )
    try:
        yield from serve_in_thread(rt)
    finally:
        rt.close()


def test_a_key_over_its_rate_gets_429_with_retry_after_and_others_do_not(strict_api):
    acme, rival = make_tenant(strict_api, "acme"), make_tenant(strict_api, "rival")
    with strict_api.client(acme.key) as c:
        codes = [c.get("/jobs").status_code for _ in range(12)]
        limited = c.get("/jobs")
    assert codes[:5] == [200] * 5 and 429 in codes
    body = _problem(limited, 429)
    assert int(limited.headers["retry-after"]) >= 1 and "acme" in body["detail"]
    with strict_api.client(rival.key) as c:
        assert c.get("/jobs").status_code == 200
    time.sleep(1.1)
    with strict_api.client(acme.key) as c:
        assert c.get("/jobs").status_code == 200  # the bucket refills


def test_a_body_over_the_limit_is_413(strict_api):
    acme = make_tenant(strict_api, "acme")
    with strict_api.client(acme.key) as c:
        r = c.post("/keys", content=b'{"name": "' + b"x" * 4096 + b'"}', headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.headers["content-type"] == PROBLEM

        def chunks():
            for _ in range(5):
                yield b"x" * 1024

        assert c.post("/keys", content=chunks(), headers={"Content-Type": "application/json"}).status_code == 413


def test_the_client_address_comes_from_trusted_proxies_only(strict_api, api):
    acme = make_tenant(strict_api, "acme")
    _, bound = keys.create(acme.store, "office", ["campaigns:read"], networks=["198.51.100.0/24"])
    with strict_api.client(bound) as c:
        assert c.get("/jobs").status_code == 401
        assert c.get("/jobs", headers={"X-Forwarded-For": "198.51.100.7"}).status_code == 200
        assert c.get("/jobs", headers={"CF-Connecting-IP": "198.51.100.8"}).status_code == 200
    # The same key through a server that trusts no proxy: the header is not believed.
    with api.client(bound) as c:
        assert c.get("/jobs", headers={"X-Forwarded-For": "198.51.100.7"}).status_code == 401


def test_a_key_cannot_revoke_itself(api, acme_api):
    with api.client(acme_api.key) as c:
        assert "itself" in _problem(c.delete(f"/keys/{keys.parse(acme_api.key)}"), 409)["detail"]
        assert c.get("/keys").status_code == 200


def test_idempotency_keys_are_forgotten_after_their_hours(api, acme_api, db):
    with api.client(acme_api.key, **{"Idempotency-Key": "old-one"}) as c:
        assert c.post("/keys", json={"name": "old", "scopes": ["admin"]}).status_code == 201
    db.execute("UPDATE api_idempotency SET created_at = now() - interval '25 hours' WHERE key = 'old-one'")
    gate = Gate(api.rt.store, api.rt.redis, api.rt.keys, api.rt.settings, api.rt.vault)
    gate.forgetting.maybe()
    assert db.execute("SELECT count(*) FROM api_idempotency WHERE key = 'old-one'").fetchone()[0] == 0
    gate.forgetting.maybe()  # at most once an hour: nothing to do, and no query either
