"""`mailflow demo`, the HTTP API part: a key with narrow scopes, the transactional messages sent
over `POST /api/v1/messages` to the `mailflow web` child (one repeated with its Idempotency-Key,
which sends nothing more), each message's events carrying its request id, and the sender's
domain added as a sending domain whose records are published on a DNS server of the demo's
own on loopback, then verified with real lookups."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from mailflow.outbound import domains
from mailflow.runtime import queries as rq
from mailflow.runtime.wiring import Runtime
from mailflow.tenants import keys
from mailflow.testing.dns import DnsServer

SCOPES = ("messages:send", "messages:read")


@dataclass
class DemoApi:
    """The demo's client of `mailflow web` (started by the supervisor on `port`)."""

    rt: Runtime
    port: int
    tag: str
    key_id: str = ""
    sent: int = 0
    request_ids: list[str] = field(default_factory=list)
    client: httpx.Client | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self, timeout_s: float = 30.0) -> None:
        """A key for the demo, then wait until the web child answers."""
        key, token = keys.create(self.rt.store, f"demo-{self.tag}", SCOPES)
        self.key_id = key.id
        self.client = httpx.Client(
            base_url=self.base + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mailflow web did not answer on {self.base} within {timeout_s:.0f} s")
            time.sleep(0.2)

    def send(self, body: dict[str, Any]) -> str:
        """POST one message (its own Idempotency-Key and request id); returns the job id."""
        assert self.client is not None
        n = self.sent
        request_id = f"demo-{self.tag}-{n}"
        answer = self.client.post(
            "/messages", json=body, headers={"Idempotency-Key": f"demo-{self.tag}-{n}", "X-Request-Id": request_id}
        )
        answer.raise_for_status()
        self.sent += 1
        self.request_ids.append(request_id)
        return str(answer.json()["job_id"])

    def summary(self, body: dict[str, Any], job_ids: list[str]) -> dict[str, Any]:
        """Repeat the first request as a client that lost the answer would, then what the log says."""
        assert self.client is not None
        first = job_ids[0] if job_ids else None
        repeat = self.client.post(
            "/messages", json=body, headers={"Idempotency-Key": f"demo-{self.tag}-0", "X-Request-Id": "demo-repeat"}
        )
        shown = self.client.get(f"/messages/{first}").json() if first else {}
        with self.rt.connect() as conn:
            traced = rq.one(conn, rq.DEMO_API_CORRELATED, {"job_ids": job_ids, "request_ids": self.request_ids})
        self.client.close()
        return {
            "url": self.base + "/api/v1",
            "docs": self.base + "/api/v1/docs",
            "key": self.key_id,
            "scopes": list(SCOPES),
            "sent": self.sent,
            "repeat_status": repeat.status_code,
            "repeat_replayed": repeat.headers.get("idempotent-replayed") == "true",
            "repeat_same_job": bool(first) and repeat.json().get("job_id") == first,
            "first_job_state": shown.get("job", {}).get("state"),
            "first_job_events": [e["type"] for e in shown.get("history", [])],
            "events": traced["events"],
            "events_with_request_id": traced["correlated"],
        }


def sending_domain(rt: Runtime, domain: str) -> dict[str, Any]:
    """Add `domain` as a sending domain, publish exactly the records mailflow asks for on a
    loopback DNS server, and verify them with real DNS questions."""
    settings = rt.settings
    added = domains.add(rt.store, rt.vault, domain, settings=settings, exist_ok=True)
    zone: dict[tuple[str, str], list[str]] = {}
    for r in added.records:
        zone.setdefault((r.name, r.type), []).append(r.value)
    with DnsServer(zone) as dns_server:
        check = domains.verify(rt.store, domain, domains.Resolver([dns_server.address], 2.0), settings=settings)
    return {
        "domain": added.domain,
        "records": [{"purpose": str(r.purpose), "type": r.type, "name": r.name} for r in added.records],
        "status": str(check.status),
        "checks": [{"purpose": str(c.purpose), "status": str(c.status)} for c in check.checks],
    }
