"""Bounce parser and reason classifier (inbound/classify/bounce.py, reasons.py) against the
sisimai corpus (tests/fixtures/corpus/bounces-sisimai, copied from ../shared/corpus) and made-up messages."""

from __future__ import annotations

import email
import email.policy
import json
import random
import time
from pathlib import Path

import pytest

from mailflow.inbound.classify import bounce, reasons

pytestmark = pytest.mark.pure

CORPUS = Path(__file__).resolve().parent / "fixtures" / "corpus" / "bounces-sisimai"  # a copy of ../shared/corpus


def parse_file(name: str) -> bounce.Bounce | None:
    return bounce.parse_bytes((CORPUS / f"{name}.eml").read_bytes())


def message(text: str) -> email.message.Message:
    return email.message_from_string(text.lstrip(), policy=email.policy.compat32)


@pytest.mark.parametrize(
    ("name", "address", "status", "reason", "hard"),
    [
        ("lhost-sendmail-01", "userunknown@bouncehammer.jp", "5.1.1", "userunknown", True),  # RFC 3464 DSN
        ("lhost-postfix-02", "filtered@example.co.jp", "5.2.1", "userunknown", True),  # two recipients
        ("lhost-receivingses-04", "mailboxfull@neko.example.jp", "5.2.2", "mailboxfull", False),  # Action first
        ("lhost-qmail-01", "kijitora@example.ne.jp", "5.5.0", "userunknown", True),  # qmail prose, (#5.5.0)
        ("lhost-exim-01", "kijitora@example.ed.jp", "5.7.0", "blocked", False),  # exim prose
        ("lhost-gmail-01", "userunknown@example.jp", "5.1.1", "userunknown", True),  # address only in the reply
        ("lhost-v5sendmail-05", "kuroneko@example.or.jp", "5.0.912", "hostunknown", True),  # no MIME at all
        ("lhost-messagingserver-03", "sabineko@example.org", "5.7.1", "filtered", False),  # boundary missing
        ("rhost-franceptt-01", "pseudo-local-part-kijitora-nyaaan@orange.fr", "5.1.1", "userunknown", True),
        ("lhost-sendmail-19", "kijitora@ntt.example.ne.jp", "5.2.0", "filtered", False),  # refused after DATA
        ("lhost-exim-06", "kijitora@example.com", "4.0.947", "expired", False),  # no status: x.0.9NN
        ("lhost-einsundeins-02", "kijitora@example.org", "5.0.934", "mesgtoobig", False),  # reason on a later line
        ("lhost-amazonses-10", "bounce@simulator.amazonses.com", "5.1.1", "userunknown", True),  # SES JSON
        ("lhost-amazonses-13", "complaint@simulator.amazonses.com", "2.6.0", "delivered", False),  # SES delivery
        ("rfc3464-28", "kijitora@neko.example.jp", "2.1.5", "delivered", False),  # a delivery report
        ("lhost-exchange2003-05", "kijitora@example.com", "5.0.911", "userunknown", True),  # broken MIME
    ],
)
def test_a_bounce_names_the_recipient_its_status_and_why(
    name: str, address: str, status: str, reason: str, hard: bool
) -> None:
    found = parse_file(name)
    assert found is not None
    recipient = next(r for r in found.recipients if r.address == address)
    assert (recipient.status, recipient.reason, recipient.hard) == (status, reason, hard)


def test_the_remote_mta_is_read_from_the_fields_or_the_prose() -> None:
    dsn, exim, qmail = (parse_file(n) for n in ("lhost-sendmail-01", "lhost-exim-01", "lhost-qmail-01"))
    assert dsn is not None and exim is not None and qmail is not None
    assert dsn.recipients[0].remote_mta == "mx.bouncehammer.jp"
    assert exim.recipients[0].remote_mta == "mx.example.jp"
    assert qmail.recipients[0].remote_mta == "192.0.2.32"


def test_a_bounce_gives_one_row_per_recipient_in_the_order_of_the_report() -> None:
    found = parse_file("lhost-v5sendmail-05")
    assert found is not None
    assert [r.address for r in found.recipients] == [
        "kijitora@example.edu",
        "kuroneko@example.or.jp",
        "kijitora@example.org",
        "mikeneko@example.co.jp",
    ]


def test_the_original_message_is_found_in_the_attached_message_or_the_quoted_headers() -> None:
    attached = parse_file("lhost-sendmail-01")
    quoted = parse_file("lhost-qmail-01")
    assert attached is not None and quoted is not None
    assert attached.original.message_id == "<E1C50F1B-1C83-4820-BC36-AC6FBFBE8568@example.org>"
    assert "kijitora@example.org" in attached.original.sender
    assert quoted.original.message_id == "<000000000.9999999999999.JavaMail.postmaster@mailhub>"
    assert quoted.original.subject == "Message"


def test_agreement_with_sisimai_over_the_labelled_bounces_does_not_fall() -> None:
    expected = json.loads((CORPUS / "expected.json").read_text())
    rows = reason_ok = hard_ok = status_ok = 0
    for name, want in expected.items():
        if name.startswith(("arf-", "rfc3834-")):
            continue
        found = parse_file(name)
        got = list(found.recipients) if found else []
        for i, row in enumerate(want):
            rows += 1
            have = got[i] if i < len(got) else None
            reason_ok += have is not None and have.reason == row["reason"]
            hard_ok += have is not None and have.hard == row["hardbounce"]
            status_ok += have is not None and have.status == row["status"]
    assert rows > 350
    assert reason_ok / rows >= 0.915
    assert hard_ok / rows >= 0.95
    assert status_ok / rows >= 0.935


def test_nearly_every_bounce_yields_an_address() -> None:
    names = [p for p in sorted(CORPUS.glob("*.eml")) if not p.name.startswith(("arf-", "rfc3834-"))]
    with_address = sum(1 for p in names if (b := bounce.parse_bytes(p.read_bytes())) and b.recipients)
    assert with_address / len(names) >= 0.99


def test_a_person_answering_is_not_a_bounce() -> None:
    reply = message("""
From: Alice Example <alice@example.com>
To: news@shop.example
Subject: Re: Our December offers
Message-ID: <abc@example.com>
In-Reply-To: <xyz@shop.example>

Thanks, but the user unknown to me sent this. Please stop.

> On Monday you wrote:
> Our December offers
""")
    assert bounce.parse(reply) is None


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        ("Re: Problem with my order", "It was returned to me, the courier said delivery failed. Bob <bob@example.org>"),
        ("Problem with my order", "Hello, my order never arrived. Could you look? carol@example.net"),
        ("Fwd: our failure notice design", "See the attached draft, comments to dave@example.com please."),
    ],
)
def test_a_person_writing_about_failures_is_not_a_bounce(subject: str, body: str) -> None:
    person = message(f"From: Someone <someone@example.org>\nTo: shop@shop.example\nSubject: {subject}\n\n{body}\n")
    assert bounce.parse(person) is None


def test_an_out_of_office_answer_is_not_a_bounce() -> None:
    away = message("""
From: Bob <bob@example.org>
To: news@shop.example
Subject: Out of Office: Our December offers
Auto-Submitted: auto-replied

I am away until Monday with no access to mail; my mailbox is full of holiday photos.
""")
    assert bounce.parse(away) is None


def test_a_minimal_dsn_is_read_from_its_fields() -> None:
    dsn = message("""
From: MAILER-DAEMON@mx.example.net
To: bounces@shop.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

Your message could not be delivered.
--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; <Carol@Example.NET>
Action: failed
Status: 5.2.2
Remote-MTA: dns; in.example.net
Diagnostic-Code: smtp; 552 5.2.2 Mailbox over quota

--b
Content-Type: text/rfc822-headers

Message-ID: <m1@shop.example>
From: news@shop.example
Subject: Hello

--b--
""")
    found = bounce.parse(dsn)
    assert found is not None
    (carol,) = found.recipients
    assert carol.address == "carol@example.net"
    assert (carol.status, carol.reply_code, carol.reason, carol.hard) == ("5.2.2", "552", "mailboxfull", False)
    assert carol.remote_mta == "in.example.net"
    assert found.original.message_id == "<m1@shop.example>"


def test_truncated_and_garbled_bounces_never_raise() -> None:
    rng = random.Random(7)
    files = sorted(CORPUS.glob("*.eml"))[::9]
    for path in files:
        raw = path.read_bytes()
        for cut in (0, 1, len(raw) // 3, len(raw) // 2, len(raw) - 1):
            bounce.parse_bytes(raw[:cut])
        noisy = bytearray(raw)
        for _ in range(40):
            noisy[rng.randrange(len(noisy))] = rng.randrange(256)
        bounce.parse_bytes(bytes(noisy))
    bounce.parse_bytes(bytes(rng.randrange(256) for _ in range(5000)))


def test_the_reason_follows_the_words_before_the_code() -> None:
    assert reasons.reason("5.1.1", "550", "550 5.1.1 <a@b.example>: mailbox is full") == "mailboxfull"
    assert reasons.reason("5.7.1", "550", "550 5.7.1 Recipient address rejected: User unknown") == "userunknown"
    assert reasons.reason("5.1.2", "550", "550 5.1.2 Recipient address rejected") == "hostunknown"
    assert reasons.reason("", "", "", action="delayed") == "expired"
    # "unknown user" means the address only at RCPT TO or under an addressing status
    assert reasons.reason("5.2.0", "550", "550 Unknown user", transcript=">>> RCPT To:<a@b.example>\n<<< 550") == (
        "userunknown"
    )
    assert reasons.reason("5.2.0", "550", "550 Unknown user") == "filtered"
    assert reasons.reason("5.0.0", "550", "550 Unknown user", transcript="after MAIL FROM:<s@x.example>") == "rejected"
    assert reasons.reason("2.1.5", "250", "250 2.1.5 Ok", action="delivered") == "delivered"


def test_only_a_dead_address_is_a_hard_bounce() -> None:
    assert reasons.hard("userunknown", "5.1.1", "550")
    assert reasons.hard("hostunknown", "5.1.2", "550")
    assert reasons.hard("notaccept", "5.3.2", "521")
    assert not reasons.hard("notaccept", "4.0.0", "")
    for soft in ("mailboxfull", "blocked", "spamdetected", "expired", "suspend", "filtered", "rejected"):
        assert not reasons.hard(soft, "5.0.0", "550")


@pytest.mark.parametrize(
    "body",
    [
        b"user@" + b"a" * 200_000,  # an address that never ends
        b"-- " * 100_000,  # a separator line that never ends
        b"Final-Recipient: rfc822; a@b.example\nStatus: 5.1.1\n\n" * 5000,  # thousands of recipients
        b"".join(b"<u%d@b.example>: 550 user unknown\n" % i for i in range(20_000)),
    ],
)
def test_a_hostile_bounce_is_read_quickly_and_bounded(body: bytes) -> None:
    raw = b"From: MAILER-DAEMON@mx.example\nSubject: Undelivered Mail\n\n" + body
    t0 = time.perf_counter()
    found = bounce.parse_bytes(raw)
    assert time.perf_counter() - t0 < 3
    assert found is None or len(found.recipients) <= 500


def test_a_refusal_at_mail_from_without_a_code_gets_the_on_hold_placeholder() -> None:
    assert reasons.pseudo_status("rejected", temporary=False, answered="MAIL") == "5.0.901"
    assert reasons.pseudo_status("requireptr", temporary=True, answered="MAIL") == "4.0.901"
    assert reasons.pseudo_status("rejected", temporary=False, answered="RCPT") == "5.0.918"
    assert reasons.pseudo_status("expired", temporary=False, answered="MAIL") == "5.0.947"
    exim = message("""
From: Mail Delivery System <Mailer-Daemon@mx.shop.example>
To: news@shop.example
Subject: Mail delivery failed: returning message to sender

This message was created automatically by mail delivery software.

  dana@example.edu
    SMTP error from remote mail server after MAIL FROM:<news@shop.example> SIZE=1024:
    550 Unroutable sender address
""")
    found = bounce.parse(exim)
    assert found is not None
    (dana,) = found.recipients
    assert (dana.address, dana.reason, dana.status) == ("dana@example.edu", "rejected", "5.0.901")


def test_a_greeting_refused_without_a_reason_blocks_the_client() -> None:
    said = "SMTP error from remote mail server after initial connection: 554 mx.example.net : go away"
    assert reasons.reason("", "554", said) == "blocked"
    assert reasons.reason("", "554", "SMTP error from remote mail server after RCPT TO: 554 go away") == "undefined"


def test_a_transcript_naming_the_command_outweighs_words_that_only_imply_one() -> None:
    said = (
        "(reason: 550 5.7.1 <m@x.example>: Recipient address rejected: User unknown)\n"
        ">>> DATA\n<<< 550 5.7.1 <m@x.example>: Recipient address rejected: User unknown"
    )
    assert reasons.command(said) == "DATA"
    assert reasons.command("550 5.7.1 <m@x.example>: Recipient address rejected: User unknown") == "RCPT"
    diagnostic = "550 5.7.1 <m@x.example>: Recipient address rejected: User unknown"
    assert reasons.reason("5.7.1", "550", diagnostic, transcript=said) == "filtered"


def test_a_generic_user_unknown_that_does_not_name_the_address_is_a_filter() -> None:
    assert reasons.reason("5.0.0", "550", "smtp; 550 user unknown", address="erin@example.org") == "filtered"
    named = "smtp; 550 <erin@example.org>: User unknown"
    assert reasons.reason("5.0.0", "550", named, address="erin@example.org") == "userunknown"
    assert reasons.reason("5.1.1", "550", "smtp; 550 user unknown", address="erin@example.org") == "userunknown"


def test_new_wordings_name_their_reasons() -> None:
    ptr = "450 service permits 2 unverifyable sending IPs - shop.example is not 192.0.2.1"
    assert reasons.reason("", "450", ptr) == "requireptr"
    assert reasons.reason("", "", "DNS lookup failure: host mx.nowhere.example not found") == "hostunknown"
    assert reasons.reason("", "", "You frank@example.org are not member (cats ML)") == "rejected"
    open_relay = "501 <news@shop.example>... no access from mail server [192.0.2.5] which is an open relay"
    assert reasons.reason("", "501", open_relay) == "blocked"
    assert reasons.reason("4.7.0", "421", "421 4.7.0 deferred due to unexpected volume or user complaints") == (
        "badreputation"
    )
    assert reasons.reason("5.7.0", "554", "554 5.7.0 Header error") == "policyviolation"
    assert reasons.reason("5.7.0", "554", "rejected by the recipient domain: 554 5.7.0 Header error") == "filtered"


def test_a_report_that_only_says_it_will_retry_is_not_marked_temporary() -> None:
    from mailflow.inbound.classify.formats import text

    assert not text.temporary("Delivery has been delayed.\nMessage will be retried for 2 more day(s)")
    assert text.temporary("Message will be retried.\nTechnical details of temporary failure: timeout")


def test_a_status_comment_is_the_diagnostic_of_a_dsn_without_one() -> None:
    dsn = message("""
From: MAILER-DAEMON@mx.shop.example
To: news@shop.example
Subject: Warning: could not send message for past 4 hours
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

Your message has not been delivered yet.
--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.shop.example

Final-Recipient: rfc822; kim@cat.example.net
Action: delayed
Status: 4.0.0 (cat.example.net: host name lookup failure)

Final-Recipient: rfc822; lee@example.org
Action: failed
Status: 5.0.0 (permanent failure)
Diagnostic-Code: smtp; 550 <lee@example.org>: user unknown

--b--
""")
    found = bounce.parse(dsn)
    assert found is not None
    kim, lee = found.recipients
    assert (kim.reason, kim.status) == ("networkerror", "4.0.0")
    assert lee.reason == "userunknown"


def test_a_second_report_saved_after_the_first_in_the_same_file_is_read_too() -> None:
    def report(address: str) -> str:
        return f"""From: MAILER-DAEMON@mx.shop.example
To: news@shop.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

Your message could not be delivered.
--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.shop.example

Final-Recipient: rfc822; {address}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{address}>: User unknown

--b--
"""

    mbox = report("gina@example.org") + "\nFrom MAILER-DAEMON  Thu Apr 29 23:34:45 2015\n" + report("hal@example.org")
    found = bounce.parse(message(mbox))
    assert found is not None
    assert [r.address for r in found.recipients] == ["gina@example.org", "hal@example.org"]
    assert {r.reason for r in found.recipients} == {"userunknown"}


def test_a_list_refusing_a_post_from_a_non_member_is_a_bounce_of_the_post() -> None:
    refusal = message("""
From: cats-admin@lists.example.org
To: news@shop.example
Subject: You news@shop.example are not member (cats ML)
X-MLServer: fml [fml 4.0.3 release]
List-Subscribe: <mailto:cats-ctl@lists.example.org?body=subscribe>

You are not a member of this mailing list <cats@lists.example.org>.
""")
    found = bounce.parse(refusal)
    assert found is not None
    assert found.recipients[0].address == "cats@lists.example.org"
    assert found.recipients[0].reason == "rejected"
    person = message("""
From: ivy@example.org
To: news@shop.example
Subject: Question

I am not a member of your club yet, how do I join?
""")
    assert bounce.parse(person) is None


def test_an_automatic_response_from_a_no_reply_sender_is_not_a_bounce() -> None:
    answer = message("""
From: <noreply@example.com>
To: <news@shop.example>
Subject: =?UTF-8?Q?AutoRespons?= :Our offers
Auto-Submitted: auto-replied

This email inbox jack@example.com is no longer in use. Please contact someone else.
""")
    assert bounce.parse(answer) is None
