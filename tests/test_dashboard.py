"""The dashboard over real HTTP and WebSocket (uvicorn in a thread, real PostgreSQL and Redis):
sessions required, one tenant's numbers and live deltas never reach another, cross-site sockets
refused, a logout closes the socket, user data cannot break out of the page's JSON."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime

import httpx
import orjson
import pytest
import redis
import websockets

from mailflow.events.envelope import Envelope, Metadata
from mailflow.infra.services import connect, pool_conninfo
from mailflow.infra.tenancy import Scope
from mailflow.projectors.facts import Facts
from mailflow.tenants import users
from mailflow.web import dashboard as web_dashboard

from .api_fixtures import make_tenant
from .history import recorded

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.api_fixtures"]

PASSWORD = "correct horse battery"


def browser(api, tenant: str, email: str) -> httpx.Client:
    """A logged-in browser of `tenant` (its cookies in the client)."""
    client = httpx.Client(base_url=api.url, timeout=30)
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    done = client.post("/login", data={"csrf": csrf, "workspace": tenant, "email": email, "password": PASSWORD})
    assert done.status_code == 303, done.text
    return client


@pytest.fixture
def two(api):
    acme, rival = make_tenant(api, "acme"), make_tenant(api, "rival")
    users.add(acme.store, "ops@acme.example", PASSWORD, "owner")
    users.add(rival.store, "ops@rival.example", PASSWORD, "owner")
    return acme, rival


def some_facts(api, tenant: str, campaign_name: str | None = None) -> None:
    job = str(uuid.uuid4())
    campaign = str(uuid.uuid4())
    if campaign_name:
        with connect(api.rt.settings.database_url) as db:
            db.execute(
                "INSERT INTO campaigns (id, tenant, name, sender, template, segment) VALUES (%s, %s, %s, 's', 't', 'g')",
                (campaign, tenant, campaign_name),
            )
    created = {"job_id": job, "idempotency_key": job, "priority": "high", "subject": "s", "sealed": "x"}
    created |= {"sender": "news", "template": "t", "domain": "example.org", "campaign_id": campaign}
    now, md = datetime.now(UTC), Metadata(tenant=tenant)
    events = [
        Envelope(uuid.uuid4(), 1, "j", 1, "JobCreated", 2, created, md, now),
        Envelope(uuid.uuid4(), 2, "j", 2, "JobStarted", 1, {"job_id": job, "attempt": 1}, md, now),
        Envelope(uuid.uuid4(), 3, "j", 3, "JobCompleted", 1, {"job_id": job, "attempt": 1, "code": 250}, md, now),
    ]
    with connect(pool_conninfo(api.rt.store.pool), scope=Scope.operator()) as conn, conn.transaction():
        Facts().apply(conn, recorded(api.rt.store, events))


def snapshot_of(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="snapshot">(.*?)</script>', html, re.S)
    assert found, "no snapshot in the page"
    return json.loads(found.group(1))


def test_the_page_and_its_data_need_a_session_and_show_only_the_tenant_s_numbers(api, two):
    some_facts(api, "acme", campaign_name="</script><script>alert(1)</script>")
    anonymous = httpx.Client(base_url=api.url, timeout=30)
    assert anonymous.get("/dashboard").headers["location"] == "/login?next=/dashboard"
    assert anonymous.get("/dashboard/data").status_code == 401
    acme = browser(api, "acme", "ops@acme.example")
    page = acme.get("/dashboard")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    snap = snapshot_of(page.text)  # the campaign's name did not end the script element
    assert snap["tenant"] == "acme" and snap["counters"]["delivered"] == 1 and snap["counters"]["sent"] == 1
    assert snap["breakdowns"]["campaign"][0]["label"] == "</script><script>alert(1)</script>"
    assert "<script>alert(1)" not in page.text
    rival = browser(api, "rival", "ops@rival.example")
    theirs = rival.get("/dashboard/data", params={"by": "day", "range": "7d"}).json()
    assert (
        theirs["tenant"] == "rival" and theirs["counters"]["delivered"] == 0 and theirs["breakdowns"]["campaign"] == []
    )
    assert rival.get("/static/dashboard.js").status_code == 200
    assert rival.get("/static/uplot/LICENSE").status_code == 200


def ws_url(api) -> str:
    return api.url.replace("http://", "ws://") + "/dashboard/live"


def cookie_header(client: httpx.Client) -> str:
    return "; ".join(f"{k}={v}" for k, v in client.cookies.items())


async def next_of(ws, kind: str, within_s: float = 5.0) -> dict:
    async def find():
        while True:
            m = json.loads(await ws.recv())
            if m["type"] == kind:
                return m

    return await asyncio.wait_for(find(), within_s)


def test_live_deltas_reach_only_the_tenant_s_sockets_and_a_logout_closes_them(api, two, monkeypatch):
    monkeypatch.setattr(web_dashboard, "SESSION_CHECK_S", 0.5)
    acme, rival = browser(api, "acme", "ops@acme.example"), browser(api, "rival", "ops@rival.example")
    publisher = redis.Redis.from_url(api.rt.settings.redis_url)
    channel = f"{api.rt.settings.redis_prefix}:metrics"

    async def scenario():
        origin = {"Origin": api.url}
        async with (
            websockets.connect(ws_url(api), additional_headers={"Cookie": cookie_header(acme), **origin}) as mine,
            websockets.connect(ws_url(api), additional_headers={"Cookie": cookie_header(rival), **origin}) as theirs,
        ):
            for ws in (mine, theirs):
                await ws.send(json.dumps({"type": "subscribe", "by": "hour", "range": "24h"}))
                assert (await next_of(ws, "snapshot"))["type"] == "snapshot"
            await asyncio.sleep(0.3)  # both subscribed on the hub
            message = {"tenant": "acme", "at_ms": 1, "position": 9, "counters": {"delivered": 2}}
            publisher.publish(channel, orjson.dumps(message))
            delta = await next_of(mine, "delta")
            assert delta["counters"] == {"delivered": 2}
            with pytest.raises(TimeoutError):
                await next_of(theirs, "delta", within_s=1.5)  # rival hears nothing of acme's
            # Logging out in the browser ends the socket of that session, with the code that stops reconnects.
            page = acme.get("/account")
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
            assert acme.post("/logout", data={"csrf": csrf}).status_code == 303
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await next_of(mine, "never", within_s=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == web_dashboard.SIGNED_OUT

    try:
        asyncio.run(scenario())
    finally:
        publisher.close()


def test_a_socket_from_another_site_or_without_a_session_is_refused(api, two):
    acme = browser(api, "acme", "ops@acme.example")

    async def scenario():
        evil = {"Cookie": cookie_header(acme), "Origin": "https://evil.example"}
        with pytest.raises(websockets.InvalidStatus):  # closed before the handshake: 403
            async with websockets.connect(ws_url(api), additional_headers=evil) as ws:
                await ws.recv()
        async with websockets.connect(ws_url(api), additional_headers={"Origin": api.url}) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == web_dashboard.SIGNED_OUT

    asyncio.run(scenario())


def test_a_snapshot_s_reads_share_one_database_snapshot(api, two, monkeypatch):
    """The counters, charts and breakdowns of one snapshot are read in one read-only REPEATABLE
    READ transaction: a fact committed between two of its reads is in all of them or none."""
    seen = []
    real = web_dashboard.dashboard.snapshot

    def spy(conn, *args, **kwargs):
        seen.append(
            conn.execute(
                "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')"
            ).fetchone()
        )
        return real(conn, *args, **kwargs)

    monkeypatch.setattr(web_dashboard.dashboard, "snapshot", spy)
    acme = browser(api, "acme", "ops@acme.example")
    assert acme.get("/dashboard/data").status_code == 200
    assert seen == [("repeatable read", "on")]
