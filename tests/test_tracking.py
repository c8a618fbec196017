"""Open and click tracking end to end: a tracked campaign sent by the queuer and a worker to an SMTP
sink, its pixel and links fetched from `mailflow web`, and what is recorded (web/tracking.py,
outbound/engagement.py; the decisions themselves are tests/test_tracking_rules.py)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from html import unescape
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from mailflow.config import Settings
from mailflow.infra.services import connect, pool_conninfo
from mailflow.infra.tenancy import Scope
from mailflow.mail import tracking
from mailflow.outbound import campaigns, segments, sending, streams, templates
from mailflow.outbound.contacts import import_csv_text
from mailflow.outbound.senders import Sender
from mailflow.projectors.counters import counters
from mailflow.projectors.facts import Facts
from mailflow.runtime.wiring import Runtime
from mailflow.tenants import registry
from mailflow.testing.sink import Sink, SinkServer
from mailflow.web.tracking import PIXEL_GIF

from . import test_outbound_pipeline as pipeline
from .api_fixtures import ApiServer, serve_in_thread
from .conftest import wait_until

pytestmark = pytest.mark.process

BASE = "https://mail.example.org"
DESKTOP = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
HTML = (
    '<html><body><p>Hi {{ name }}</p><a href="https://shop.example/a?x=1&amp;y=2">A</a> '
    '<a href="https://shop.example/b">B</a> <a href="https://shop.example/c">C</a> '
    '<a href="{{ unsubscribe_url }}">unsubscribe</a></body></html>'
)
TEXT = "Hi {{ name }}, see https://shop.example/a?x=1&y=2 and https://shop.example/b.\nStop: {{ unsubscribe_url }}\n"
URL_A, URL_B, URL_C = "https://shop.example/a?x=1&y=2", "https://shop.example/b", "https://shop.example/c"


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    """The API's test settings, with tracking and unsubscribe links on BASE and a quick queuer."""
    return api_settings.model_copy(
        update={
            "unsubscribe_base_url": f"{BASE}/unsubscribe",
            "tracking_base_url": BASE,
            "queuer_interval_s": 0.02,
        }
    )


@dataclass
class Sent:
    job_id: uuid.UUID
    html: str
    text: str


def _part(msg, subtype: str) -> str:
    for part in msg.walk():
        if part.get_content_type() == f"text/{subtype}":
            return part.get_content()
    return ""


def send(api: ApiServer, tenant: str, *, tracking_on: bool | None, tenant_default: bool = False) -> dict[str, Sent]:
    """A campaign to two contacts and one transactional message of `tenant`, through a queuer and a
    worker to a sink: what each address received."""
    op = api.rt.store
    if tenant != "default" and tenant not in {t.id for t in _tenants(api)}:
        registry.create(op, tenant)
    if tenant_default:
        registry.set_tracking(op, tenant, True)
    store = op.for_tenant(tenant)
    sink = Sink()
    with SinkServer(sink) as server:
        sending.save_sender(store, Sender("news", "news@example.org", "News", server.url))
        templates.save(store, templates.Template("letter", "Hello {{ name }}", HTML, TEXT))
        import_csv_text(store, "email,name\nann@example.net,Ann\nbob@example.net,Bob\n")
        segments.define(store, "all", {})
        cid = campaigns.create(
            store, name="spring", sender="news", template="letter", segment="all", tracking=tracking_on
        )
        campaigns.start(store, cid)
        sending.send_transactional(
            store, sender="news", template="letter", to="tx@example.net", variables={"name": "T"}
        )
        run_pipeline(api, lambda: len(sink.received) >= 3)
    got = {}
    with connect(api.rt.settings.database_url) as c:
        jobs = dict(c.execute("SELECT email, id FROM jobs WHERE tenant = %s", (tenant,)).fetchall())
    for msg in sink.received:
        to = str(msg["To"])
        got[to] = Sent(jobs[to], _part(msg, "html"), _part(msg, "plain"))
    return got


def _tenants(api: ApiServer):
    with api.rt.connect() as conn:
        return registry.listing(conn)


def run_pipeline(api: ApiServer, until) -> None:
    """The queuer and a worker whose signing key is the served app's (its tokens verify there)."""
    rt = api.rt
    pipeline.run_pipeline(rt, rt.settings, until, secret=rt.keyring.signing_key)


def hrefs(html: str) -> list[str]:
    return [unescape(h) for h in re.findall(r'href="([^"]*)"', html)]


def pixel_of(html: str) -> str:
    [src] = re.findall(r'<img src="([^"]*)"', html)
    return unescape(src)


def local(api: ApiServer, url: str) -> str:
    """A tracking URL of a message, as served by the test's `mailflow web`."""
    assert url.startswith(BASE + "/t/"), url
    return api.url + url[len(BASE) :]


def aged(api: ApiServer, url: str, seconds: float = 60.0) -> str:
    """The same pixel or link URL signed as if the message had been sent `seconds` ago."""
    parts = urlsplit(url)
    sent = tracking.verify_sent(api.rt.keyring.verifying_keys, parts.path.rsplit("/", 1)[1])
    tok, key = sent.token, api.rt.keyring.signing_key
    at = sent.sent_at - int(seconds)
    if tok.link is None:
        return local(api, tracking.open_url(BASE, key, tok.tenant, tok.job_id, sent_at=at))
    [target] = parse_qs(parts.query)["u"]
    return local(
        api,
        tracking.click_url(BASE, key, tok.tenant, tok.job_id, sent_at=at, links=sent.links, link=tok.link, url=target),
    )


def engagement(api: ApiServer, tenant: str, job_id: uuid.UUID, at_least: int = 0) -> list[tuple[str, dict]]:
    """The opens and clicks on the job's stream in `tenant` (waiting for `at_least` of them: a
    response waits for its recording only so long)."""

    def read() -> list[tuple[str, dict]]:
        events = api.rt.store.for_tenant(tenant).read_stream(streams.job(job_id))
        return [(e.type, e.data) for e in events if e.type in ("MessageOpened", "LinkClicked")]

    if at_least:
        wait_until(lambda: len(read()) >= at_least, timeout=10, what="the opens and clicks to be recorded")
    return read()


def fetch(url: str, agent: str | None = DESKTOP, **headers: str) -> httpx.Response:
    if agent is not None:
        headers["User-Agent"] = agent
    with httpx.Client(timeout=10, follow_redirects=False) as client:
        if agent is None:
            client.headers.pop("User-Agent", None)
        return client.get(url, headers=headers)


# --- Sending -------------------------------------------------------------------------------------


def test_a_tracked_campaign_has_its_links_rewritten_and_the_pixel_and_the_unsubscribe_link_stays(api):
    got = send(api, "acme", tracking_on=True)
    ann = got["ann@example.net"]
    links = hrefs(ann.html)
    assert len(links) == 4
    assert all(link.startswith(f"{BASE}/t/c/") for link in links[:3])
    assert links[3].startswith(f"{BASE}/unsubscribe/")  # never rewritten
    assert [parse_qs(urlsplit(link).query)["u"] for link in links[:3]] == [[URL_A], [URL_B], [URL_C]]
    assert pixel_of(ann.html).startswith(f"{BASE}/t/o/")
    text_links = re.findall(r"https://\S+", ann.text)
    assert text_links[0].startswith(f"{BASE}/t/c/") and text_links[1].rstrip(".").startswith(f"{BASE}/t/c/")
    assert text_links[2].startswith(f"{BASE}/unsubscribe/")
    # The text part's links share the html part's indexes: the same URL, the same link.
    assert text_links[0] == links[0] and text_links[1].rstrip(".") == links[1]
    assert "shop.example" not in ann.text.replace("%2F", "/").split("u=")[0]
    # The transactional message of the same tenant is never tracked.
    tx = got["tx@example.net"]
    assert hrefs(tx.html)[:3] == [URL_A, URL_B, URL_C] and "<img" not in tx.html
    assert URL_A in tx.text


def test_an_untracked_campaign_is_sent_as_rendered(api):
    got = send(api, "acme", tracking_on=None)  # the tenant's default: off
    for sent in got.values():
        assert hrefs(sent.html)[:3] == [URL_A, URL_B, URL_C]
        assert "/t/" not in sent.html and "/t/" not in sent.text and "<img" not in sent.html


def test_the_tenants_default_turns_tracking_on_for_its_campaigns_but_not_transactional_mail(api):
    got = send(api, "acme", tracking_on=None, tenant_default=True)
    assert hrefs(got["bob@example.net"].html)[0].startswith(f"{BASE}/t/c/")
    assert "<img" not in got["tx@example.net"].html


# --- Opens ---------------------------------------------------------------------------------------


def test_a_persons_two_opens_are_two_events_one_unique_open(api):
    got = send(api, "acme", tracking_on=True)
    ann = got["ann@example.net"]
    url = aged(api, pixel_of(ann.html))
    for _ in range(2):
        res = fetch(url)
        assert res.status_code == 200 and res.content == PIXEL_GIF
        assert res.headers["content-type"] == "image/gif" and res.headers["cache-control"].startswith("no-store")
        assert "set-cookie" not in res.headers
    assert (
        engagement(api, "acme", ann.job_id, 2)
        == [("MessageOpened", {"job_id": str(ann.job_id), "machine": False, "reason": "human"})] * 2
    )
    assert unique_and_total(api, ann.job_id) == {"opened": 2, "opened_unique": 1, "machine_opens": 0}


def unique_and_total(api: ApiServer, job_id: uuid.UUID) -> dict[str, int]:
    """The counters (projectors/counters.py) of the message's facts, after the facts projection."""
    op = api.rt.store
    op.sync()  # positions for every committed event (the facts need them)
    events = [e for e in op.read_all(0, 10_000) if e.stream.endswith(streams.job(job_id))]
    with connect(pool_conninfo(op.pool), scope=Scope.operator()) as conn, conn.transaction():
        Facts().apply(conn, events)
        rows = conn.execute(
            "SELECT kind, count(*) AS n, count(*) FILTER (WHERE human) AS human,"
            " count(*) FILTER (WHERE human AND first) AS uniq, 0 AS latency_ms_sum, 0 AS latency_n"
            " FROM facts WHERE job_id = %s AND kind = 'opened' GROUP BY kind",
            (job_id,),
        ).fetchall()
    cols = ("kind", "n", "human", "uniq", "latency_ms_sum", "latency_n")
    c = counters([dict(zip(cols, r)) for r in rows])
    return {k: c.get(k, 0) for k in ("opened", "opened_unique", "machine_opens")}


@pytest.mark.parametrize(
    ("agent", "forwarded", "reason"),
    [
        ("Mozilla/5.0", None, "apple_mpp"),  # MPP's bare user agent
        (DESKTOP, "17.58.1.20", "apple_mpp"),  # from Apple's network
        ("Mozilla/5.0 (compatible; Barracuda Sentinel; +https://barracuda.com)", None, "scanner_user_agent"),
        (None, None, "no_user_agent"),
    ],
    ids=["mpp-agent", "mpp-network", "scanner", "no-agent"],
)
def test_prefetches_and_scanners_are_recorded_as_machine_opens(api, settings, agent, forwarded, reason):
    got = send(api, "acme", tracking_on=True)
    bob = got["bob@example.net"]
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    if forwarded:  # the forwarded address is believed only from a trusted proxy: serve one that trusts us
        rt = Runtime(api.rt.settings.model_copy(update={"api_trusted_proxies": ["127.0.0.1/32"]}), operator=True)
        try:
            for server in serve_in_thread(rt):
                res = fetch(server.url + local(api, pixel_of(bob.html))[len(api.url) :], agent, **headers)
        finally:
            rt.close()
    else:
        res = fetch(aged(api, pixel_of(bob.html)), agent)
    assert res.status_code == 200
    assert engagement(api, "acme", bob.job_id, 1) == [
        ("MessageOpened", {"job_id": str(bob.job_id), "machine": True, "reason": reason})
    ]
    assert unique_and_total(api, bob.job_id) == {"opened": 0, "opened_unique": 0, "machine_opens": 1}


def test_a_forwarded_address_from_an_untrusted_peer_is_not_believed(api):
    got = send(api, "acme", tracking_on=True)
    bob = got["bob@example.net"]
    fetch(aged(api, pixel_of(bob.html)), DESKTOP, **{"X-Forwarded-For": "17.58.1.20"})
    assert engagement(api, "acme", bob.job_id, 1)[0][1]["reason"] == "human"


# --- Clicks --------------------------------------------------------------------------------------


def test_a_click_redirects_to_exactly_the_original_url_and_is_recorded(api):
    got = send(api, "acme", tracking_on=True)
    ann = got["ann@example.net"]
    res = fetch(aged(api, hrefs(ann.html)[0]))
    assert res.status_code == 302 and res.headers["location"] == URL_A
    res = fetch(aged(api, hrefs(ann.html)[2], seconds=3600))
    assert res.status_code == 302 and res.headers["location"] == URL_C
    assert engagement(api, "acme", ann.job_id, 2) == [
        ("LinkClicked", {"job_id": str(ann.job_id), "link": 0, "machine": False, "reason": "human"}),
        ("LinkClicked", {"job_id": str(ann.job_id), "link": 2, "machine": False, "reason": "human"}),
    ]


def test_a_scanner_clicking_every_link_within_seconds_of_delivery_is_flagged(api):
    got = send(api, "acme", tracking_on=True)
    ann = got["ann@example.net"]
    for link in hrefs(ann.html)[:3]:  # as sent: the token's send time is now
        assert fetch(local(api, link)).status_code == 302  # the person (or scanner) still gets the page
    recorded = engagement(api, "acme", ann.job_id, 3)
    assert [d["link"] for _, d in recorded] == [0, 1, 2]
    assert all(d["machine"] for _, d in recorded) and {d["reason"] for _, d in recorded} == {"too_fast"}


def test_a_burst_over_every_link_later_on_is_flagged_as_a_scanner(api):
    got = send(api, "acme", tracking_on=True)
    ann = got["ann@example.net"]
    for link in hrefs(ann.html)[:3]:
        assert fetch(aged(api, link, seconds=120)).status_code == 302
    reasons = [d["reason"] for _, d in engagement(api, "acme", ann.job_id, 3)]
    assert reasons[-1] == "every_link"


def test_a_tampered_token_is_400_and_never_a_redirect(api):
    got = send(api, "acme", tracking_on=True)
    link = local(api, hrefs(got["ann@example.net"].html)[0])
    path, _, query = link.partition("?")
    token = path.rsplit("/", 1)[1]
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    for broken in (path.replace(token, flipped), path[:-5], path.replace("/t/c/", "/t/o/")):
        res = fetch(f"{broken}?{query}")
        assert res.status_code == 400 and "location" not in res.headers
        assert res.content in (PIXEL_GIF, b"This link is not valid.")
    pixel = local(api, pixel_of(got["ann@example.net"].html))
    res = fetch(pixel[:-3])
    assert res.status_code == 400 and res.content == PIXEL_GIF
    assert fetch(pixel.replace("/t/o/", "/t/c/") + "?u=" + URL_A).status_code == 400  # the pixel's token is no link's
    assert engagement(api, "acme", got["ann@example.net"].job_id) == []


def test_another_links_url_or_a_link_index_not_in_the_message_is_404(api):
    got = send(api, "acme", tracking_on=True)
    ann = got["ann@example.net"]
    first = aged(api, hrefs(ann.html)[0])
    path = first.partition("?")[0]
    for url in (URL_B, "https://evil.example/", URL_A + "#x", ""):
        res = httpx.get(path, params={"u": url}, headers={"User-Agent": DESKTOP}, follow_redirects=False)
        assert res.status_code == 404 and "location" not in res.headers, url
    assert httpx.get(path, headers={"User-Agent": DESKTOP}).status_code == 404  # no URL at all
    sent = tracking.verify_sent(api.rt.keyring.verifying_keys, path.rsplit("/", 1)[1])
    key, tok = api.rt.keyring.signing_key, sent.token
    beyond = tracking.click_url(
        BASE, key, tok.tenant, tok.job_id, sent_at=sent.sent_at, links=sent.links, link=sent.links, url=URL_A
    )
    res = fetch(local(api, beyond))
    assert res.status_code == 404 and "location" not in res.headers
    assert engagement(api, "acme", ann.job_id) == []


# --- Tenants -------------------------------------------------------------------------------------


def test_a_token_of_one_tenant_never_records_on_another(api):
    acme = send(api, "acme", tracking_on=True)["ann@example.net"]
    registry.create(api.rt.store, "rival")
    url = aged(api, pixel_of(acme.html))
    assert fetch(url).status_code == 200
    assert len(engagement(api, "acme", acme.job_id, 1)) == 1
    assert engagement(api, "rival", acme.job_id) == []
    # A genuine signature naming the other tenant for this job (the keyring signs every tenant's
    # tokens) still finds no job of the other tenant: nothing is recorded anywhere.
    sent = tracking.verify_sent(api.rt.keyring.verifying_keys, urlsplit(url).path.rsplit("/", 1)[1])
    forged = tracking.open_url(BASE, api.rt.keyring.signing_key, "rival", acme.job_id, sent_at=sent.sent_at)
    assert fetch(local(api, forged)).status_code == 200
    assert engagement(api, "rival", acme.job_id) == []
    assert len(engagement(api, "acme", acme.job_id)) == 1
    with connect(api.rt.settings.database_url) as c:
        count = c.execute("SELECT count(*) FROM events WHERE type = 'MessageOpened'").fetchone()[0]
    assert count == 1


# --- PostgreSQL away -----------------------------------------------------------------------------


def test_with_the_database_away_a_click_still_redirects_and_the_miss_is_logged_once(api, monkeypatch):
    import psycopg
    import structlog

    got = send(api, "acme", tracking_on=True)
    ann = got["ann@example.net"]

    def down(*args, **kwargs):
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr("mailflow.outbound.engagement.record_click", down)
    with structlog.testing.capture_logs() as logs:
        for link in hrefs(ann.html)[:3]:
            res = fetch(aged(api, link))
            assert res.status_code == 302 and res.headers["location"] in (URL_A, URL_B, URL_C)
        wait_until(lambda: any(e["event"] == "web.tracking_unrecorded" for e in logs), what="the miss to be logged")
    misses = [e for e in logs if e["event"] == "web.tracking_unrecorded"]
    assert len(misses) == 1
    assert "shop.example" not in repr(misses) and "127.0.0.1" not in repr(misses) and "Mozilla" not in repr(misses)
