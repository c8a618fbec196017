"""The API's key cache over real HTTP and a real PostgreSQL: a verified key is answered without a
database round trip, yet a key revoked, erased or re-hashed by any process - the CLI, SQL by
hand - is refused at once, and while the cache cannot hear PostgreSQL it is not used at all."""

from __future__ import annotations

import time

import psycopg
import pytest

from mailflow.api.keycache import CHANNEL
from mailflow.tenants import keys

from .api_fixtures import ApiServer, Tenant

pytestmark = pytest.mark.integration


def _wait(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _listener_pids(db: psycopg.Connection) -> list[int]:
    rows = db.execute(
        "SELECT pid FROM pg_stat_activity WHERE query = %s AND pid <> pg_backend_pid()", (f"LISTEN {CHANNEL}",)
    ).fetchall()
    return [r[0] for r in rows]


def test_a_verified_key_is_answered_from_the_cache(api: ApiServer, acme_api: Tenant):
    _wait(lambda: api.gate.cache.listening)
    token = acme_api.key_with("campaigns:read")
    with api.client(token) as c:
        assert c.get("/jobs").status_code == 200
        assert api.gate.cache.get(keys.digest(token)) is not None
        before = api.gate.lookups
        for _ in range(20):
            assert c.get("/jobs").status_code == 200
        assert api.gate.lookups == before  # no key was read from PostgreSQL


def test_a_key_revoked_by_another_process_is_refused_at_once(api: ApiServer, acme_api: Tenant):
    _wait(lambda: api.gate.cache.listening)
    victim = acme_api.key_with("campaigns:read")
    with api.client(victim) as c:
        assert c.get("/jobs").status_code == 200
        assert api.gate.cache.get(keys.digest(victim)) is not None
        keys.revoke(acme_api.store, keys.parse(victim))  # as `mailflow keys revoke` does, elsewhere
        # the NOTIFY is delivered at commit; the listening thread drops the row within milliseconds
        _wait(lambda: api.gate.cache.get(keys.digest(victim)) is None, seconds=1.0)
        r = c.get("/jobs")
        assert r.status_code == 401 and "revoked" in r.json()["detail"]


@pytest.mark.parametrize(
    "change",
    [
        "DELETE FROM api_keys WHERE id = %(id)s",
        "UPDATE api_keys SET scopes = '{contacts:read}' WHERE id = %(id)s",
        "UPDATE api_key_hashes SET hash = sha256('another'::bytea) WHERE id = %(id)s",
        "TRUNCATE api_keys, api_key_hashes",
    ],
    ids=["deleted", "scopes", "rehashed", "truncated"],
)
def test_any_change_to_a_key_row_drops_it_from_the_cache(api: ApiServer, acme_api: Tenant, db, change):
    _wait(lambda: api.gate.cache.listening)
    token = acme_api.key_with("campaigns:read")
    with api.client(token) as c:
        assert c.get("/jobs").status_code == 200
        assert api.gate.cache.get(keys.digest(token)) is not None
        db.execute(change, {"id": keys.parse(token)})
        _wait(lambda: api.gate.cache.get(keys.digest(token)) is None, seconds=1.0)
        assert c.get("/jobs").status_code in (401, 403)


def test_using_a_key_does_not_drop_it(api: ApiServer, acme_api: Tenant, db):
    _wait(lambda: api.gate.cache.listening)
    token = acme_api.key_with("campaigns:read")
    with api.client(token) as c:
        assert c.get("/jobs").status_code == 200
    db.execute("UPDATE api_keys SET last_used_at = now() WHERE id = %s", (keys.parse(token),))
    time.sleep(0.2)
    assert api.gate.cache.get(keys.digest(token)) is not None


def test_a_wrong_secret_for_a_cached_key_is_looked_up_and_refused(api: ApiServer, acme_api: Tenant):
    _wait(lambda: api.gate.cache.listening)
    token = acme_api.key_with("campaigns:read")
    with api.client(token) as c:
        assert c.get("/jobs").status_code == 200
    before = api.gate.lookups
    with api.client(token[:-1] + ("x" if token[-1] != "x" else "y")) as c:
        r = c.get("/jobs")
    assert r.status_code == 401 and "not valid" in r.json()["detail"]
    assert api.gate.lookups > before  # read from PostgreSQL like an unknown id, not judged from the cache


def test_while_the_cache_cannot_hear_postgresql_every_key_is_read(api: ApiServer, acme_api: Tenant, db):
    _wait(lambda: api.gate.cache.listening)
    victim = acme_api.key_with("campaigns:read")
    with api.client(victim) as c:
        assert c.get("/jobs").status_code == 200
    for _ in range(3):  # the listener's connection killed, again and again
        pids = _listener_pids(db)
        assert pids
        for pid in pids:
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        _wait(lambda: not api.gate.cache.listening, seconds=3.0)
        assert api.gate.cache.get(keys.digest(victim)) is None
        _wait(lambda: api.gate.cache.listening)
    # A revocation while nobody listened is not missed: the cache was emptied when listening resumed.
    with api.client(victim) as c:
        assert c.get("/jobs").status_code == 200
        keys.revoke(acme_api.store, keys.parse(victim))
        _wait(lambda: api.gate.cache.get(keys.digest(victim)) is None, seconds=1.0)
        assert c.get("/jobs").status_code == 401


def test_a_row_read_before_a_change_is_not_kept(api: ApiServer, acme_api: Tenant):
    _wait(lambda: api.gate.cache.listening)
    cache = api.gate.cache
    token = acme_api.key_with("campaigns:read")
    with api.rt.store.pool.connection() as conn:
        version = cache.version()
        row = keys.row_for(conn, token)
    keys.revoke(acme_api.store, keys.parse(token))  # heard while the row was on its way
    _wait(lambda: cache.version() != version, seconds=1.0)
    cache.put(keys.digest(token), row, version)
    assert cache.get(keys.digest(token)) is None
