"""Browser sessions (web/sessions.py): the login and account pages against real PostgreSQL -
signed HttpOnly SameSite cookies backed by web_sessions rows, CSRF on every form, no open
redirect, revocation at once, and the failed-login throttle."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from mailflow.infra.vault import Keyring
from mailflow.tenants import registry, users
from mailflow.web import sessions
from mailflow.web.sessions import COOKIE, SessionPages, SessionPolicy, current_user, local_path

pytestmark = pytest.mark.integration

ANN = "ann@example.net"
PASSWORD = "correct horse battery"


def make_app(rt, keyring: Keyring | None = None) -> Starlette:
    pages = SessionPages(rt.store, keyring or rt.keyring, rt.settings)

    async def whoami(request: Request) -> JSONResponse:
        user = await current_user(request)
        return JSONResponse(None if user is None else {"email": user.email, "role": user.role, "tenant": user.tenant})

    app = Starlette(routes=[*pages.routes(), Route("/whoami", whoami)])
    app.state.session_pages = pages
    return app


@pytest.fixture
def app(operator_rt, store):
    users.add(store, ANN, PASSWORD, "admin")
    return make_app(operator_rt)


def client_of(app: Starlette, base_url: str = "http://testserver") -> TestClient:
    return TestClient(app, base_url=base_url, follow_redirects=False)


def form_csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def log_in(client: TestClient, email: str = ANN, password: str = PASSWORD, workspace: str = "default", **extra):
    page = client.get("/login")
    assert page.status_code == 200
    data = {"csrf": form_csrf(page.text), "workspace": workspace, "email": email, "password": password, **extra}
    return client.post("/login", data=data)


def set_cookie_of(response, name: str) -> str:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(name + "="):
            return header
    raise AssertionError(f"no Set-Cookie for {name}: {response.headers.get_list('set-cookie')}")


def test_logging_in_sets_a_signed_httponly_samesite_cookie_and_the_account_page_shows_who(app):
    client = client_of(app)
    assert client.get("/account").headers["location"] == "/login?next=%2Faccount"

    done = log_in(client)
    assert done.status_code == 303 and done.headers["location"] == "/account"
    cookie = set_cookie_of(done, COOKIE)
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=lax", "path=/"} <= flags and "secure" not in flags  # plain http here

    account = client.get("/account")
    assert account.status_code == 200
    assert ANN in account.text and "default" in account.text and "admin" in account.text
    assert 'action="logout"' in account.text
    assert (
        account.headers["cache-control"] == "no-store"
        and "frame-ancestors 'none'" in account.headers["content-security-policy"]
    )
    assert client.get("/whoami").json() == {"email": ANN, "role": "admin", "tenant": "default"}


def test_the_cookie_is_secure_over_https_and_when_the_setting_says_so(app, operator_rt, store):
    done = log_in(client_of(app, "https://testserver"))
    assert "secure" in set_cookie_of(done, COOKIE).lower()

    behind_proxy = SessionPages(
        operator_rt.store, operator_rt.keyring, operator_rt.settings, policy=SessionPolicy(secure_cookies=True)
    )
    proxied = client_of(Starlette(routes=behind_proxy.routes()))  # https ends at a proxy: MAILFLOW_WEB_SECURE_COOKIES
    page = proxied.get("/login")
    assert "secure" in set_cookie_of(page, sessions.LOGIN_COOKIE).lower()


def test_logout_revokes_the_session_server_side_so_the_old_cookie_no_longer_works(app, db):
    client = client_of(app)
    log_in(client)
    old = client.cookies[COOKIE]
    csrf = form_csrf(client.get("/account").text)

    out = client.post("/logout", data={"csrf": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert db.execute("SELECT count(*) FROM web_sessions WHERE revoked_at IS NOT NULL").fetchone()[0] == 1
    assert db.execute("SELECT data->>'reason' FROM events WHERE type = 'SessionRevoked'").fetchone()[0] == "logout"

    replay = client_of(app)
    replay.cookies.set(COOKIE, old)
    assert replay.get("/account").status_code == 303
    assert replay.get("/whoami").json() is None


def test_a_form_post_without_or_with_a_wrong_csrf_token_or_from_another_site_is_403(app, db):
    client = client_of(app)
    log_in(client)
    csrf = form_csrf(client.get("/account").text)
    assert client.post("/logout").status_code == 403
    assert client.post("/logout", data={"csrf": "0" * 64}).status_code == 403
    refused = client.post("/logout", data={"csrf": csrf}, headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403
    assert client.post("/logout", data={"csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.get("/account").status_code == 200  # still logged in: nothing was done

    fresh = client_of(app)
    page = fresh.get("/login")
    data = {"workspace": "default", "email": ANN, "password": PASSWORD}
    assert fresh.post("/login", data=data).status_code == 403  # no token
    assert fresh.post("/login", data={**data, "csrf": "forged"}).status_code == 403
    good = {**data, "csrf": form_csrf(page.text)}
    assert fresh.post("/login", data=good, headers={"Origin": "null"}).status_code == 403
    assert fresh.post("/login", data=good, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client_of(app).post("/login", data=good).status_code == 403  # the token without its cookie
    assert fresh.post("/login", data=good, headers={"Origin": "http://testserver"}).status_code == 303
    assert db.execute("SELECT count(*) FROM events WHERE type = 'UserLoginFailed'").fetchone()[0] == 0


def test_a_tampered_or_foreign_cookie_is_refused(app, operator_rt):
    client = client_of(app)
    log_in(client)
    good = client.cookies[COOKIE]
    value, _, signature = good.rpartition(".")
    tenant, _, token = value.partition(":")
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    forged_key = Keyring([b"not the installation's key"])
    forged = SessionPages(operator_rt.store, forged_key, operator_rt.settings)._signer(sessions.SALT)
    for bad in (
        f"{tenant}:{flipped}.{signature}",  # another token under the old signature
        f"acme:{token}.{signature}",  # another tenant
        forged.sign(f"{tenant}:{token}").decode(),  # signed with a key we do not have
        "garbage",
    ):
        other = client_of(app)
        other.cookies.set(COOKIE, bad)
        assert other.get("/account").status_code == 303, bad
        assert other.get("/whoami").json() is None


def test_a_key_rotation_keeps_sessions_and_their_forms_good(app, operator_rt):
    client = client_of(app)
    log_in(client)
    cookie = client.cookies[COOKIE]
    csrf = form_csrf(client.get("/account").text)
    rotated = Keyring([b"a brand new master key", *operator_rt.keyring.keys])
    after = client_of(make_app(operator_rt, keyring=rotated))
    after.cookies.set(COOKIE, cookie)
    assert ANN in after.get("/account").text
    assert after.post("/logout", data={"csrf": csrf}).status_code == 303


@pytest.mark.parametrize(
    "target, lands",
    [
        ("https://evil.example/", "/account"),
        ("//evil.example/x", "/account"),
        ("/\\evil.example", "/account"),
        ("http:/evil.example", "/account"),
        ("/account\r\nSet-Cookie: x=y", "/account"),
        ("/dashboard?tab=live", "/dashboard?tab=live"),
    ],
)
def test_next_leads_only_to_a_path_on_this_site(app, target, lands):
    client = client_of(app)
    done = log_in(client, next=target)
    assert done.status_code == 303 and done.headers["location"] == lands
    assert urlsplit(done.headers["location"]).netloc == ""
    assert local_path(target) == lands


def test_removing_a_user_or_changing_their_password_ends_their_sessions_and_a_role_counts_at_once(app, store, db):
    first, second = client_of(app), client_of(app)
    log_in(first)
    log_in(second)
    users.set_role(store, ANN, "viewer")
    assert first.get("/whoami").json()["role"] == "viewer"

    assert users.set_password(store, ANN, "a different long password") == 2
    assert first.get("/account").status_code == 303 and second.get("/account").status_code == 303
    log_in(first, password="a different long password")
    assert first.get("/account").status_code == 200
    users.add(store, "boss@example.net", "the owner's password", "owner")
    assert users.remove(store, ANN) == 1
    assert first.get("/account").status_code == 303
    reasons = [r for (r,) in db.execute("SELECT data->>'reason' FROM events WHERE type = 'SessionRevoked'")]
    assert sorted(reasons) == ["password changed", "password changed", "user removed"]


def test_idle_and_expired_sessions_end_by_themselves(app, db):
    client = client_of(app)
    log_in(client)
    assert client.get("/account").status_code == 200
    db.execute("UPDATE web_sessions SET last_seen_at = last_seen_at - interval '2 hours'")
    assert client.get("/account").status_code == 303  # idle for longer than an hour

    log_in(client)
    db.execute("UPDATE web_sessions SET expires_at = now() - interval '1 second' WHERE revoked_at IS NULL")
    assert client.get("/account").status_code == 303  # past its absolute end


def test_a_failed_login_is_401_with_one_message_whatever_was_wrong(app, operator_rt):
    registry.create(operator_rt.store, "acme")
    client = client_of(app)
    pages = [
        log_in(client, password="not the password"),
        log_in(client, email="nobody@example.net"),
        log_in(client, workspace="acme"),  # a user of default, not of acme
        log_in(client, workspace="no-such-workspace"),
        log_in(client, email="not an address"),
    ]
    for response in pages:
        assert response.status_code == 401
        assert sessions.LOGIN_FAILED in response.text
        assert COOKIE not in response.headers.get("set-cookie", "")
    bodies = {re.sub(r'value="[^"]*"', "", r.text) for r in pages}
    assert len(bodies) == 1  # nothing but what was typed tells them apart


def test_repeated_failures_for_an_address_are_refused_for_a_while_with_429(app):
    client = client_of(app)
    for _ in range(users.LOGIN_MAX_FAILURES):
        assert log_in(client, password="not the password").status_code == 401
    refused = log_in(client)  # even the right password, for the rest of the window
    assert refused.status_code == 429
    assert sessions.LOGIN_THROTTLED in refused.text
    assert 0 < int(refused.headers["retry-after"]) <= 15 * 60 + 1
    assert client.get("/account").status_code == 303
    for _ in range(users.LOGIN_MAX_FAILURES):  # an address that is no user's: the same answers
        assert log_in(client, email="nobody@example.net").status_code == 401
    assert log_in(client, email="nobody@example.net").status_code == 429


@pytest.mark.parametrize(
    "origin, fetch_site, hosts, refused",
    [
        (None, None, ["mail.example.org"], False),
        ("https://mail.example.org", "same-origin", ["mail.example.org"], False),
        ("https://mail.example.org", None, ["127.0.0.1:8080", "mail.example.org"], False),  # behind a proxy
        ("https://evil.example", None, ["mail.example.org"], True),
        ("null", None, ["mail.example.org"], True),
        (None, "cross-site", ["mail.example.org"], True),
        ("https://mail.example.org:8443", None, ["mail.example.org"], True),
        ("https://mail.example.org", None, [], True),
    ],
)
def test_cross_site_posts_are_told_by_origin_or_sec_fetch_site(origin, fetch_site, hosts, refused):
    assert sessions.cross_site(origin, fetch_site, hosts) is refused


def test_a_post_through_a_proxy_that_rewrites_host_is_judged_by_x_forwarded_host(app):
    client = client_of(app)
    page = client.get("/login")
    data = {"csrf": form_csrf(page.text), "workspace": "default", "email": ANN, "password": PASSWORD}
    proxied = {"Host": "127.0.0.1:8080", "X-Forwarded-Host": "mail.example.org", "Origin": "https://mail.example.org"}
    assert client.post("/login", data=data, headers={**proxied, "Origin": "https://evil.example"}).status_code == 403
    assert client.post("/login", data=data, headers=proxied).status_code == 303


def test_a_genuinely_signed_cookie_naming_another_tenant_finds_no_session_there(app, operator_rt):
    registry.create(operator_rt.store, "acme")
    client = client_of(app)
    log_in(client)
    _, _, token = client.cookies[COOKIE].rpartition(".")[0].partition(":")
    signer = SessionPages(operator_rt.store, operator_rt.keyring, operator_rt.settings)._signer(sessions.SALT)
    other = client_of(app)
    other.cookies.set(COOKIE, signer.sign(f"acme:{token}").decode())
    assert other.get("/whoami").json() is None  # acme's rows are looked up in acme's scope only


def test_a_second_login_tab_keeps_the_first_tabs_form_good(app):
    client = client_of(app)
    first = form_csrf(client.get("/login").text)
    second = form_csrf(client.get("/login").text)
    assert first == second
    data = {"csrf": first, "workspace": "default", "email": ANN, "password": PASSWORD}
    assert client.post("/login", data=data).status_code == 303


def test_a_suspended_tenants_users_still_log_in_and_an_erased_tenants_do_not(app, operator_rt, store):
    registry.suspend(operator_rt.store, "default", reason="unpaid")
    client = client_of(app)
    assert log_in(client).status_code == 303  # its data can be read, so its pages too
    registry.mark_erased(operator_rt.store, "default", people=0)
    assert client.get("/account").status_code == 303  # the erasure took its users and their sessions
    assert log_in(client_of(app)).status_code == 401


def test_the_pages_with_forms_keep_their_origin_so_that_a_browser_s_post_is_not_taken_for_cross_site(app):
    # Under Referrer-Policy no-referrer Chromium posts forms with `Origin: null`, which
    # cross_site() must refuse: the login would never work in a real browser.
    client = client_of(app)
    assert client.get("/login").headers["referrer-policy"] == "same-origin"
    log_in(client)
    assert client.get("/account").headers["referrer-policy"] == "same-origin"
    assert sessions.cross_site("null", None, ["testserver"])
