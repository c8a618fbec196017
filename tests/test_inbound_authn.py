"""Inbound authentication (inbound/authn.py): SPF, DKIM, ARC and DMARC verdicts against a real
DNS server on loopback publishing SPF, DKIM and DMARC records, and the Authentication-Results
header they become."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import authres
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailflow.errors import ConfigurationError
from mailflow.inbound.authn import (
    Authenticator,
    DkimResult,
    DmarcPolicy,
    Verdicts,
    dmarc_result,
    header_from,
    hostname,
    org_domain,
    parse_dmarc,
)

from .dns_server import DnsServer

pytestmark = pytest.mark.integration

SENDER_IP = "192.0.2.10"  # the sending domains' outbound server (documentation range: only a string here)
OTHER_IP = "198.51.100.7"


def _key() -> tuple[bytes, str]:
    """(PKCS#1 private key PEM for dkim.sign, the public key as a DKIM record)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


GOOD_KEY, GOOD_RECORD = _key()
OTHER_KEY, OTHER_RECORD = _key()
LIST_KEY, LIST_RECORD = _key()

ZONE: dict[tuple[str, str], list[str]] = {
    # good.test: SPF through an include and an a: mechanism, a DKIM key, p=reject
    ("good.test", "TXT"): ["v=spf1 include:_spf.relay.test -all"],
    ("_spf.relay.test", "TXT"): ["v=spf1 a:out.relay.test -all"],
    ("out.relay.test", "A"): [SENDER_IP],
    ("mx.good.test", "TXT"): ["v=spf1 a -all"],
    ("mx.good.test", "A"): [SENDER_IP],
    ("sel._domainkey.good.test", "TXT"): [GOOD_RECORD],  # longer than 255 bytes: two strings
    ("wrong._domainkey.good.test", "TXT"): [OTHER_RECORD],  # not the key that signs with it
    ("mail.good.test", "A"): [SENDER_IP],
    ("sel._domainkey.mail.good.test", "TXT"): [GOOD_RECORD],
    ("_dmarc.good.test", "TXT"): ["v=DMARC1; p=reject; rua=mailto:dmarc@good.test"],
    # evil.test: its own SPF passes, its own signature verifies; no DMARC
    ("evil.test", "TXT"): [f"v=spf1 ip4:{OTHER_IP} -all"],
    ("k._domainkey.evil.test", "TXT"): [OTHER_RECORD],
    ("quarantine.test", "TXT"): [f"v=spf1 ip4:{SENDER_IP} -all"],
    ("_dmarc.quarantine.test", "TXT"): ["v=DMARC1; p=quarantine"],
    ("bounces.quarantine.test", "TXT"): [f"v=spf1 ip4:{SENDER_IP} -all"],
    ("parent.test", "TXT"): [f"v=spf1 ip4:{SENDER_IP} -all"],
    ("_dmarc.parent.test", "TXT"): ["v=DMARC1; p=none; sp=reject"],
    ("strict.test", "TXT"): [f"v=spf1 ip4:{SENDER_IP} -all"],
    ("mail.strict.test", "TXT"): [f"v=spf1 ip4:{SENDER_IP} -all"],
    ("_dmarc.strict.test", "TXT"): ["v=DMARC1; p=reject; adkim=s; aspf=s"],
    ("sel._domainkey.mail.strict.test", "TXT"): [GOOD_RECORD],
    ("soft.test", "TXT"): [f"v=spf1 ip4:{SENDER_IP} ~all"],
    ("neutral.test", "TXT"): ["v=spf1 ?all"],
    ("nospf.test", "A"): [SENDER_IP],
    ("broken.test", "TXT"): ["v=spf1 ip4:not-an-address -all"],
    ("arc._domainkey.list.test", "TXT"): [LIST_RECORD],
    ("slow.test", "TXT"): ['"v=spf1 -all"'],  # never answered: see the slow_dns fixture
    ("_dmarc.twice.test", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
    ("twice.test", "TXT"): [f"v=spf1 ip4:{SENDER_IP} -all"],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ZONE, silent={"slow._domainkey.good.test", "slow.test"}) as server:
        yield server


@pytest.fixture
def auth(dns_server: DnsServer) -> Authenticator:
    return Authenticator(nameservers=[dns_server.address], timeout_s=1.0)


def message(
    from_: str = "Alice <alice@good.test>", subject: str = "Quarterly report", body: str = "Hello Bob.\r\n"
) -> bytes:
    return (
        f"From: {from_}\r\n"
        "To: Bob <bob@inbound.test>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 1 Jun 2026 10:00:00 +0000\r\n"
        "Message-ID: <1@good.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"{body}"
    ).encode()


def signed(data: bytes, domain: str = "good.test", selector: str = "sel", key: bytes = GOOD_KEY) -> bytes:
    signature = dkim.sign(
        data,
        selector.encode(),
        domain.encode(),
        key,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return signature + data


def test_good_mail_passes_spf_dkim_and_dmarc_and_the_header_says_so(auth: Authenticator, dns_server: DnsServer):
    v = auth.check(signed(message()), client_ip=SENDER_IP, helo="mx.good.test", mail_from="bounce@good.test")

    assert (v.spf, v.spf_domain, v.spf_helo) == ("pass", "good.test", "pass")
    assert v.dkim == (DkimResult("good.test", "sel", "pass"),)
    assert (v.arc, v.dmarc, v.dmarc_policy, v.from_domain) == ("none", "pass", "reject", "good.test")
    # the include: and a: mechanisms were looked up on the configured server too
    assert dns_server.queries[("_spf.relay.test", "TXT")] >= 1
    assert dns_server.queries[("out.relay.test", "A")] >= 1

    header = v.header("mx.inbound.test")
    assert header == (
        b"Authentication-Results: mx.inbound.test;\r\n"
        b"\tspf=pass smtp.mailfrom=good.test;\r\n"
        b"\tspf=pass smtp.helo=mx.good.test;\r\n"
        b"\tdkim=pass header.d=good.test header.s=sel;\r\n"
        b"\tarc=none;\r\n"
        b"\tdmarc=pass (p=reject) header.from=good.test\r\n"
    )
    parsed = authres.AuthenticationResultsHeader.parse(header.decode().replace("\r\n\t", " ").strip())
    assert parsed.authserv_id == "mx.inbound.test"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "pass"),
        ("spf", "pass"),
        ("dkim", "pass"),
        ("arc", "none"),
        ("dmarc", "pass"),
    ]


def test_a_spoofed_from_of_a_domain_with_p_reject_fails_dmarc_under_policy_reject(auth: Authenticator):
    # evil.test's own SPF and signature pass, but neither is aligned with the From domain
    data = signed(message(from_="CEO <ceo@good.test>"), domain="evil.test", selector="k", key=OTHER_KEY)
    v = auth.check(data, client_ip=OTHER_IP, helo="mx.evil.test", mail_from="x@evil.test")

    assert (v.spf, v.spf_domain) == ("pass", "evil.test")
    assert v.dkim == (DkimResult("evil.test", "k", "pass"),)
    assert (v.dmarc, v.dmarc_policy, v.from_domain) == ("fail", "reject", "good.test")
    assert b"dmarc=fail (p=reject) header.from=good.test" in v.header("mx.inbound.test")


def test_an_unsigned_message_whose_spf_passes_for_another_domain_fails_dmarc_under_p_quarantine(
    auth: Authenticator,
):
    v = auth.check(
        message(from_="news@quarantine.test"), client_ip=OTHER_IP, helo="mx.evil.test", mail_from="x@evil.test"
    )
    assert (v.spf, v.dkim, v.dmarc, v.dmarc_policy) == ("pass", (), "fail", "quarantine")


def test_a_subdomain_without_its_own_record_gets_the_organizational_domains_sp_policy(
    auth: Authenticator, dns_server: DnsServer
):
    sub = auth.check(message(from_="news@news.parent.test"), client_ip=OTHER_IP, helo="", mail_from="x@evil.test")
    top = auth.check(message(from_="news@parent.test"), client_ip=OTHER_IP, helo="", mail_from="x@evil.test")

    assert (sub.dmarc, sub.dmarc_policy, sub.from_domain) == ("fail", "reject", "news.parent.test")
    assert (top.dmarc, top.dmarc_policy) == ("fail", "none")
    assert dns_server.queries[("_dmarc.news.parent.test", "TXT")] >= 1  # asked first, then the org domain


def test_spf_aligns_by_organizational_domain_unless_aspf_is_strict(auth: Authenticator):
    relaxed = auth.check(
        message(from_="a@quarantine.test"), client_ip=SENDER_IP, helo="", mail_from="b@bounces.quarantine.test"
    )
    assert (relaxed.spf, relaxed.spf_domain, relaxed.dmarc) == ("pass", "bounces.quarantine.test", "pass")

    strict = auth.check(message(from_="a@strict.test"), client_ip=SENDER_IP, helo="", mail_from="b@mail.strict.test")
    assert (strict.spf, strict.dmarc, strict.dmarc_policy) == ("pass", "fail", "reject")


def test_dkim_aligns_by_organizational_domain_unless_adkim_is_strict(auth: Authenticator):
    relaxed = signed(message(from_="a@good.test"), domain="mail.good.test")
    v = auth.check(relaxed, client_ip=OTHER_IP, helo="", mail_from="x@evil.test")
    assert (v.dkim[0].result, v.dmarc) == ("pass", "pass")

    other_org = signed(message(from_="a@good.test"), domain="mail.strict.test")
    v = auth.check(other_org, client_ip=OTHER_IP, helo="", mail_from="x@evil.test")
    assert (v.dkim[0].result, v.dmarc) == ("pass", "fail")

    strict = signed(message(from_="a@strict.test"), domain="mail.strict.test")
    v = auth.check(strict, client_ip=OTHER_IP, helo="", mail_from="x@evil.test")
    assert (v.dkim[0].result, v.dmarc, v.dmarc_policy) == ("pass", "fail", "reject")


def test_every_signature_is_reported_in_header_order_and_one_good_one_is_enough_for_dmarc(auth: Authenticator):
    good = signed(message())
    both = signed(good, selector="wrong")  # signed with the good key, but the record is another key

    v = auth.check(both, client_ip=OTHER_IP, helo="", mail_from="x@evil.test")

    assert v.dkim == (
        DkimResult("good.test", "wrong", "fail", "signature did not verify"),
        DkimResult("good.test", "sel", "pass"),
    )
    assert v.dmarc == "pass"
    header = v.header("mx.inbound.test")
    assert header.index(b"dkim=fail") < header.index(b"dkim=pass")
    assert b'dkim=fail reason="signature did not verify" header.d=good.test header.s=wrong;' in header


def test_a_changed_body_fails_dkim_and_a_missing_key_is_a_permerror(auth: Authenticator):
    data = signed(message()).replace(b"Hello Bob.", b"Pay Mallory")
    v = auth.check(data, client_ip=OTHER_IP, helo="", mail_from="x@evil.test")
    assert v.dkim == (DkimResult("good.test", "sel", "fail", "body hash mismatch"),)
    assert v.dmarc == "fail"

    v = auth.check(signed(message(), selector="gone"), client_ip=OTHER_IP, helo="", mail_from="x@evil.test")
    assert v.dkim == (DkimResult("good.test", "gone", "permerror", "no key"),)


def test_a_signature_made_with_rsa_sha1_verifies_but_does_not_count(auth: Authenticator):
    data = message()
    signature = dkim.sign(
        data, b"sel", b"good.test", GOOD_KEY, include_headers=[b"from"], signature_algorithm=b"rsa-sha1"
    )
    v = auth.check(signature + data, client_ip=OTHER_IP, helo="", mail_from="x@evil.test")
    assert v.dkim == (DkimResult("good.test", "sel", "policy", "rsa-sha1 is not accepted (RFC 8301)"),)
    assert v.dmarc == "fail"


@pytest.mark.parametrize(
    ("mail_from", "client_ip", "expected"),
    [
        ("a@good.test", SENDER_IP, "pass"),
        ("a@good.test", OTHER_IP, "fail"),
        ("a@soft.test", OTHER_IP, "softfail"),
        ("a@neutral.test", OTHER_IP, "neutral"),
        ("a@nospf.test", OTHER_IP, "none"),
        ("a@no-such-domain.test", OTHER_IP, "none"),
        ("a@broken.test", OTHER_IP, "permerror"),
        ("a@localhost", OTHER_IP, "none"),  # not a domain SPF can be checked for
    ],
)
def test_spf_results_for_the_mail_from_identity(auth: Authenticator, mail_from: str, client_ip: str, expected: str):
    v = auth.check(message(), client_ip=client_ip, helo="", mail_from=mail_from)
    assert v.spf == expected


def test_the_helo_identity_is_checked_on_its_own(auth: Authenticator):
    v = auth.check(message(), client_ip=SENDER_IP, helo="mx.good.test", mail_from="a@soft.test")
    assert (v.spf, v.spf_helo, v.helo_domain) == ("pass", "pass", "mx.good.test")

    v = auth.check(message(), client_ip=OTHER_IP, helo="MX.Good.Test", mail_from="a@soft.test")
    assert (v.spf, v.spf_helo) == ("softfail", "fail")
    assert b"spf=fail smtp.helo=mx.good.test" in v.header("mx.inbound.test")

    v = auth.check(message(), client_ip=SENDER_IP, helo="[192.0.2.10]", mail_from="a@good.test")
    assert (v.spf_helo, v.helo_domain) == ("none", "")
    assert b"smtp.helo" not in v.header("mx.inbound.test")


def test_a_null_sender_is_checked_by_its_helo_identity(auth: Authenticator):
    v = auth.check(message(), client_ip=SENDER_IP, helo="mx.good.test", mail_from="")
    assert (v.spf, v.spf_domain, v.spf_helo, v.null_sender) == ("pass", "mx.good.test", "pass", True)
    header = v.header("mx.inbound.test")
    assert b"spf=pass smtp.helo=mx.good.test;" in header
    assert b"smtp.mailfrom" not in header

    v = auth.check(message(), client_ip=OTHER_IP, helo="mx.good.test", mail_from="<>")
    assert (v.spf, v.spf_domain) == ("fail", "mx.good.test")


def _forwarded(data: bytes, forwarder: Authenticator) -> bytes:
    """What a mailing list at list.test sends on: its own Authentication-Results, then its ARC set."""
    verdicts = forwarder.check(data, client_ip=SENDER_IP, helo="mx.good.test", mail_from="bounce@good.test")
    received = verdicts.header("list.test") + data
    return b"".join(dkim.arc_sign(received, b"arc", b"list.test", LIST_KEY, b"list.test")) + received


def test_an_arc_sealed_message_passes_arc_and_a_changed_one_fails(auth: Authenticator):
    sealed = _forwarded(signed(message()), auth)
    assert sealed.startswith(b"ARC-Seal:")

    v = auth.check(sealed, client_ip=OTHER_IP, helo="lists.list.test", mail_from="list-bounces@list.test")
    assert v.arc == "pass"
    assert b"arc=pass;" in v.header("mx.inbound.test")

    tampered = sealed.replace(b"Subject: Quarterly report", b"Subject: Quarterly invoice")
    v = auth.check(tampered, client_ip=OTHER_IP, helo="lists.list.test", mail_from="list-bounces@list.test")
    assert v.arc == "fail"
    assert v.dkim[0].result == "fail"  # the author's signature covers the Subject too

    no_seal = b"\r\n".join(line for line in sealed.split(b"\r\n") if not line.startswith(b"ARC-Seal:"))
    v = auth.check(no_seal, client_ip=OTHER_IP, helo="lists.list.test", mail_from="list-bounces@list.test")
    assert v.arc == "fail"


def test_a_dns_server_that_never_answers_gives_temperror_within_the_bound():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never read: every query is lost
    silent.bind(("127.0.0.1", 0))
    data = signed(message())
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        auth = Authenticator(nameservers=[address], timeout_s=1.0, total_timeout_s=1.2)
        started = time.monotonic()
        v = auth.check(data, client_ip=SENDER_IP, helo="mx.good.test", mail_from="a@good.test")
        elapsed = time.monotonic() - started

        by_default = Authenticator(nameservers=[address], timeout_s=0.4)  # the whole check: twice timeout_s
        started = time.monotonic()
        by_default.check(data, client_ip=SENDER_IP, helo="mx.good.test", mail_from="a@good.test")
        elapsed_by_default = time.monotonic() - started
    finally:
        silent.close()
    assert (v.spf, v.spf_helo, v.dmarc) == ("temperror", "temperror", "temperror")
    assert v.dkim == (DkimResult("good.test", "sel", "temperror", v.dkim[0].reason),)
    # four lookups would take a timeout each; the check gives up at its total, its last lookup cut short
    assert 1.2 <= elapsed < 1.2 + 0.5
    assert 0.8 <= elapsed_by_default < 0.8 + 0.5


def test_a_key_that_cannot_be_fetched_makes_dmarc_a_temperror_not_a_fail(auth: Authenticator):
    data = signed(message(), selector="slow")  # the server never answers for this key
    started = time.monotonic()
    v = auth.check(data, client_ip=OTHER_IP, helo="", mail_from="x@evil.test")
    assert time.monotonic() - started < 1.0 + 0.5
    assert v.dkim == (DkimResult("good.test", "slow", "temperror", "key lookup failed"),)
    assert (v.spf, v.dmarc, v.dmarc_policy) == ("pass", "temperror", "reject")


def test_a_lookup_that_timed_out_is_not_asked_again_for_every_message(auth: Authenticator, dns_server: DnsServer):
    before = dns_server.queries[("slow.test", "TXT")]
    for _ in range(3):
        v = auth.check(message(), client_ip=OTHER_IP, helo="", mail_from="a@slow.test")
        assert v.spf == "temperror"
    assert dns_server.queries[("slow.test", "TXT")] - before <= 2  # one lookup (and its one retry)


def test_answers_are_cached_for_their_ttl_and_not_without_the_cache(dns_server: DnsServer):
    data = signed(message())
    key = ("sel._domainkey.good.test", "TXT")
    cached = Authenticator(nameservers=[dns_server.address], timeout_s=1.0)
    before = dns_server.queries[key]
    for _ in range(3):
        assert cached.check(data, client_ip=SENDER_IP, helo="", mail_from="a@good.test").dmarc == "pass"
    assert dns_server.queries[key] - before == 1

    uncached = Authenticator(nameservers=[dns_server.address], timeout_s=1.0, cache_size=0)
    before = dns_server.queries[key]
    for _ in range(3):
        assert uncached.check(data, client_ip=SENDER_IP, helo="", mail_from="a@good.test").dmarc == "pass"
    assert dns_server.queries[key] - before == 3


def test_a_cached_answer_expires_with_its_ttl_and_negative_answers_with_the_soa_minimum():
    zone = {("good.test", "TXT"): [f"v=spf1 ip4:{SENDER_IP} -all"]}
    with DnsServer(zone, ttl=1, negative_ttl=1) as server:
        auth = Authenticator(nameservers=[server.address], timeout_s=1.0)
        for _ in range(2):
            auth.check(message(), client_ip=SENDER_IP, helo="", mail_from="a@good.test")
        assert server.queries[("good.test", "TXT")] == 1
        assert server.queries[("_dmarc.good.test", "TXT")] == 1  # no such name: cached as well
        time.sleep(1.2)
        auth.check(message(), client_ip=SENDER_IP, helo="", mail_from="a@good.test")
        assert server.queries[("good.test", "TXT")] == 2
        assert server.queries[("_dmarc.good.test", "TXT")] == 2


def test_several_dmarc_records_mean_no_dmarc(auth: Authenticator):
    v = auth.check(message(from_="a@twice.test"), client_ip=OTHER_IP, helo="", mail_from="x@evil.test")
    assert (v.dmarc, v.dmarc_policy, v.from_domain) == ("none", None, "twice.test")


def test_concurrent_checks_from_many_threads_get_each_their_own_verdicts(auth: Authenticator):
    cases = [
        (signed(message()), SENDER_IP, "a@good.test", ("pass", "pass")),
        (message(from_="ceo@good.test"), OTHER_IP, "x@evil.test", ("pass", "fail")),
        (message(from_="a@soft.test"), OTHER_IP, "a@soft.test", ("softfail", "none")),
        (signed(message()).replace(b"Hello", b"Jello"), OTHER_IP, "a@good.test", ("fail", "fail")),
    ] * 10
    barrier = threading.Barrier(8)

    def run(case: tuple) -> tuple[str, str]:
        data, ip, mail_from, _ = case
        try:
            barrier.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        v = auth.check(data, client_ip=ip, helo="", mail_from=mail_from)
        return v.spf, v.dmarc

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, cases))
    assert got == [expected for *_, expected in cases]


MALFORMED = [
    b"",
    b"\r\n",
    b"\r\n\r\nno header at all",
    b" folded first line\r\nFrom: a@good.test\r\n\r\nbody",
    b"this is not a header\r\nFrom: a@good.test\r\n\r\n",
    b"From: \xff\xfe\x80@\xc3(.test\r\nSubject: \x00\x01\r\n\r\n\xff" * 3,
    b"From: a@good.test\r\nFrom: b@evil.test\r\n\r\n",
    b"From: a@good.test <b@evil.test>\r\n\r\n",
    b"From: undisclosed-recipients:;\r\n\r\n",
    b"From: a@[192.0.2.1]\r\n\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=good.test\r\nFrom: a@good.test\r\n\r\n",
    b'DKIM-Signature: ;;;===;\r\nDKIM-Signature: v=1; a=nope; b=!!; bh=; d="; s=\r\nFrom: a@good.test\r\n\r\n',
    b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=list.test; s=arc; b=AAAA\r\nFrom: a@good.test\r\n\r\n",
    b"ARC-Seal: i=99999999999999999999\r\nARC-Message-Signature: i=1\r\nFrom: a@good.test\r\n\r\n",
    b"X-Long: " + b"a" * 1_000_000 + b"\r\nFrom: a@good.test\r\n\r\n",
    b"Received: x\r\n" * 20_000 + b"From: a@good.test\r\n\r\nbody",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=good.test; s=sel; h=from; bh=AAAA; b=AAAA\r\n" * 50
    + b"From: a@good.test\r\n\r\n",
]


@pytest.mark.parametrize("data", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_messages_get_verdicts_and_never_an_exception(auth: Authenticator, data: bytes):
    v = auth.check(data, client_ip=OTHER_IP, helo="mx.evil.test", mail_from="x@evil.test")
    assert v.spf == "pass"  # the envelope still speaks for itself
    assert v.dmarc in ("none", "fail", "permerror")
    assert v.arc in ("none", "fail")
    assert len(v.dkim) <= 10
    assert all(d.result in ("fail", "permerror", "neutral", "policy") for d in v.dkim)
    header = v.header("mx.inbound.test")
    assert header.startswith(b"Authentication-Results: mx.inbound.test;") and header.endswith(b"\r\n")
    assert b"\n" not in header.replace(b"\r\n\t", b"").rstrip(b"\r\n")


def test_what_malformed_messages_are_reported_as(auth: Authenticator):
    def check(data: bytes) -> Verdicts:
        return auth.check(data, client_ip=OTHER_IP, helo="", mail_from="x@evil.test")

    assert (check(b"Subject: no From\r\n\r\n").dmarc, check(b"Subject: no From\r\n\r\n").from_domain) == ("none", None)
    assert check(MALFORMED[6]).dmarc == "permerror"  # two From fields
    assert check(MALFORMED[7]).dmarc == "permerror"  # readers disagree on which address it is
    assert check(MALFORMED[10]).dkim == (DkimResult("good.test", "", "permerror", "missing b="),)
    unreadable = b"DKIM-Signature: v=1; d=good.test; s=sel\r\nnot a header line\r\nFrom: a@good.test\r\n\r\n"
    assert check(unreadable).dkim == (
        DkimResult("good.test", "sel", "permerror", "malformed message: Unexpected characters in RFC822 header"),
    )
    many = check(MALFORMED[-1]).dkim
    assert len(many) == 10 and {d.result for d in many} == {"fail"}


def test_an_odd_envelope_gives_none_not_an_error(auth: Authenticator):
    v = auth.check(signed(message()), client_ip="", helo="", mail_from="not-an-address")
    assert (v.spf, v.spf_domain, v.spf_helo) == ("none", "", "none")
    assert (v.dkim[0].result, v.dmarc) == ("pass", "pass")
    v = auth.check(b"\xff" * 10, client_ip="not-an-ip", helo="\x00\xff", mail_from="a@\xff.test")
    assert (v.spf, v.spf_helo, v.dmarc) == ("none", "none", "none")


def test_nameservers_must_be_ip_addresses():
    with pytest.raises(ConfigurationError, match="MAILFLOW_DNS_SERVERS"):
        Authenticator(nameservers=["dns.example.net"])
    Authenticator(nameservers=["10.0.0.53", "127.0.0.1:5353", "[::1]:53"])


# --- the decisions, without a DNS server --------------------------------------------------------


def test_the_event_holds_results_and_domains_and_nothing_about_people(auth: Authenticator):
    v = auth.check(signed(message()), client_ip=SENDER_IP, helo="mx.good.test", mail_from="alice.private@good.test")
    event = v.to_event()
    assert json.loads(json.dumps(event)) == {
        "spf": "pass",
        "spf_domain": "good.test",
        "spf_helo": "pass",
        "dkim": [{"domain": "good.test", "selector": "sel", "result": "pass"}],
        "arc": "none",
        "dmarc": "pass",
        "dmarc_policy": "reject",
        "from_domain": "good.test",
    }
    assert "alice" not in json.dumps(event) and SENDER_IP not in json.dumps(event)


def test_header_values_that_are_not_tokens_are_quoted_and_cannot_break_the_header():
    v = Verdicts(
        spf="none",
        spf_domain="",
        spf_helo="none",
        dkim=(DkimResult('ev"il;\r\nX-Injected: 1', "s/1", "permerror", "missing b="),),
        arc="none",
        dmarc="permerror",
        dmarc_policy=None,
        from_domain=None,
    )
    header = v.header("mx.inbound.test")
    assert header == (
        b"Authentication-Results: mx.inbound.test;\r\n"
        b"\tspf=none;\r\n"
        b'\tdkim=permerror reason="missing b=" header.d="ev\\"il;X-Injected: 1" header.s="s/1";\r\n'
        b"\tarc=none;\r\n"
        b"\tdmarc=permerror\r\n"
    )
    parsed = authres.AuthenticationResultsHeader.parse(header.decode().replace("\r\n\t", " ").strip())
    assert [r.method for r in parsed.results] == ["spf", "dkim", "arc", "dmarc"]


def test_dmarc_records_are_read_as_rfc_7489_says():
    assert parse_dmarc("v=DMARC1; p=reject") == DmarcPolicy("reject", "reject", "r", "r")
    assert parse_dmarc("v=DMARC1;p=none;sp=Quarantine;adkim=s;aspf=x") == DmarcPolicy("none", "quarantine", "s", "r")
    assert parse_dmarc("v=DMARC1; p=bogus") is None  # no valid policy and nowhere to report: no DMARC
    assert parse_dmarc("v=DMARC1; p=bogus; rua=mailto:d@a.test") == DmarcPolicy("none", "none", "r", "r")
    with pytest.raises(ValueError, match="tag=value"):
        parse_dmarc("v=DMARC1; p reject")


def test_alignment_is_by_organizational_domain_unless_strict():
    relaxed, strict = DmarcPolicy("reject", "reject", "r", "r"), DmarcPolicy("reject", "reject", "s", "s")
    sub = [DkimResult("mail.example.co.uk", "s", "pass")]
    assert org_domain("a.b.example.co.uk") == "example.co.uk"  # the public suffix list, not the last two labels
    assert dmarc_result(relaxed, "example.co.uk", "none", "", sub) == "pass"
    assert dmarc_result(strict, "example.co.uk", "none", "", sub) == "fail"
    assert dmarc_result(relaxed, "other.co.uk", "none", "", sub) == "fail"
    assert dmarc_result(relaxed, "example.co.uk", "pass", "bounces.example.co.uk", []) == "pass"
    assert dmarc_result(relaxed, "example.co.uk", "temperror", "example.co.uk", []) == "temperror"
    assert dmarc_result(relaxed, "example.co.uk", "temperror", "other.test", []) == "fail"  # not aligned anyway


def test_from_domains_and_host_names_are_read_strictly():
    assert header_from([("from", b"=?utf-8?q?J=C3=BCrgen?= <j@B\xc3\xbccher.Test>")]) == ("xn--bcher-kva.test", "")
    assert header_from([("from", b"a@x.test, b@x.test")]) == ("x.test", "")
    assert header_from([("from", b"a@x.test, b@y.test")]) == (None, "permerror")
    assert header_from([("subject", b"hi")]) == (None, "none")
    assert hostname("Mail.Example.COM.") == "mail.example.com"
    assert hostname("localhost") is None and hostname("[192.0.2.1]") is None and hostname("a b.test") is None
