"""Consent scopes: an unsubscribe stops campaign mail and not transactional mail; a bounce or a
complaint stops both. Messages carry unsubscribe_url and preferences_url for templates; the
preferences page shows what an address receives and records the person's own choice."""

from __future__ import annotations

import re
import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient prefers httpx2 and warns about httpx
    from starlette.testclient import TestClient

from mailflow.consumers import inline
from mailflow.infra.services import connect
from mailflow.mail import tokens
from mailflow.outbound import campaigns, consent, segments, sending, streams, suppressions, templates
from mailflow.outbound.contacts import import_csv_text
from mailflow.outbound.events import ContactStatusChanged
from mailflow.runtime.wiring import Runtime
from mailflow.testing.sink import Sink, SinkServer
from mailflow.web.app import create_app

from .test_outbound_pipeline import SECRET as PIPELINE_SECRET
from .test_outbound_pipeline import run_pipeline, setup_catalog

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "transactional, status, suppression, allowed",
    [
        (False, "active", None, True),
        (False, "unsubscribed", None, False),
        (True, "unsubscribed", None, True),  # a receipt still goes to someone who left the newsletter
        (True, None, "unsubscribe", True),  # ... also without a contact
        (False, None, "unsubscribe", False),
        (True, "bounced", None, False),  # a hard bounce stops everything
        (True, "complained", None, False),
        (True, "active", "bounce", False),
        (True, None, "manual", False),
        (True, None, None, True),
    ],
)
def test_what_each_kind_of_mail_needs(transactional, status, suppression, allowed):
    why = consent.may_send(transactional=transactional, contact_status=status, suppression=suppression)
    assert (why is None) == allowed
    if why is not None:
        assert (suppression or status) in why


def test_preferences_tokens_name_tenant_and_address_and_nothing_else_passes():
    token = consent.preferences_token(b"k", "acme", "ann@example.net")
    assert consent.read_preferences_token([b"old", b"k"], token) == ("acme", "ann@example.net")
    for bad in (token[:-2] + "xx", tokens.sign(b"k", "campaign:ann@example.net"), tokens.sign(b"k", "pref:acme")):
        with pytest.raises(tokens.BadToken):
            consent.read_preferences_token(b"k", bad)
    assert (
        consent.preferences_base("https://m.example.org/u/unsubscribe?x=1", None) == "https://m.example.org/preferences"
    )
    assert consent.preferences_base(None, "https://p.example.org/prefs/") == "https://p.example.org/prefs"
    assert consent.preferences_base(None, None) is None


def test_an_unsubscribed_contact_gets_receipts_not_campaigns_and_links_reach_the_template(settings, db_url):
    base = "https://mail.example.org/unsubscribe"
    s = settings.model_copy(update={"unsubscribe_base_url": base, "retry_base_s": 0.2, "queuer_interval_s": 0.02})
    prt = Runtime(s, pool_size=20)
    sink = Sink()

    def done(n: int):
        def check() -> bool:
            with connect(db_url) as c:
                return c.execute("SELECT count(*) FROM jobs WHERE state IN ('completed', 'failed')").fetchone()[0] == n

        return check

    try:
        with SinkServer(sink) as server:
            setup_catalog(prt.store, server.url)
            import_csv_text(prt.store, "email,name\nann@example.net,Ann\nbob@example.net,Bob\nbea@example.net,Bea\n")
            segments.define(prt.store, "all", {})
            body = "Hi {{ name }}. Leave: {{ unsubscribe_url }} Settings: {{ preferences_url }}"
            templates.save(prt.store, templates.Template("news", "News", "", body))
            receipt = "Receipt for {{ email }}. Settings: {{ preferences_url }} {{ unsubscribe_url or '-' }}"
            templates.save(prt.store, templates.Template("receipt", "Receipt", "", receipt))
            with inline.writing(prt.store) as w:
                ann, bea = (prt.store.subject(w.conn, e) for e in ("ann@example.net", "bea@example.net"))
                w.record(
                    [
                        (
                            streams.contact(ann),
                            ContactStatusChanged(subject=ann, status="unsubscribed", reason="link").to_new(),
                        ),
                        (
                            streams.contact(bea),
                            ContactStatusChanged(subject=bea, status="bounced", reason="550").to_new(),
                        ),
                    ]
                )
            suppressions.add(prt.store, "carl@example.net", "unsubscribe", "")
            cid = campaigns.create(prt.store, name="spring", sender="tx", template="news", segment="all")
            # Ann is left out of the snapshot (she unsubscribed), Bea too (bounced).
            assert campaigns.start(prt.store, cid) == 1
            for to in ("ann@example.net", "bea@example.net", "carl@example.net"):
                sending.send_transactional(prt.store, sender="tx", template="receipt", to=to)
            run_pipeline(prt, s, done(4))
            with sink.lock:
                got = {(str(m["To"]), str(m["Subject"])): m for m in sink.received}
            assert set(got) == {
                ("bob@example.net", "News"),
                ("ann@example.net", "Receipt"),
                ("carl@example.net", "Receipt"),
            }
            with connect(db_url) as c:
                bea = c.execute("SELECT state, last_reply FROM jobs WHERE email = 'bea@example.net'").fetchone()
            assert bea == ("failed", "contact is bounced")

            news = got[("bob@example.net", "News")].get_content()
            leave = re.search(r"Leave: (\S+)", news).group(1)
            prefs = re.search(r"Settings: (\S+)", news).group(1)
            assert leave.startswith(base + "/") and prefs.startswith("https://mail.example.org/preferences/")
            receipt_text = got[("ann@example.net", "Receipt")].get_content()
            assert "https://mail.example.org/preferences/" in receipt_text and receipt_text.rstrip().endswith("-")

            with TestClient(create_app(prt, secret=PIPELINE_SECRET)) as web:
                path = prefs.replace("https://mail.example.org", "")
                page = web.get(path)
                assert page.status_code == 200 and "bob@example.net</strong> receives newsletters" in page.text
                assert "Stop campaign mail" in page.text
                left = web.post(path, data={"campaign_mail": "no"})
                assert left.status_code == 200 and "receives no campaign mail" in left.text
                assert "still sent" in left.text
                back = web.post(path, data={"campaign_mail": "yes"})
                assert "receives newsletters" in back.text
                assert web.get(path[:-3] + "abc").status_code == 400
            with prt.connect() as c:
                bob = f"default/contact-{prt.store.subject(c, 'bob@example.net')}"
            with connect(db_url) as c:
                rows = c.execute(
                    "SELECT type, metadata->>'actor', data->>'reason' FROM events WHERE stream = %s ORDER BY version",
                    (bob,),
                ).fetchall()
            assert [t for t, _, _ in rows][-2:] == ["ContactStatusChanged", "ContactReactivated"]
            assert rows[-1][1] == consent.PREFERENCES_ACTOR and "asked" in rows[-1][2]
    finally:
        prt.close()
