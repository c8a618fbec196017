"""Fixtures of the HTTP API tests: `mailflow web`'s app served by a real uvicorn on a loopback
port (in a thread of the test process), tenants with keys, and an httpx client per key."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from mailflow.api.auth import Gate
from mailflow.config import Settings
from mailflow.infra.net import listen
from mailflow.runtime.wiring import Runtime
from mailflow.tenants import keys, registry


@dataclass
class ApiServer:
    url: str
    rt: Runtime
    gate: Gate  # the served app's: its key cache

    def client(self, key: str | None = None, **headers: str) -> httpx.Client:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url + "/api/v1", headers={**auth, **headers}, timeout=30)


def serve_in_thread(rt: Runtime) -> Iterator[ApiServer]:
    from mailflow.web.app import create_app, server_config

    app = create_app(rt)
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.01)
    try:
        yield ApiServer(f"http://127.0.0.1:{port}", rt, app.state.gate)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    """The test settings, with rate limits out of the way (the rate-limit tests set their own)."""
    return settings.model_copy(update={"api_rate_per_key": 1e6, "api_rate_per_tenant": 1e6})


@pytest.fixture
def api(api_settings: Settings) -> Iterator[ApiServer]:
    rt = Runtime(api_settings, pool_size=10, operator=True)
    try:
        yield from serve_in_thread(rt)
    finally:
        rt.close()


@dataclass
class Tenant:
    id: str
    key: str  # admin
    store: object

    def key_with(self, *scopes: str) -> str:
        return keys.create(self.store, f"test {' '.join(scopes)}", scopes)[1]  # type: ignore[arg-type]


def make_tenant(api: ApiServer, tenant_id: str) -> Tenant:
    op = api.rt.store
    if tenant_id != "default":
        registry.create(op, tenant_id)
    scoped = op.for_tenant(tenant_id)
    return Tenant(tenant_id, keys.create(scoped, "admin", ["admin"])[1], scoped)


@pytest.fixture
def acme_api(api: ApiServer) -> Tenant:
    return make_tenant(api, "acme")


@pytest.fixture
def rival_api(api: ApiServer) -> Tenant:
    return make_tenant(api, "rival")
