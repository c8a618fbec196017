"""Web room: browser sessions - the login and account pages, the session cookie, CSRF on every form.

The cookie holds `<tenant>:<token>` signed (itsdangerous, HMAC-SHA256) with the keyring: the
newest key signs, every key verifies, so a key rotation does not log anyone out. It is
HttpOnly, SameSite=Lax, and Secure when the request came over https or the setting says the
site is https behind a proxy (MAILFLOW_WEB_SECURE_COOKIES). The signature only keeps forged
cookies from costing a lookup: what makes a session good is its `web_sessions` row
(tenants/users.py), so logout, a new password or the user's removal ends it at once, and it
ends by itself when idle too long or at its absolute end, whatever the activity.

Every form POST carries a CSRF token in a hidden field, checked with hmac.compare_digest: for a
session, an HMAC of its id under the keyring; for the login form, a random value that must
match its signed cookie (so a third-party site cannot log a browser into its own account). A
POST whose Origin (or Sec-Fetch-Site) says it came from another site is refused before that.
A failed login answers the same page, status 401, with one message whatever was wrong; too
many for one address answer 429 (tenants/users.py counts them).

Later pages (the WebSocket dashboard) ask `current_user(request)` who is there; the app keeps
its SessionPages in `app.state.session_pages` for that (see docs/users.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import psycopg
from itsdangerous import BadSignature, Signer, TimestampSigner
from jinja2 import Environment
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from mailflow.config import Settings
from mailflow.errors import MailflowError
from mailflow.events.store import EventStore
from mailflow.infra.tenancy import DEFAULT_TENANT
from mailflow.infra.vault import Keyring
from mailflow.log import get_logger
from mailflow.tenants import users
from mailflow.web.unsubscribe import MAX_BODY_BYTES, page, read_body, try_again_later

COOKIE = "mailflow_session"
LOGIN_COOKIE = "mailflow_login"  # the login form's CSRF value, signed
SALT = b"mailflow/web-session"
LOGIN_SALT = b"mailflow/web-login"
CSRF_FIELD = "csrf"
DEFAULT_IDLE = timedelta(hours=1)
DEFAULT_LIFETIME = timedelta(hours=12)
LOGIN_FORM_LIFETIME = timedelta(hours=1)
AFTER_LOGIN = "/account"
# The pages with forms say where they are to their own site: under `no-referrer` (the
# unsubscribe pages' policy) Chromium sends `Origin: null` with a form's POST, which the
# cross-site check must refuse. Their URLs carry no secret.
_FORM_PAGE = {"Referrer-Policy": "same-origin"}

log = get_logger("mailflow.web")

_jinja = Environment(autoescape=True)

_LOGIN = _jinja.from_string(
    """{% if message %}<p role="alert"><strong>{{ message }}</strong></p>
{% endif %}<form method="post" action="login">
<input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="next" value="{{ next }}">
<p><label>Workspace<br><input name="workspace" value="{{ workspace }}" required autocomplete="organization"></label></p>
<p><label>Email<br><input name="email" type="email" value="{{ email }}" required autocomplete="username"></label></p>
<p><label>Password<br><input name="password" type="password" required autocomplete="current-password"></label></p>
<p><button type="submit">Log in</button></p>
</form>"""
)

_ACCOUNT = _jinja.from_string(
    """<p>You are logged in as <strong>{{ user.email }}</strong>. <a href="/dashboard">Dashboard</a></p>
<p>Workspace: <strong>{{ user.tenant }}</strong><br>Role: <strong>{{ user.role }}</strong></p>
<form method="post" action="logout">
<input type="hidden" name="csrf" value="{{ user.csrf_token }}">
<button type="submit">Log out</button>
</form>"""
)

_REFUSED = _jinja.from_string("<p>{{ why }}</p><p>Nothing was changed. Reload the page and try again.</p>")

LOGIN_FAILED = "The workspace, email or password is not right."
LOGIN_THROTTLED = "Too many failed logins for this email. Wait a few minutes, then try again."


@dataclass(frozen=True)
class SessionUser:
    """Who a browser is: the user, their tenant and role, and the CSRF token of their forms."""

    tenant: str
    user_id: str
    email: str
    role: str
    session_id: str
    csrf_token: str


@dataclass(frozen=True)
class SessionPolicy:
    idle: timedelta = DEFAULT_IDLE
    lifetime: timedelta = DEFAULT_LIFETIME
    secure_cookies: bool = False  # Secure on every cookie, not only on https requests

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionPolicy:
        """MAILFLOW_WEB_SESSION_IDLE_S, MAILFLOW_WEB_SESSION_LIFETIME_S, MAILFLOW_WEB_SECURE_COOKIES
        (docs/users.md)."""
        return cls(
            idle=timedelta(seconds=settings.web_session_idle_s),
            lifetime=timedelta(seconds=settings.web_session_lifetime_s),
            secure_cookies=settings.web_secure_cookies,
        )


# -- decisions (pure) -------------------------------------------------------------------------


def local_path(target: str | None, default: str = AFTER_LOGIN) -> str:
    """`target` if it is a path on this site, else `default`: never a redirect elsewhere
    (`//evil.example`, `/\\evil.example`, `https://...`, control characters)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


def cross_site(origin: str | None, fetch_site: str | None, hosts: Iterable[str]) -> bool:
    """Whether a POST says it came from another site: an Origin whose host is none of this
    site's `hosts` (or "null"), or Sec-Fetch-Site cross-site. A request that says neither is
    let through to the CSRF token check."""
    if fetch_site is not None and fetch_site.strip().lower() == "cross-site":
        return True
    if origin is None:
        return False
    if origin.strip().lower() == "null":
        return True
    try:
        netloc = urlsplit(origin.strip()).netloc.lower()
    except ValueError:
        return True
    return not netloc or netloc not in {h.strip().lower() for h in hosts if h}


def csrf_token(key: bytes, session_id: str) -> str:
    """A session's CSRF token under one master key (HMAC under a key derived for CSRF alone)."""
    derived = hmac.new(key, b"mailflow/csrf", hashlib.sha256).digest()
    return hmac.new(derived, session_id.encode(), hashlib.sha256).hexdigest()


def csrf_ok(keys: list[bytes], session_id: str, sent: str) -> bool:
    """Whether `sent` is the session's token under any key of the ring (a rotation keeps open forms good)."""
    good = False
    for key in keys:
        good |= hmac.compare_digest(csrf_token(key, session_id).encode(), sent.encode())
    return good


# -- the pages --------------------------------------------------------------------------------


class SessionPages:
    """GET/POST /login, POST /logout, GET /account; an operator's store acts for each tenant."""

    def __init__(
        self, store: EventStore, keyring: Keyring, settings: Settings, *, policy: SessionPolicy | None = None
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.policy = policy or SessionPolicy.from_settings(settings)
        self.hosts = [
            urlsplit(url).netloc for url in (settings.unsubscribe_base_url, settings.preferences_base_url) if url
        ]

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/account", self.account, methods=["GET"]),
        ]

    # -- cookies

    def _signer(self, salt: bytes) -> Signer:
        # itsdangerous wants the keys oldest first and signs with the last; read the ring each
        # time, as a rotation may have added a key to it.
        return Signer(list(reversed(self.keyring.verifying_keys)), salt=salt, digest_method=hashlib.sha256)

    def _login_signer(self) -> TimestampSigner:
        keys = list(reversed(self.keyring.verifying_keys))
        return TimestampSigner(keys, salt=LOGIN_SALT, digest_method=hashlib.sha256)

    def _secure(self, conn: HTTPConnection) -> bool:
        return self.policy.secure_cookies or conn.url.scheme in ("https", "wss")

    def _set_cookie(self, response: Response, conn: HTTPConnection, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name, value, max_age=max_age, path="/", httponly=True, samesite="lax", secure=self._secure(conn)
        )

    def _clear_cookie(self, response: Response, conn: HTTPConnection, name: str) -> None:
        response.delete_cookie(name, path="/", httponly=True, samesite="lax", secure=self._secure(conn))

    def _session_cookie(self, conn: HTTPConnection) -> tuple[str, str] | None:
        raw = conn.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            value = self._signer(SALT).unsign(raw).decode()
        except (BadSignature, UnicodeDecodeError):
            return None
        tenant, sep, token = value.partition(":")
        return (tenant, token) if sep and tenant and token else None

    # -- who is there

    def _lookup(self, conn: HTTPConnection) -> SessionUser | None:
        found = self._session_cookie(conn)
        if found is None:
            return None
        session = users.session_for(self.store, found[0], found[1], idle=self.policy.idle)
        if session is None:
            return None
        return SessionUser(
            tenant=session.tenant,
            user_id=session.user_id,
            email=session.email,
            role=session.role,
            session_id=session.id,
            csrf_token=csrf_token(self.keyring.signing_key, session.id),
        )

    async def current_user(self, conn: HTTPConnection) -> SessionUser | None:
        """The logged-in user of this request or WebSocket, or None (no, a forged, a revoked or
        an expired session). The database is asked each time: a revocation counts at once."""
        return await run_in_threadpool(self._lookup, conn)

    # -- handlers

    async def _form(self, request: Request) -> dict[str, str]:
        if request.headers.get("content-type", "").split(";", 1)[0].strip().lower() != (
            "application/x-www-form-urlencoded"
        ):
            return {}
        body = await read_body(request, MAX_BODY_BYTES)
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}

    def _cross_site(self, request: Request) -> bool:
        # This site's names: the Host the request was sent to, and the one a proxy in front says
        # it received (X-Forwarded-Host: a form on another site cannot set that header), and
        # those of the configured links.
        forwarded = request.headers.get("x-forwarded-host", "").split(",")[0]
        hosts = [request.headers.get("host", ""), forwarded, *self.hosts]
        return cross_site(request.headers.get("origin"), request.headers.get("sec-fetch-site"), hosts)

    def _login_page(
        self,
        request: Request,
        *,
        message: str = "",
        status: int = 200,
        form: dict[str, str] | None = None,
        retry_after: int | None = None,
    ) -> Response:
        form = form or {}
        # The nonce of the login cookie the browser has, if any: a second tab keeps the first one's form good.
        nonce = self._login_nonce(request) or secrets.token_urlsafe(24)
        body = _LOGIN.render(
            message=message,
            csrf=nonce,
            next=local_path(form.get("next") or request.query_params.get("next")),
            workspace=form.get("workspace") or request.query_params.get("workspace") or DEFAULT_TENANT,
            email=form.get("email", ""),
        )
        headers = {**_FORM_PAGE, **({"Retry-After": str(retry_after)} if retry_after is not None else {})}
        response = page("Log in", body, status=status, headers=headers)
        signed = self._login_signer().sign(nonce).decode()
        self._set_cookie(response, request, LOGIN_COOKIE, signed, int(LOGIN_FORM_LIFETIME.total_seconds()))
        return response

    def _refused(self, why: str) -> Response:
        return page("Request refused", _REFUSED.render(why=why), status=403)

    async def login_form(self, request: Request) -> Response:
        return self._login_page(request)

    def _login_nonce(self, request: Request) -> str | None:
        raw = request.cookies.get(LOGIN_COOKIE)
        if not raw:
            return None
        try:
            nonce = self._login_signer().unsign(raw, max_age=int(LOGIN_FORM_LIFETIME.total_seconds()))
        except BadSignature:  # also a signature that has expired
            return None
        return nonce.decode("ascii", "replace")

    def _login_csrf_ok(self, request: Request, sent: str) -> bool:
        nonce = self._login_nonce(request)
        if not nonce or not sent:
            return False
        return hmac.compare_digest(nonce.encode(), sent.encode())

    async def login(self, request: Request) -> Response:
        if self._cross_site(request):
            log.info("web.login_refused", reason="cross-site")
            return self._refused("This form was sent from another site.")
        form = await self._form(request)
        if not self._login_csrf_ok(request, form.get(CSRF_FIELD, "")):
            log.info("web.login_refused", reason="csrf")
            return self._refused("This form has expired or was not sent from this site.")
        tenant = form.get("workspace", "").strip().lower() or DEFAULT_TENANT
        email, password = form.get("email", ""), form.get("password", "")
        shown = {"workspace": tenant, "email": email, "next": form.get("next", "")}
        try:
            grant = await run_in_threadpool(
                users.log_in, self.store, tenant, email, password, lifetime=self.policy.lifetime
            )
        except users.LoginThrottled as exc:
            log.info("web.login_throttled", tenant=tenant)
            return self._login_page(
                request, message=LOGIN_THROTTLED, status=429, form=shown, retry_after=exc.retry_after
            )
        except (psycopg.Error, MailflowError) as exc:
            log.error("web.login_failed", error=" ".join(str(exc).split())[:300] or type(exc).__name__)
            return try_again_later()
        if grant is None:
            log.info("web.login_denied", tenant=tenant)  # never the address: it names a person
            return self._login_page(request, message=LOGIN_FAILED, status=401, form=shown)
        log.info("web.login", tenant=tenant, user_id=grant.user.id, session_id=grant.id)
        response = RedirectResponse(local_path(form.get("next")), status_code=303)
        cookie = self._signer(SALT).sign(f"{tenant}:{grant.token}").decode()
        self._set_cookie(response, request, COOKIE, cookie, int(self.policy.lifetime.total_seconds()))
        self._clear_cookie(response, request, LOGIN_COOKIE)
        return response

    async def logout(self, request: Request) -> Response:
        if self._cross_site(request):
            return self._refused("This form was sent from another site.")
        form = await self._form(request)
        try:
            user = await self.current_user(request)
            if user is not None:
                if not csrf_ok(self.keyring.verifying_keys, user.session_id, form.get(CSRF_FIELD, "")):
                    log.info("web.logout_refused", reason="csrf")
                    return self._refused("This form has expired or was not sent from this site.")
                await run_in_threadpool(users.end_session, self.store, user.tenant, user.session_id)
                log.info("web.logout", tenant=user.tenant, session_id=user.session_id)
        except (psycopg.Error, MailflowError) as exc:
            log.error("web.logout_failed", error=" ".join(str(exc).split())[:300] or type(exc).__name__)
            return try_again_later()
        response = RedirectResponse("/login", status_code=303)
        self._clear_cookie(response, request, COOKIE)
        return response

    async def account(self, request: Request) -> Response:
        try:
            user = await self.current_user(request)
        except (psycopg.Error, MailflowError):
            return try_again_later()
        if user is None:
            response = RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)
            if COOKIE in request.cookies:
                self._clear_cookie(response, request, COOKIE)
            return response
        return page("Your account", _ACCOUNT.render(user=user), headers=_FORM_PAGE)


STATE_KEY = "session_pages"


async def current_user(conn: HTTPConnection) -> SessionUser | None:
    """The logged-in user of a request or WebSocket of an app that keeps its SessionPages in
    `app.state.session_pages`; None when nobody is logged in."""
    pages: Any = getattr(conn.app.state, STATE_KEY, None)
    if not isinstance(pages, SessionPages):
        raise RuntimeError("the app has no SessionPages: set app.state.session_pages = SessionPages(...)")
    return await pages.current_user(conn)
