"""Outgoing messages: MIME structure, stable Message-ID, VERP, one-click unsubscribe, DKIM; relay URLs."""

from __future__ import annotations

import email
import subprocess
from datetime import UTC
from email.policy import default

import dkim
import pytest

from mailflow.errors import UsageError
from mailflow.mail import message_ids, tokens
from mailflow.outbound import mime
from mailflow.outbound.senders import Sender, check_sender, parse_relay_url
from mailflow.outbound.templates import Rendered

pytestmark = pytest.mark.pure

SECRET = b"test-secret"


def sender(**kw) -> Sender:
    base = dict(
        name="news", from_email="news@example.org", from_name="Example News", relay_url="smtp://127.0.0.1:2525?tls=none"
    )
    base.update(kw)
    return Sender(**base)


def test_campaign_mail_is_multipart_with_stable_id_verp_and_one_click_unsubscribe():
    r = Rendered("Hello Ann", "<p>Hello <b>Ann</b></p>", "Hello Ann\n")
    out = mime.build(
        job_id="job-123",
        sender=sender(),
        to="ann@example.net",
        rendered=r,
        secret=SECRET,
        campaign_id="camp-9",
        unsubscribe_base_url="https://mail.example.org/u",
    )
    again = mime.build(
        job_id="job-123", sender=sender(), to="ann@example.net", rendered=r, secret=SECRET, campaign_id="camp-9"
    )
    msg = email.message_from_bytes(out.data, policy=default)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg["Message-ID"] == "<job-123@example.org>" == out.message_id == again.message_id
    assert message_ids.job_from_message_id(msg["Message-ID"]) == "job-123"
    assert msg["From"] == "Example News <news@example.org>"
    assert tokens.job_from_verp(SECRET, out.mail_from) == "job-123"
    assert out.mail_from.startswith("bounces+") and out.mail_from.endswith("@example.org")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    https, mailto = [t.strip(" <>") for t in msg["List-Unsubscribe"].split(",")]
    token = https.rsplit("/", 1)[1]
    assert tokens.verify(SECRET, token) == "camp-9:ann@example.net"
    assert mailto == f"mailto:unsubscribe+{token}@example.org"


def test_transactional_mail_has_no_unsubscribe_headers_and_html_only_gets_a_text_part():
    out = mime.build(
        job_id="j", sender=sender(), to="a@example.net", rendered=Rendered("S", "<p>Hi<br>there</p>", ""), secret=SECRET
    )
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
    pub = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"], input=key, capture_output=True, check=True
    ).stdout
    import base64

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub)
    s = sender(dkim_selector="mf1", dkim_key_pem=key.decode())
    out = mime.build(job_id="j1", sender=s, to="a@example.net", rendered=Rendered("S", "<p>x</p>", "x"), secret=SECRET)
    assert out.data.startswith(b"DKIM-Signature:")
    assert dkim.verify(
        out.data, dnsfunc=lambda name, timeout=5: record if name == b"mf1._domainkey.example.org." else None
    )
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


# -- the fast assembly equals the email package's own MIME classes and generator --------------


def reference_build(*, job_id, sender, to, rendered, secret, campaign_id=None, unsubscribe_base_url=None, now=None):
    """The same message built the slow, obvious way: email.mime objects flattened by BytesGenerator."""
    from email.charset import QP, Charset
    from email.generator import BytesGenerator
    from email.mime.multipart import MIMEMultipart
    from email.mime.nonmultipart import MIMENonMultipart
    from email.policy import compat32
    from email.utils import format_datetime, formataddr
    from io import BytesIO

    utf8 = Charset("utf-8")
    utf8.header_encoding = utf8.body_encoding = QP

    def part(body, subtype):
        p = MIMENonMultipart("text", subtype)
        p.set_payload(body, utf8)
        return p

    text = rendered.text or mime._text_from_html(rendered.html)
    if rendered.html:
        msg = MIMEMultipart("alternative", boundary=mime._boundary(job_id, text, rendered.html))
        msg.attach(part(text, "plain"))
        msg.attach(part(rendered.html, "html"))
    else:
        msg = part(text, "plain")
    msg["From"] = formataddr((sender.from_name or "", sender.from_email), "utf-8")
    msg["To"] = to
    msg["Subject"] = mime._header(rendered.subject)
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = mime.message_id(job_id, sender.domain)
    if campaign_id is not None:
        token = mime.unsubscribe_token(secret, to, campaign_id)
        targets = [f"<mailto:unsubscribe+{token}@{sender.domain}>"]
        if unsubscribe_base_url:
            targets.insert(0, f"<{unsubscribe_base_url.rstrip('/')}/{token}>")
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["List-Unsubscribe"] = ", ".join(targets)
        msg["X-Mailflow-Campaign"] = campaign_id
    buf = BytesIO()
    BytesGenerator(buf, mangle_from_=False, policy=compat32.clone(linesep="\r\n")).flatten(msg)
    return buf.getvalue()


def random_text(rnd, n):
    pieces = ["\n.", "\nFrom me", "  \n", "x" * 120, "ü", "€", "😀", "\t", "=", "\r\n", "\r", " ", "a", "b", "."]
    return "".join(rnd.choice(pieces) for _ in range(n))


def test_messages_are_byte_for_byte_what_the_email_package_generates():
    import random
    from datetime import datetime

    rnd = random.Random(20261128)
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    for i in range(400):
        s = sender(from_name=rnd.choice(["", "News", "Ünïcode Nâme", 'A, B "q"', "n" * 90]))
        html = rnd.choice([None, "<p>" + random_text(rnd, rnd.randint(0, 200)) + "</p>"])
        rendered = Rendered(
            rnd.choice(["Hello", "Sübject ü", "s" * 150, "tab\there", " padded "]),
            html,
            rnd.choice([None, random_text(rnd, rnd.randint(1, 200))])
            if html
            else random_text(rnd, rnd.randint(1, 200)),
        )
        kw = dict(
            job_id=f"0190c0de-0000-7000-8000-{i:012d}",
            sender=s,
            to="bob@example.net",
            rendered=rendered,
            secret=SECRET,
            campaign_id=rnd.choice([None, "camp-1"]),
            unsubscribe_base_url=rnd.choice([None, "https://mail.example.org/u"]),
            now=now,
        )
        assert mime.build(**kw).data == reference_build(**kw), kw


def test_a_body_that_quotes_the_boundary_gets_another_one():
    r = Rendered("s", "<p>=_mailflow_job-1</p>", "see =_mailflow_job-1 and =_mailflow_job-1_")
    data = mime.build(job_id="job-1", sender=sender(), to="a@example.net", rendered=r, secret=SECRET).data
    msg = email.message_from_bytes(data, policy=default)
    assert msg.get_boundary() == "=_mailflow_job-1__"
    assert [p.get_content() for p in msg.iter_parts()] == [r.text, r.html]


@pytest.mark.parametrize("to", ["a b@example.net", "a@example.net>\r\nRCPT TO:<x@example.org"])
def test_an_address_that_would_break_the_envelope_is_refused(to):
    with pytest.raises(ValueError, match="envelope address"):
        mime.build(job_id="j", sender=sender(), to=to, rendered=Rendered("s", None, "t"), secret=SECRET)
