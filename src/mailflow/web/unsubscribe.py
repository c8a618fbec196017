"""Web room: the unsubscribe pages - GET only asks, POST unsubscribes (RFC 8058 one-click, or the page's button).

GET never changes anything: mail filters and link scanners fetch URLs in messages before
anyone reads them. A POST with a genuine token is the request itself, whatever its body:
RFC 8058 clients send `List-Unsubscribe=One-Click` (form-urlencoded or multipart), the
confirmation page sends its button. The body is read only to say which in the log.
"""

from __future__ import annotations

import re
from html import escape
from urllib.parse import parse_qs

import psycopg
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse

from mailflow.errors import MailflowError
from mailflow.events.store import EventStore
from mailflow.log import get_logger
from mailflow.mail.tokens import BadToken
from mailflow.outbound.unsubscribes import Outcome, UnsubscribeRequest, read_token, unsubscribe

MAX_BODY_BYTES = 16 * 1024  # RFC 8058 bodies are a few dozen bytes; read no more than this

_HEADERS = {
    # The pages hold the token (and name the address): no caching, no referrer, no framing.
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex, nofollow",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
}

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{title}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 34rem; margin: 3rem auto; padding: 0 1rem; color: #222; }}
button {{ font: inherit; padding: .5rem 1.5rem; cursor: pointer; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""

_ONE_CLICK_PART = re.compile(
    rb'name="?List-Unsubscribe"?[^\r\n]*\r?\n(?:[^\r\n]+\r?\n)*\r?\n[ \t]*One-Click[ \t]*\r?\n', re.IGNORECASE
)

log = get_logger("mailflow.web")


def page(title: str, body_html: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    """A small self-contained HTML page; title is escaped here, body_html must be escaped by the caller."""
    return HTMLResponse(
        _PAGE.format(title=escape(title), body=body_html), status_code=status, headers={**_HEADERS, **(headers or {})}
    )


def is_one_click(content_type: str, body: bytes) -> bool:
    """Whether a POST body is RFC 8058's `List-Unsubscribe=One-Click` (form-urlencoded or multipart)."""
    if content_type.split(";", 1)[0].strip().lower() == "multipart/form-data":
        return _ONE_CLICK_PART.search(body) is not None
    form = parse_qs(body.decode("latin-1"), keep_blank_values=True)
    return form.get("List-Unsubscribe") == ["One-Click"]


def invalid_link() -> HTMLResponse:
    return page(
        "This unsubscribe link is not valid",
        "<p>The link may be incomplete: some mail programs break long links over two lines. "
        "Open it again from the email, or copy the whole link into your browser's address bar.</p>"
        "<p>Nothing was changed.</p>",
        status=400,
    )


def try_again_later() -> HTMLResponse:
    return page(
        "Please try again in a few minutes",
        "<p>We could not record your request just now. Nothing was changed.</p>",
        status=503,
        headers={"Retry-After": "60"},
    )


def confirmation(req: UnsubscribeRequest) -> HTMLResponse:
    # No action attribute: the form posts back to the URL the browser shows, whatever path
    # a reverse proxy serves this under.
    return page(
        "Unsubscribe?",
        f"<p>Stop emails like this one to <strong>{escape(req.email)}</strong>?</p>\n"
        '<form method="post"><input type="hidden" name="confirm" value="yes">'
        '<button type="submit">Unsubscribe</button></form>\n'
        "<p>Nothing changes until you press the button.</p>",
    )


def done(req: UnsubscribeRequest) -> HTMLResponse:
    return page(
        "You are unsubscribed",
        f"<p>No more emails like this one will be sent to <strong>{escape(req.email)}</strong>.</p>",
    )


class UnsubscribePages:
    """GET and POST handlers for `<path>/{token}`; everything they need is passed in."""

    def __init__(self, store: EventStore, secret: bytes | list[bytes]) -> None:
        self.store = store
        self.secret = secret

    def _request(self, request: Request) -> UnsubscribeRequest | None:
        try:
            return read_token(self.secret, request.path_params["token"])
        except BadToken:
            return None

    async def confirm(self, request: Request) -> HTMLResponse:
        """GET: the confirmation page. Reads and writes nothing but the token."""
        req = self._request(request)
        return confirmation(req) if req is not None else invalid_link()

    async def unsubscribe(self, request: Request) -> HTMLResponse:
        """POST: record the unsubscribe (committed before the 200), or say why not."""
        req = self._request(request)
        if req is None:
            log.info("web.unsubscribe_refused", reason="invalid token")
            return invalid_link()
        body = await read_body(request, MAX_BODY_BYTES)
        via = "one-click" if is_one_click(request.headers.get("content-type", ""), body) else "form"
        try:
            outcome: Outcome = await run_in_threadpool(unsubscribe, self.store, req)
        except (psycopg.Error, MailflowError) as exc:  # psycopg_pool's PoolTimeout is a psycopg.Error
            log.error(
                "web.unsubscribe_failed",
                campaign_id=req.campaign_id,
                via=via,
                error=" ".join(str(exc).split())[:300] or type(exc).__name__,
            )
            return try_again_later()
        log.info("web.unsubscribe", campaign_id=req.campaign_id, via=via, outcome=outcome.value)
        return done(req)


async def read_body(request: Request, limit: int) -> bytes:
    """At most `limit` bytes of the body; the rest is not needed (nor read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]
