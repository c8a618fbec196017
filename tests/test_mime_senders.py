"""Outgoing messages: MIME structure, stable Message-ID, VERP, one-click unsubscribe, DKIM; relay URLs."""

from __future__ import annotations

import email
import subprocess
from email.policy import default

import dkim
import pytest

from mailflow.errors import UsageError
from mailflow.outbound import mime, tokens
from mailflow.outbound.senders import Sender, check_sender, parse_relay_url
from mailflow.outbound.templates import Rendered

SECRET = b"test-secret"


def sender(**kw) -> Sender:
    base = dict(name="news", from_email="news@example.org", from_name="Example News", relay_url="smtp://127.0.0.1:2525?tls=none")
    base.update(kw)
    return Sender(**base)


def test_campaign_mail_is_multipart_with_stable_id_verp_and_one_click_unsubscribe():
    r = Rendered("Hello Ann", "<p>Hello <b>Ann</b></p>", "Hello Ann\n")
    out = mime.build(job_id="job-123", sender=sender(), to="ann@example.net", rendered=r, secret=SECRET,
                     campaign_id="camp-9", unsubscribe_base_url="https://mail.example.org/u")
    again = mime.build(job_id="job-123", sender=sender(), to="ann@example.net", rendered=r, secret=SECRET, campaign_id="camp-9")
    msg = email.message_from_bytes(out.data, policy=default)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg["Message-ID"] == "<job-123@example.org>" == out.message_id == again.message_id
    assert mime.job_from_message_id(msg["Message-ID"]) == "job-123"
    assert msg["From"] == "Example News <news@example.org>"
    assert tokens.job_from_verp(SECRET, out.mail_from) == "job-123"
    assert out.mail_from.startswith("bounces+") and out.mail_from.endswith("@example.org")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    https, mailto = [t.strip(" <>") for t in msg["List-Unsubscribe"].split(",")]
    token = https.rsplit("/", 1)[1]
    assert tokens.verify(SECRET, token) == "camp-9:ann@example.net"
    assert mailto == f"mailto:unsubscribe+{token}@example.org"


def test_transactional_mail_has_no_unsubscribe_headers_and_html_only_gets_a_text_part():
    out = mime.build(job_id="j", sender=sender(), to="a@example.net", rendered=Rendered("S", "<p>Hi<br>there</p>", ""), secret=SECRET)
    msg = email.message_from_bytes(out.data, policy=default)
    assert msg["List-Unsubscribe"] is None
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n").strip() == "Hi\nthere"


def test_forged_tokens_are_rejected():
    good = tokens.sign(SECRET, "job-1")
    with pytest.raises(tokens.BadToken):
        tokens.verify(b"other-secret", good)
    with pytest.raises(tokens.BadToken):
        tokens.job_from_verp(SECRET, "bounces+" + good[:-2] + "xx@example.org")


def test_dkim_signature_verifies_against_the_public_key():
    key = subprocess.run(["openssl", "genrsa", "2048"], capture_output=True, check=True).stdout
    pub = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=key, capture_output=True, check=True).stdout
    import base64

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub)
    s = sender(dkim_selector="mf1", dkim_key_pem=key.decode())
    out = mime.build(job_id="j1", sender=s, to="a@example.net", rendered=Rendered("S", "<p>x</p>", "x"), secret=SECRET)
    assert out.data.startswith(b"DKIM-Signature:")
    assert dkim.verify(out.data, dnsfunc=lambda name, timeout=5: record if name == b"mf1._domainkey.example.org." else None)
    tampered = out.data.replace(b"Subject: S", b"Subject: T")
    assert not dkim.verify(tampered, dnsfunc=lambda name, timeout=5: record)


@pytest.mark.parametrize(
    "url,expected",
    [
        ("smtp://relay.example.org", ("relay.example.org", 587, "starttls", None)),
        ("smtp://u%40x:p%2Fw@relay.example.org:25", ("relay.example.org", 25, "opportunistic", "u@x")),
        ("smtp://relay.example.org:25?tls=starttls", ("relay.example.org", 25, "starttls", None)),
        ("smtps://relay.example.org", ("relay.example.org", 465, "tls", None)),
    ],
)
def test_relay_urls_parse_with_sensible_tls_defaults(url, expected):
    r = parse_relay_url(url)
    assert (r.host, r.port, r.tls, r.username) == expected


@pytest.mark.parametrize("url", ["http://x", "smtp://", "smtp://h?tls=maybe", "smtp://h?colour=red", "smtp://h:99999"])
def test_bad_relay_urls_are_one_clear_error(url):
    with pytest.raises(UsageError, match="relay URL"):
        parse_relay_url(url)


def test_sender_validation():
    assert check_sender(sender(from_email="News@Example.ORG")).from_email.endswith("@example.org")
    with pytest.raises(UsageError, match="from address"):
        check_sender(sender(from_email="nope"))
    with pytest.raises(UsageError, match="both a selector and a private key"):
        check_sender(sender(dkim_selector="s1"))


def test_non_ascii_headers_and_bodies_survive_the_round_trip_in_7bit_safe_form():
    r = Rendered("Grüße, Zoë – 10 % off", "<p>Hallo Zoë, schöne Grüße</p>", "Hallo Zoë " + "x" * 200)
    out = mime.build(job_id="j", sender=sender(from_name="Nëws"), to="z@example.net", rendered=r, secret=SECRET)
    assert out.data.isascii()  # 7-bit clean: any relay can carry it
    assert max(len(line) for line in out.data.split(b"\r\n")) <= 78
    msg = email.message_from_bytes(out.data, policy=default)
    assert msg["Subject"] == "Grüße, Zoë – 10 % off" and msg["From"] == "Nëws <news@example.org>"
    assert msg.get_body(("html",)).get_content() == "<p>Hallo Zoë, schöne Grüße</p>"
    assert msg.get_body(("plain",)).get_content().startswith("Hallo Zoë xxx")
