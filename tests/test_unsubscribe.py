"""Unsubscribe links: the token decision, the pages against a real database, `mailflow web` as a
real process, and a campaign message's own List-Unsubscribe URL stopping the worker.

GET must never unsubscribe (link scanners fetch it); POST is the request (RFC 8058 one-click
or the page's button); a second POST writes nothing; a bad token is a 400 that writes nothing.
"""

from __future__ import annotations

import email
import re
import signal
import socket
import threading
import warnings
from email.policy import default

import httpx
import pytest

with warnings.catch_warnings():
    # Starlette 1.x prefers the `httpx2` package for its TestClient and warns about httpx,
    # which still works (and is the real client the process test uses).
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from mailflow.errors import ConfigurationError
from mailflow.infra.services import connect
from mailflow.mail import tokens
from mailflow.outbound import campaigns, mime, segments, suppressions, templates
from mailflow.outbound.contacts import import_csv_text
from mailflow.outbound.events import ContactStatusChanged, SuppressionAdded
from mailflow.outbound.senders import Sender
from mailflow.outbound.templates import Rendered
from mailflow.outbound.unsubscribes import Outcome, UnsubscribeRequest, plan, read_token, unsubscribe
from mailflow.runtime.wiring import Runtime
from mailflow.testing.sink import Sink, SinkServer
from mailflow.web.app import create_app, unsubscribe_path
from mailflow.web.unsubscribe import is_one_click

from .conftest import run_cli, wait_until
from .test_outbound_pipeline import SECRET as PIPELINE_SECRET
from .test_outbound_pipeline import run_pipeline, setup_catalog

pytestmark = pytest.mark.process

SECRET = b"unsubscribe-test"
CAMPAIGN = "0190f5a2-7c1e-7d0a-9b1e-1f2a3b4c5d6e"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


def token_for(email_: str, campaign_id: str = CAMPAIGN, secret: bytes = SECRET) -> str:
    return mime.unsubscribe_token(secret, email_, campaign_id)


# -- the decisions, without servers ---------------------------------------------------------------


def test_a_token_made_for_a_campaign_message_names_its_campaign_and_address():
    req = read_token(SECRET, token_for("ann@example.net"))
    assert req == UnsubscribeRequest(campaign_id=CAMPAIGN, email="ann@example.net")
    assert req.reason == f"unsubscribe link (campaign {CAMPAIGN})"


def test_an_address_with_a_colon_survives_because_only_the_first_colon_splits():
    assert read_token(SECRET, token_for('"a:b"@example.net', "c1")) == UnsubscribeRequest("c1", '"a:b"@example.net')


@pytest.mark.parametrize(
    "token",
    [
        token_for("ann@example.net", secret=b"another-installation"),  # forged: other key
        token_for("ann@example.net")[:-2] + "AA",  # tampered signature
        token_for("ann@example.net").replace(".", ""),  # no signature at all
        tokens.sign(SECRET, "job-1"),  # genuine, but a VERP token (a bare job id)
        tokens.sign(SECRET, ":ann@example.net"),  # genuine, but no campaign
        tokens.sign(SECRET, "c1:not-an-address"),  # genuine, but no address
        "",
        "%%%.***",
    ],
)
def test_anything_but_a_genuine_unsubscribe_token_is_refused(token):
    with pytest.raises(tokens.BadToken):
        read_token(SECRET, token)


REQ = UnsubscribeRequest(CAMPAIGN, "ann@example.net")


SUBJECT = "5b0c" * 8  # plan() takes the subject as given
SUPPRESSION = SuppressionAdded(subject=SUBJECT, sealed="s1.sealed", reason="unsubscribe")


def _plan(status, suppressed):
    return plan(REQ, SUBJECT, status, suppressed, lambda: SUPPRESSION)


def test_an_active_contact_becomes_unsubscribed_with_the_campaign_as_reason():
    outcome, items = _plan("active", suppressed=False)
    assert outcome is Outcome.UNSUBSCRIBED
    assert items == [
        (
            f"contact-{SUBJECT}",
            ContactStatusChanged(
                subject=SUBJECT, status="unsubscribed", reason=f"unsubscribe link (campaign {CAMPAIGN})"
            ),
        )
    ]
    # A suppression (say, manual) does not make the contact's status say unsubscribed.
    assert _plan("active", suppressed=True)[0] is Outcome.UNSUBSCRIBED


@pytest.mark.parametrize("status", ["unsubscribed", "bounced", "complained"])
def test_a_contact_that_is_already_stopped_is_left_as_it_is(status):
    assert _plan(status, suppressed=False) == (Outcome.ALREADY, [])


def test_an_address_without_a_contact_is_suppressed_once():
    outcome, items = _plan(None, suppressed=False)
    assert outcome is Outcome.SUPPRESSED
    assert items == [(f"suppression-{SUBJECT}", SUPPRESSION)]
    assert _plan(None, suppressed=True) == (Outcome.ALREADY, [])


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("application/x-www-form-urlencoded", b"List-Unsubscribe=One-Click", True),
        ("", b"List-Unsubscribe=One-Click", True),
        (
            "multipart/form-data; boundary=b1",
            b'--b1\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\nOne-Click\r\n--b1--\r\n',
            True,
        ),
        ("application/x-www-form-urlencoded", b"confirm=yes", False),
        ("application/x-www-form-urlencoded", b"List-Unsubscribe=Two-Clicks", False),
        (
            "multipart/form-data; boundary=b1",
            b'--b1\r\nContent-Disposition: form-data; name="x"\r\n\r\nOne-Click\r\n--b1--\r\n',
            False,
        ),
    ],
)
def test_one_click_bodies_are_recognised_in_both_encodings_rfc_8058_allows(content_type, body, expected):
    assert is_one_click(content_type, body) is expected


def test_the_pages_live_under_the_path_of_the_links_put_in_messages():
    assert unsubscribe_path(None) == "/unsubscribe"
    assert unsubscribe_path("https://mail.example.org/u/") == "/u"
    assert unsubscribe_path("https://mail.example.org/lists/unsubscribe") == "/lists/unsubscribe"
    assert unsubscribe_path("https://mail.example.org") == ""
    with pytest.raises(ConfigurationError, match="MAILFLOW_UNSUBSCRIBE_BASE_URL"):
        unsubscribe_path("mail.example.org/unsubscribe")


# -- the pages against the real database -------------------------------------------------------------


@pytest.fixture
def client(rt):
    with TestClient(create_app(rt, secret=SECRET)) as c:
        yield c


def event_count(db_url: str) -> int:
    with connect(db_url) as c:
        return c.execute("SELECT count(*) FROM events").fetchone()[0]


def contact_status(db_url: str, email_: str) -> str | None:
    with connect(db_url) as c:
        row = c.execute("SELECT status FROM contacts WHERE email = %s", (email_,)).fetchone()
    return row[0] if row else None


def contact_stream(rt, email_: str) -> str:
    """The stream of a person's contact: named by subject, never by address."""
    with rt.connect() as c:
        return f"default/contact-{rt.store.subject(c, email_)}"


def stream_events(db_url: str, stream: str) -> list[tuple[str, dict, dict]]:
    with connect(db_url) as c:
        return c.execute(
            "SELECT type, data, metadata FROM events WHERE stream = %s ORDER BY version", (stream,)
        ).fetchall()


def test_get_shows_a_confirmation_form_and_changes_nothing(rt, client, db_url):
    import_csv_text(rt.store, "email\nann@example.net\n")
    before = event_count(db_url)
    for _ in range(3):  # a link scanner, then the person, then a reload
        res = client.get(f"/unsubscribe/{token_for('ann@example.net')}")
        assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/html")
    assert '<form method="post">' in res.text and "ann@example.net" in res.text
    assert res.headers["cache-control"] == "no-store"
    assert event_count(db_url) == before
    assert contact_status(db_url, "ann@example.net") == "active"


def test_a_one_click_post_unsubscribes_the_contact_once(rt, client, db_url):
    import_csv_text(rt.store, "email\nann@example.net\nbob@example.net\n")
    url = f"/unsubscribe/{token_for('ann@example.net')}"
    res = client.post(url, data=ONE_CLICK)
    assert res.status_code == 200 and "unsubscribed" in res.text
    assert contact_status(db_url, "ann@example.net") == "unsubscribed"
    assert contact_status(db_url, "bob@example.net") == "active"
    [(etype, data, metadata)] = stream_events(db_url, contact_stream(rt, "ann@example.net"))
    assert etype == "ContactStatusChanged"
    assert data == {
        "subject": contact_stream(rt, "ann@example.net").rpartition("-")[2],
        "status": "unsubscribed",
        "reason": f"unsubscribe link (campaign {CAMPAIGN})",
    }
    assert metadata["actor"] == "unsubscribe-link" and metadata["correlation_id"] == f"campaign-{CAMPAIGN}"

    after_first = event_count(db_url)
    again = client.post(url, data=ONE_CLICK)
    assert again.status_code == 200
    assert event_count(db_url) == after_first


def test_the_confirmation_forms_button_unsubscribes_too(rt, client, db_url):
    import_csv_text(rt.store, "email\nann@example.net\n")
    res = client.post(f"/unsubscribe/{token_for('ann@example.net')}", data={"confirm": "yes"})
    assert res.status_code == 200
    assert contact_status(db_url, "ann@example.net") == "unsubscribed"


def test_a_multipart_one_click_post_unsubscribes(rt, client, db_url):
    import_csv_text(rt.store, "email\nann@example.net\n")
    res = client.post(f"/unsubscribe/{token_for('ann@example.net')}", files={"List-Unsubscribe": (None, "One-Click")})
    assert res.status_code == 200
    assert contact_status(db_url, "ann@example.net") == "unsubscribed"


@pytest.mark.parametrize(
    "token",
    [
        token_for("ann@example.net", secret=b"forged"),
        token_for("ann@example.net")[:-3] + "abc",
        tokens.sign(SECRET, "0190f5a2-0000-7000-8000-000000000000"),  # a VERP token
        "not-a-token",
    ],
)
def test_a_bad_token_is_a_400_page_and_nothing_is_written(rt, client, db_url, token):
    import_csv_text(rt.store, "email\nann@example.net\n")
    before = event_count(db_url)
    for res in (client.get(f"/unsubscribe/{token}"), client.post(f"/unsubscribe/{token}", data=ONE_CLICK)):
        assert res.status_code == 400
        assert "not valid" in res.text and "Nothing was changed" in res.text
    assert event_count(db_url) == before
    assert contact_status(db_url, "ann@example.net") == "active"


def test_an_address_without_a_contact_is_suppressed_and_never_twice(rt, client, db_url):
    url = f"/unsubscribe/{token_for('gone@example.net')}"
    assert client.post(url, data=ONE_CLICK).status_code == 200
    with connect(db_url) as c:
        assert c.execute("SELECT reason, detail FROM suppressions WHERE email = 'gone@example.net'").fetchone() == (
            "unsubscribe",
            f"unsubscribe link (campaign {CAMPAIGN})",
        )
    assert contact_status(db_url, "gone@example.net") is None  # no contact is made up
    before = event_count(db_url)
    assert client.post(url, data=ONE_CLICK).status_code == 200
    assert event_count(db_url) == before


def test_a_bounced_contact_stays_bounced(rt, client, db_url):
    import_csv_text(rt.store, "email\nann@example.net\n")
    suppressions.add(rt.store, "ann@example.net", reason="bounce", contact_status="bounced")
    before = event_count(db_url)
    assert client.post(f"/unsubscribe/{token_for('ann@example.net')}", data=ONE_CLICK).status_code == 200
    assert event_count(db_url) == before
    assert contact_status(db_url, "ann@example.net") == "bounced"


def test_simultaneous_requests_for_one_address_record_one_event(rt, db_url):
    import_csv_text(rt.store, "email\nann@example.net\n")
    req = read_token(SECRET, token_for("ann@example.net"))
    outcomes: list[Outcome] = []
    go = threading.Barrier(8)

    def click() -> None:
        go.wait()
        outcomes.append(unsubscribe(rt.store, req))

    threads = [threading.Thread(target=click) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == sorted([Outcome.UNSUBSCRIBED] + [Outcome.ALREADY] * 7)
    assert len(stream_events(db_url, contact_stream(rt, "ann@example.net"))) == 1


def test_the_routes_follow_the_path_of_the_configured_base_url(settings, db_url):
    s = settings.model_copy(update={"unsubscribe_base_url": "https://mail.example.org/lists/u/"})
    web_rt = Runtime(s, pool_size=2)
    try:
        with TestClient(create_app(web_rt, secret=SECRET)) as c:
            tok = token_for("ann@example.net")
            assert c.get(f"/lists/u/{tok}").status_code == 200
            assert c.get(f"/unsubscribe/{tok}").status_code == 404
    finally:
        web_rt.close()


def test_healthz_says_ok_when_the_database_answers_and_503_when_not(rt, client):
    res = client.get("/healthz")
    assert res.status_code == 200 and res.json()["ok"] is True and res.json()["database"] == "ok"
    rt.store.pool.close()  # the database is gone, as far as this app can tell
    res = client.get("/healthz")
    assert res.status_code == 503 and res.json()["ok"] is False
    post = client.post(f"/unsubscribe/{token_for('ann@example.net')}", data=ONE_CLICK)
    assert post.status_code == 503 and post.headers["retry-after"] == "60"


# -- `mailflow web` as a real process ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mailflow_web_serves_a_real_one_click_post_and_exits_0_on_sigterm(procs, env, rt, db_url):
    import_csv_text(rt.store, "email\nann@example.net\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}/unsubscribe"
    # The web process shares the installation's keyring (MAILFLOW_HOME/secret.key), as every
    # process of one installation does.
    e = dict(env, MAILFLOW_UNSUBSCRIBE_BASE_URL=base)
    web = procs.start("web", "--port", str(port), env=e)

    def healthy() -> bool:
        assert web.poll() is None, procs.log_of(web)
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()["ok"] is True
        except httpx.TransportError:
            return False

    wait_until(healthy, 30, what="`mailflow web` to answer /healthz")
    # The link exactly as a campaign message carries it, signed with the installation's key.
    out = mime.build(
        job_id="job-1",
        sender=Sender("news", "news@example.org", "", "smtp://127.0.0.1:25?tls=none"),
        to="ann@example.net",
        rendered=Rendered("Hi", "<p>Hi</p>", "Hi\n"),
        secret=rt.keyring.signing_key,
        campaign_id=CAMPAIGN,
        unsubscribe_base_url=base,
    )
    url = re.findall(r"<([^>]+)>", email.message_from_bytes(out.data, policy=default)["List-Unsubscribe"])[0]
    assert url.startswith(base + "/")
    res = httpx.post(url, data=ONE_CLICK, timeout=10)
    assert res.status_code == 200
    assert contact_status(db_url, "ann@example.net") == "unsubscribed"  # committed before the 200

    web.send_signal(signal.SIGTERM)
    assert web.wait(15) == 0, procs.log_of(web)
    log = procs.log_of(web)
    assert '"event": "web.start"' in log and '"event": "web.stop"' in log
    assert url.rsplit("/", 1)[1] not in log  # no access log: tokens name addresses


def test_mailflow_web_on_a_port_in_use_is_one_line_and_exit_1(env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        res = run_cli(env, "web", "--port", str(busy.getsockname()[1]))
    assert res.returncode == 1, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("error: cannot listen on 127.0.0.1:") and "--port" in line


def test_mailflow_web_with_a_base_url_that_is_not_a_url_is_one_line_and_exit_2(env):
    res = run_cli(
        dict(env, MAILFLOW_UNSUBSCRIBE_BASE_URL="mail.example.org/unsubscribe"), "web", "--port", str(free_port())
    )
    assert res.returncode == 2, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert "MAILFLOW_UNSUBSCRIBE_BASE_URL" in line and "https://" in line


# -- end to end: a sent campaign message's own link, then the worker ---------------------------------------


def test_the_link_in_a_sent_campaign_message_unsubscribes_and_the_worker_then_refuses_the_contact(settings, db_url):
    base = "https://mail.example.org/unsubscribe"
    s = settings.model_copy(update={"unsubscribe_base_url": base, "retry_base_s": 0.2, "queuer_interval_s": 0.02})
    prt = Runtime(s, pool_size=20)
    sink = Sink()

    def finished(cid: str):
        def check() -> bool:
            with connect(db_url) as c:
                return c.execute("SELECT status FROM campaigns WHERE id = %s", (cid,)).fetchone()[0] == "completed"

        return check

    def received(cid: str) -> dict[str, email.message.EmailMessage]:
        with sink.lock:
            return {str(m["To"]): m for m in sink.received if m["X-Mailflow-Campaign"] == cid}

    try:
        with SinkServer(sink) as server:
            setup_catalog(prt.store, server.url)
            import_csv_text(prt.store, "email,name\nann@example.net,Ann\nbob@example.net,Bob\n")
            segments.define(prt.store, "all", {})
            templates.save(prt.store, templates.Template("news", "News for {{ name }}", "<p>Hello {{ name }}</p>"))
            spring = campaigns.create(prt.store, name="spring", sender="tx", template="news", segment="all")
            assert campaigns.start(prt.store, spring) == 2
            run_pipeline(prt, s, finished(spring))
            assert set(received(spring)) == {"ann@example.net", "bob@example.net"}

            # The next campaign snapshots both recipients before Ann's click reaches us.
            summer = campaigns.create(prt.store, name="summer", sender="tx", template="news", segment="all")
            assert campaigns.start(prt.store, summer) == 2

            msg = received(spring)["ann@example.net"]
            assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            https = [u for u in re.findall(r"<([^>]+)>", msg["List-Unsubscribe"]) if u.startswith("https://")]
            assert len(https) == 1 and https[0].startswith(base + "/")
            with TestClient(create_app(prt, secret=PIPELINE_SECRET)) as web:
                assert web.post(https[0], data=ONE_CLICK).status_code == 200

            run_pipeline(prt, s, finished(summer))
            assert set(received(summer)) == {"bob@example.net"}
            with connect(db_url) as c:
                state, kind, reply = c.execute(
                    "SELECT state, failure_kind, last_reply FROM jobs WHERE campaign_id = %s AND email = %s",
                    (summer, "ann@example.net"),
                ).fetchone()
            assert (state, kind) == ("failed", "suppressed") and "unsubscribed" in reply
            # And later campaigns leave her out from the start.
            autumn = campaigns.create(prt.store, name="autumn", sender="tx", template="news", segment="all")
            assert campaigns.start(prt.store, autumn) == 1
    finally:
        prt.close()
