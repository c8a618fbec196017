"""The API's pure decisions: whether a key is good (tenants/keys.judge), which address is the
client's behind proxies, cursors, idempotency digests, problem bodies."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from mailflow.api import idempotency, pagination
from mailflow.api.middleware import TrustedProxies
from mailflow.errors import AuthenticationError, UserError
from mailflow.tenants import keys

pytestmark = pytest.mark.pure

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _row(token: str, **over):
    row = {
        "tenant": "acme",
        "id": keys.parse(token),
        "scopes": ["contacts:read"],
        "networks": [],
        "expires_at": None,
        "revoked_at": None,
        "hash": hashlib.sha256(token.encode()).digest(),
    }
    row.update(over)
    return row


def test_a_new_key_is_recognisable_and_parses_back_to_its_id():
    key_id, token = keys.new_key()
    assert token.startswith("mf_live_")
    assert keys.parse(token) == key_id
    assert len(token) == len("mf_live_") + keys.ID_LENGTH + 1 + keys.SECRET_LENGTH
    assert keys.new_key()[1] != token


@pytest.mark.parametrize(
    "junk", ["", "mf_live_", "Bearer x", "mf_live_ABCDEFGHIJKL_" + "a" * 40, "mf_test_" + "a" * 53]
)
def test_something_that_is_not_a_key_has_no_id(junk):
    assert keys.parse(junk) is None


def test_a_good_key_gives_its_tenant_and_scopes():
    _, token = keys.new_key()
    p = keys.judge(_row(token), token, "203.0.113.9", NOW)
    assert (p.tenant, p.key_id, p.scopes) == ("acme", keys.parse(token), frozenset({"contacts:read"}))
    assert p.allows("contacts:read") and not p.allows("contacts:write")


def test_admin_allows_every_scope():
    _, token = keys.new_key()
    p = keys.judge(_row(token, scopes=["admin"]), token, None, NOW)
    assert all(p.allows(s) for s in keys.SCOPES)


def test_a_wrong_secret_and_an_unknown_id_are_refused_alike():
    _, token = keys.new_key()
    other = token[:-1] + ("a" if token[-1] != "a" else "b")
    with pytest.raises(AuthenticationError) as wrong:
        keys.judge(_row(token), other, None, NOW)
    with pytest.raises(AuthenticationError) as unknown:
        keys.judge(None, token, None, NOW)
    assert str(wrong.value) == str(unknown.value)


def test_the_comparison_runs_even_when_no_row_exists(monkeypatch):
    calls = []
    real = keys.hmac.compare_digest
    monkeypatch.setattr(keys.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    _, token = keys.new_key()
    for row in (None, _row(token)):
        try:
            keys.judge(row, token + "x" if row else token, None, NOW)
        except AuthenticationError:
            pass
    assert calls == [1, 1]


def test_revoked_and_expired_keys_are_refused():
    _, token = keys.new_key()
    with pytest.raises(AuthenticationError, match="revoked"):
        keys.judge(_row(token, revoked_at=NOW - timedelta(seconds=1)), token, None, NOW)
    with pytest.raises(AuthenticationError, match="expired"):
        keys.judge(_row(token, expires_at=NOW), token, None, NOW)
    assert keys.judge(_row(token, expires_at=NOW + timedelta(seconds=1)), token, None, NOW)


def test_a_key_bound_to_networks_is_refused_elsewhere():
    _, token = keys.new_key()
    row = _row(token, networks=["10.0.0.0/8", "2001:db8::/32"])
    assert keys.judge(row, token, "10.1.2.3", NOW)
    assert keys.judge(row, token, "2001:db8::1", NOW)
    for client in ("192.0.2.1", None):
        with pytest.raises(AuthenticationError, match="address"):
            keys.judge(row, token, client, NOW)


def test_scopes_and_networks_are_checked():
    assert keys.check_scopes(["messages:send", " admin", "admin"]) == ["admin", "messages:send"]
    with pytest.raises(UserError, match="unknown scope 'mail:send'"):
        keys.check_scopes(["mail:send"])
    with pytest.raises(UserError, match="at least one"):
        keys.check_scopes([""])
    assert keys.check_networks(["10.1.2.3/8", "::1"]) == ["10.0.0.0/8", "::1/128"]
    with pytest.raises(UserError, match="not a network"):
        keys.check_networks(["10.0.0.0/33"])


def test_forwarding_headers_are_believed_only_from_trusted_proxies():
    proxies = TrustedProxies(["10.0.0.0/8"])
    cf = {b"cf-connecting-ip": b"198.51.100.7"}
    xff = {b"x-forwarded-for": b"203.0.113.1, 198.51.100.7, 10.0.0.2"}
    assert proxies.client("192.0.2.5", cf) == "192.0.2.5"  # not a proxy: its claim is ignored
    assert proxies.client("10.0.0.1", cf) == "198.51.100.7"
    assert proxies.client("10.0.0.1", xff) == "198.51.100.7"  # the right-most hop not a proxy
    assert proxies.client("10.0.0.1", {b"x-forwarded-for": b"not-an-ip"}) == "10.0.0.1"
    assert proxies.client("10.0.0.1", {}) == "10.0.0.1"
    assert TrustedProxies([]).client("10.0.0.1", cf) == "10.0.0.1"


def test_a_cursor_round_trips_and_a_forged_one_is_a_user_error():
    cursor = pagination.encode(["2026-12-02T12:00:00+00:00", "abc"])
    assert pagination.decode(cursor, 2) == ["2026-12-02T12:00:00+00:00", "abc"]
    assert pagination.decode(None, 2) is None
    for bad in ("!!!", pagination.encode(["a"]), pagination.encode([{"x": 1}, 2]), "bm90IGpzb24"):
        with pytest.raises(UserError, match="cursor"):
            pagination.decode(bad, 2)


def test_page_cuts_at_the_limit_and_gives_a_cursor_only_when_more_exist():
    rows = [{"k": i} for i in range(4)]
    items, cursor = pagination.page(rows, 3, lambda r: [r["k"]])
    assert [r["k"] for r in items] == [0, 1, 2]
    assert pagination.decode(cursor, 1) == [2]
    assert pagination.page(rows[:3], 3, lambda r: [r["k"]]) == (rows[:3], None)


def test_the_idempotency_digest_covers_method_path_and_body():
    base = idempotency.body_hash("POST", "/api/v1/messages", b'{"to":"a@b.c"}')
    assert base == idempotency.body_hash("POST", "/api/v1/messages", b'{"to":"a@b.c"}')
    assert base != idempotency.body_hash("POST", "/api/v1/messages", b'{"to":"x@b.c"}')
    assert base != idempotency.body_hash("POST", "/api/v1/keys", b'{"to":"a@b.c"}')


def test_docs_openapi_json_is_what_the_code_generates():
    from pathlib import Path

    from mailflow.api.app import openapi_bytes

    committed = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
    assert committed.read_bytes() == openapi_bytes(), "docs/openapi.json is stale: run scripts/write-contracts"
