"""API room: what every request goes through before its operation - a request id, the client's
address, a body size limit, security headers, and the request id as the correlation id of
every event the request appends (events/envelope.acting) and in every log line.

One plain ASGI middleware rather than several: each layer of Starlette's BaseHTTPMiddleware
costs a task and a copy of the body per request.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Iterable

import orjson
import structlog
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailflow.events.envelope import acting

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]
# The interactive docs load their own script and styles (served by mailflow, no CDN).
DOCS_CSP = b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"


class TrustedProxies:
    """Which peers' forwarding headers are believed: MAILFLOW_API_TRUSTED_PROXIES."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip()]

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in self.networks)

    def client(self, peer: str | None, headers: dict[bytes, bytes]) -> str | None:
        """The client's address: the peer's, unless the peer is a trusted proxy; then
        CF-Connecting-IP, else the right-most X-Forwarded-For hop that is not a trusted proxy."""
        if peer is None or not self.networks or not self.trusts(peer):
            return peer
        cf = headers.get(b"cf-connecting-ip")
        if cf:
            candidate = cf.decode("latin-1").strip()
            if _is_ip(candidate):
                return candidate
        forwarded = headers.get(b"x-forwarded-for")
        if forwarded:
            for hop in reversed([h.strip() for h in forwarded.decode("latin-1").split(",")]):
                if not _is_ip(hop):
                    break
                if not self.trusts(hop):
                    return hop
        return peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _too_large(limit: int, request_id: str) -> list[Message]:
    body = orjson.dumps(
        {
            "type": "https://mailflow.dev/problems/too-large",
            "title": "Content Too Large",
            "status": 413,
            "detail": f"the request body is larger than {limit} bytes",
            "request_id": request_id,
        }
    )
    return [
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode()),
                *SECURITY_HEADERS,
            ],
        },
        {"type": "http.response.body", "body": body},
    ]


class BodyTooLarge(HTTPException):
    """Raised while the body is read: an HTTPException, so FastAPI's body parsing lets it
    through to the problem+json handler instead of calling it a parse error (400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class RequestContext:
    def __init__(
        self,
        app: ASGIApp,
        *,
        proxies: TrustedProxies,
        max_body: int,
        large_bodies: dict[str, int] | None = None,
        docs_paths: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.proxies = proxies
        self.max_body = max_body
        self.large_bodies = large_bodies or {}
        self.docs_paths = docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else f"req_{uuid.uuid4().hex}"
        peer = scope["client"][0] if scope.get("client") else None
        client = self.proxies.client(peer, headers)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_ip"] = client
        path = scope.get("path", "")
        limit = next((n for p, n in self.large_bodies.items() if path.endswith(p)), self.max_body)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            for message in _too_large(limit, request_id):
                await send(message)
            return
        is_docs = path.endswith(self.docs_paths) if self.docs_paths else False
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def decorated_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra: list[tuple[bytes, bytes]] = [(b"x-request-id", request_id.encode())]
                for name, value in SECURITY_HEADERS:
                    if is_docs and name == b"content-security-policy":
                        value = DOCS_CSP
                    extra.append((name, value))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        with (
            structlog.contextvars.bound_contextvars(request_id=request_id),
            acting(correlation_id=request_id),
        ):
            try:
                await self.app(scope, counting_receive, decorated_send)
            except BodyTooLarge:
                if not started:
                    for message in _too_large(limit, request_id):
                        await send(message)
