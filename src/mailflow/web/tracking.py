"""Web room: the tracking URLs - the open pixel (`GET <path>/t/o/<token>`) and the click redirects (`GET <path>/t/c/<token>?u=<url>`).

The token says everything (mail/tracking.py: tenant, job, link, the message's link count, the
send time, the digest of the link's URL), so answering needs no database: the pixel is a GIF,
a click a 302 to exactly the URL the token was signed for and never to anything else (a
tampered token is 400, a URL or link index not signed for the message 404). Recording the
open or click (outbound/engagement.py) is waited for briefly, never longer: with PostgreSQL
down the person still gets their page, the miss is logged once per outage, and no IP address,
user agent or URL is ever logged.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from mailflow.api.middleware import TrustedProxies
from mailflow.events.store import EventStore
from mailflow.log import get_logger
from mailflow.mail.tracking import CLICK_PATH, OPEN_PATH, URL_PARAMETER, BadToken, SentToken, classify_open, verify_sent
from mailflow.outbound import engagement

# The classic 43-byte transparent 1x1 GIF.
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
RECORD_WAIT_S = 2.0  # how long a response waits for its recording while PostgreSQL answers
_HEADERS = {
    "Cache-Control": "no-store, private",  # every open reaches us; no proxy keeps the response
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex, nofollow",
}

log = get_logger("mailflow.web")


def tracking_path(base_url: str | None) -> str:
    """The path prefix the tracking URLs are served under: that of the tracking base URL ("" for none)."""
    return urlsplit(base_url).path.rstrip("/") if base_url else ""


def pixel(status: int = 200) -> Response:
    return Response(PIXEL_GIF, status_code=status, media_type="image/gif", headers=_HEADERS)


class _Misses:
    """Opens and clicks that could not be recorded: one line when they start, one when they stop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    @property
    def failing(self) -> bool:
        return self.count > 0

    def missed(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.count += 1
            first = self.count == 1
        if first:
            log.error(
                "web.tracking_unrecorded",
                kind=kind,
                error=" ".join(str(exc).split())[:300] or type(exc).__name__,
                detail="opens and clicks are answered but not recorded until PostgreSQL answers again",
            )

    def recorded(self) -> None:
        if not self.count:
            return
        with self.lock:
            missed, self.count = self.count, 0
        if missed:
            log.info("web.tracking_recorded_again", missed=missed)


class TrackingPages:
    """The pixel and click handlers; everything they need is passed in (`clock`: epoch seconds)."""

    def __init__(
        self,
        store: EventStore,
        keys: list[bytes],
        proxies: TrustedProxies,
        *,
        path: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keys = keys
        self.proxies = proxies
        self.path = path
        self.clock = clock
        self.misses = _Misses()

    def routes(self) -> list[Route]:
        return [
            Route(f"{self.path}{OPEN_PATH}{{token}}", self.open, methods=["GET"]),
            Route(f"{self.path}{CLICK_PATH}{{token}}", self.click, methods=["GET"]),
        ]

    def _client(self, request: Request) -> tuple[str | None, str | None]:
        """(user agent, client address) - for the verdict only, never kept."""
        peer = request.client.host if request.client else None
        return request.headers.get("user-agent"), self.proxies.client(peer, dict(request.scope["headers"]))

    async def _record(self, kind: str, work: Callable[[], object]) -> None:
        """Run `work` in a thread; wait for it at most RECORD_WAIT_S (not at all while recording fails)."""

        def run() -> None:
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - an open or click is never worth an error page
                self.misses.missed(kind, exc)
            else:
                self.misses.recorded()

        future = asyncio.get_running_loop().run_in_executor(None, run)
        if not self.misses.failing:
            await asyncio.wait([future], timeout=RECORD_WAIT_S)

    async def open(self, request: Request) -> Response:
        try:
            sent = verify_sent(self.keys, request.path_params["token"])
        except BadToken:
            return pixel(400)
        if sent.token.link is not None:
            return pixel(400)  # a link's token is not the pixel's
        user_agent, ip = self._client(request)
        verdict = classify_open(user_agent, ip, sent.seconds_since_sent(self.clock()))
        await self._record("open", lambda: engagement.record_open(self.store, sent, verdict))
        return pixel()

    async def click(self, request: Request) -> Response:
        try:
            sent: SentToken = verify_sent(self.keys, request.path_params["token"])
        except BadToken:
            return PlainTextResponse("This link is not valid.", status_code=400, headers=_HEADERS)
        if sent.token.link is None:
            return PlainTextResponse("This link is not valid.", status_code=400, headers=_HEADERS)
        url = request.query_params.get(URL_PARAMETER)
        if url is None or not sent.has_link() or not sent.signed_for(url) or not _web_url(url):
            return PlainTextResponse("This link was not in the message.", status_code=404, headers=_HEADERS)
        user_agent, ip = self._client(request)
        now = self.clock()
        await self._record(
            "click", lambda: engagement.record_click(self.store, sent, user_agent=user_agent, ip=ip, now=now)
        )
        return RedirectResponse(url, status_code=302, headers=_HEADERS)


def _web_url(url: str) -> bool:
    """Only what the worker rewrites (absolute http and https links) is redirected to."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)
