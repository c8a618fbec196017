"""Sending domains' decisions, without DNS: the records to publish (records()), each record's
verdict from DNS answers (judge(): ok / warning / missing / wrong / error), what broke since the
last check and the domain's status (settle()), and the names taken."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from mailflow.config import Settings
from mailflow.errors import UsageError
from mailflow.outbound.domains import (
    Answer,
    DnsRecord,
    Outcome,
    Purpose,
    RecordCheck,
    SendingDomain,
    Status,
    Verdict,
    domain_name,
    judge,
    new_dkim_key,
    records,
    selector_name,
    settle,
)

pytestmark = pytest.mark.pure

_, DER = new_dkim_key()
KEY = base64.b64encode(DER).decode()
OTHER_KEY = base64.b64encode(new_dkim_key()[1]).decode()
SETTINGS = Settings(ehlo_hostname="mta.mailflow.test", inbound_hostname="mx.mailflow.test")
DOMAIN = SendingDomain(
    domain="acme.example",
    display="acme.example",
    selector="mailflow",
    status=Status.PENDING,
    dkim_public_key=KEY,
    dkim_fingerprint="sha256:x",
    created_at=datetime(2026, 12, 1, tzinfo=UTC),
)
RECORDS = records(DOMAIN, SETTINGS)
BY = {r.purpose: r for r in RECORDS}
TIMEOUT = Answer(Outcome.ERROR, error="no answer in 5 s")
NXDOMAIN = Answer(Outcome.NXDOMAIN)


def published(**overrides: Answer) -> dict[tuple[str, str], Answer]:
    """DNS answers holding every record as records() says, except the ones overridden (by purpose)."""
    answers = {(r.name, r.type): Answer.of(r.value) for r in RECORDS}
    for purpose, answer in overrides.items():
        record = BY[Purpose(purpose)]
        answers[(record.name, record.type)] = answer
    return answers


def verdict(purpose: str, answer: Answer) -> RecordCheck:
    return {c.purpose: c for c in judge(RECORDS, published(**{purpose: answer}))}[Purpose(purpose)]


# -- records() ----------------------------------------------------------------------------------


def test_the_records_to_publish_are_spf_dkim_dmarc_and_the_return_paths_mx_all_required():
    assert [(r.purpose, r.type, r.name, r.required) for r in RECORDS] == [
        (Purpose.SPF, "TXT", "acme.example", True),
        (Purpose.DKIM, "TXT", "mailflow._domainkey.acme.example", True),
        (Purpose.DMARC, "TXT", "_dmarc.acme.example", True),
        (Purpose.RETURN_PATH, "MX", "acme.example", True),
    ]
    assert BY[Purpose.DKIM].value == f"v=DKIM1; k=rsa; p={KEY}"
    assert BY[Purpose.DMARC].value == "v=DMARC1; p=none; rua=mailto:dmarc-reports@acme.example"
    assert BY[Purpose.RETURN_PATH].value == "10 mx.mailflow.test."  # where VERP bounces to @acme.example go


def test_spf_authorises_the_host_direct_delivery_sends_from_unless_a_relays_spf_domain_is_configured():
    assert BY[Purpose.SPF].value == "v=spf1 a:mta.mailflow.test ~all"
    relayed = Settings(ehlo_hostname="mta.mailflow.test", spf_include="_spf.relay.example.")
    assert records(DOMAIN, relayed)[0].value == "v=spf1 include:_spf.relay.example ~all"
    reports = Settings(dmarc_rua="dmarc@reports.example", inbound_hostname="mx.mailflow.test")
    assert records(DOMAIN, reports)[2].value == "v=DMARC1; p=none; rua=mailto:dmarc@reports.example"


def test_a_long_dkim_value_is_split_into_strings_of_at_most_255_bytes_for_dns():
    record = BY[Purpose.DKIM]
    assert len(record.value) > 255
    assert all(len(s.encode()) <= 255 for s in record.strings) and len(record.strings) == 2
    assert "".join(record.strings) == record.value
    assert record.zone_line() == f'mailflow._domainkey.acme.example. TXT "{record.strings[0]}" "{record.strings[1]}"'
    assert BY[Purpose.SPF].strings == [BY[Purpose.SPF].value]
    assert BY[Purpose.RETURN_PATH].zone_line() == "acme.example. MX 10 mx.mailflow.test."
    assert record.to_dict()["strings"] == record.strings


# -- judge() ------------------------------------------------------------------------------------


def test_every_record_published_as_given_passes_and_dmarc_p_none_is_a_warning():
    checks = judge(RECORDS, published())
    assert [(c.purpose, c.status) for c in checks] == [
        (Purpose.SPF, Verdict.OK),
        (Purpose.DKIM, Verdict.OK),
        (Purpose.DMARC, Verdict.WARNING),
        (Purpose.RETURN_PATH, Verdict.OK),
    ]
    assert all(c.passed for c in checks)
    assert "p=quarantine" in checks[2].detail


def test_spf_with_other_mechanisms_passes_when_it_includes_the_one_needed_before_all():
    found = Answer.of("v=spf1 mx include:_spf.google.com A:MTA.mailflow.test. -all", "google-site-verification=x")
    assert verdict("spf", found).status is Verdict.OK


def test_two_spf_records_are_wrong_even_if_one_is_right():
    check = verdict("spf", Answer.of("v=spf1 a:mta.mailflow.test ~all", "v=spf1 include:other.example -all"))
    assert check.status is Verdict.WRONG and "2 v=spf1 records" in check.detail and "merge" in check.detail


@pytest.mark.parametrize(
    ("spf", "says"),
    [
        ("v=spf1 include:other.example -all", "does not include a:mta.mailflow.test"),
        ("v=spf1 -all a:mta.mailflow.test", "before a:mta.mailflow.test"),
        ("v=spf1 ~a:mta.mailflow.test -all", "failing qualifier"),
        ("v=spf1 redirect=_spf.other.example", "redirects"),
    ],
)
def test_spf_without_the_mechanism_where_receivers_reach_it_is_wrong(spf, says):
    check = verdict("spf", Answer.of(spf))
    assert check.status is Verdict.WRONG and says in check.detail


def test_no_spf_record_or_no_such_name_is_missing_and_says_what_to_publish():
    for answer in (Answer.of("some-verification=1"), Answer(Outcome.NODATA), NXDOMAIN):
        check = verdict("spf", answer)
        assert check.status is Verdict.MISSING
        assert 'publish TXT "v=spf1 a:mta.mailflow.test ~all" at acme.example' in check.detail


def test_a_dkim_key_split_into_strings_quoted_or_spaced_is_the_same_key():
    record = BY[Purpose.DKIM]
    spaced = f'"v=DKIM1; k=rsa; p={KEY[:200]}" "{KEY[200:]}"'  # pasted with the quotes
    assert verdict("dkim", Answer.of(spaced)).status is Verdict.OK
    assert verdict("dkim", Answer.of("".join(record.strings))).status is Verdict.OK


def test_another_dkim_key_at_the_selector_is_wrong_and_an_empty_one_is_revoked():
    assert verdict("dkim", Answer.of(f"v=DKIM1; k=rsa; p={OTHER_KEY}")).status is Verdict.WRONG
    revoked = verdict("dkim", Answer.of("v=DKIM1; p="))
    assert revoked.status is Verdict.WRONG and "revoked" in revoked.detail
    assert verdict("dkim", NXDOMAIN).status is Verdict.MISSING


def test_dmarc_quarantine_or_reject_is_ok_and_anything_else_is_wrong_or_missing():
    assert verdict("dmarc", Answer.of("v=DMARC1; p=reject; rua=mailto:x@acme.example")).status is Verdict.OK
    assert verdict("dmarc", Answer.of("v=DMARC1;p=Quarantine")).status is Verdict.OK
    assert verdict("dmarc", Answer.of("v=DMARC1; p=whatever")).status is Verdict.WRONG
    assert verdict("dmarc", Answer.of("v=DMARC1; rua=mailto:x@acme.example")).status is Verdict.WRONG
    assert verdict("dmarc", Answer.of("v=DMARC1; p=none", "v=DMARC1; p=reject")).status is Verdict.WRONG
    assert verdict("dmarc", NXDOMAIN).status is Verdict.MISSING


def test_the_return_path_mx_must_name_mailflows_inbound_host_first():
    assert verdict("return_path", Answer.of("10 MX.Mailflow.Test.")).status is Verdict.OK
    elsewhere = verdict("return_path", Answer.of("10 aspmx.l.google.com."))
    assert elsewhere.status is Verdict.WRONG and "bounces go there" in elsewhere.detail
    behind = verdict("return_path", Answer.of("20 mx.mailflow.test.", "5 aspmx.l.google.com."))
    assert behind.status is Verdict.WARNING and "tried first" in behind.detail
    assert verdict("return_path", Answer.of("0 .")).status is Verdict.WRONG  # a null MX
    assert verdict("return_path", Answer(Outcome.NODATA)).status is Verdict.MISSING


def test_a_dns_timeout_is_an_error_not_missing():
    checks = judge(RECORDS, dict.fromkeys(published(), TIMEOUT))
    assert {c.status for c in checks} == {Verdict.ERROR}
    assert all("no answer in 5 s" in c.detail and c.known is None for c in checks)
    assert judge(RECORDS, {})[0].status is Verdict.ERROR  # a question not asked is no verdict either


def test_every_detail_is_one_line():
    answers = [Answer.of("v=spf1 -all", "v=spf1 a:x ~all"), NXDOMAIN, TIMEOUT, Answer.of("0 .")]
    for purpose in Purpose:
        for answer in answers:
            assert "\n" not in verdict(str(purpose), answer).detail


# -- settle(): what broke, and the status -------------------------------------------------------


def test_all_required_passing_is_verified_and_a_missing_one_is_failing():
    checks, broken, status = settle(judge(RECORDS, published()), None, Status.PENDING)
    assert status is Status.VERIFIED and broken == []
    _, _, status = settle(judge(RECORDS, published(dkim=NXDOMAIN)), None, Status.PENDING)
    assert status is Status.FAILING


def test_a_record_that_passed_and_is_missing_now_is_broken_with_its_old_verdict():
    before, _, _ = settle(judge(RECORDS, published()), None, Status.PENDING)
    now, broken, status = settle(judge(RECORDS, published(dkim=NXDOMAIN)), before, Status.VERIFIED)
    assert status is Status.FAILING
    assert [(c.purpose, c.status, was) for c, was in broken] == [(Purpose.DKIM, Verdict.MISSING, Verdict.OK)]
    again, broken, _ = settle(judge(RECORDS, published(dkim=NXDOMAIN)), now, Status.FAILING)
    assert broken == []  # said once, not at every check


def test_a_timeout_breaks_nothing_keeps_the_status_and_a_later_failure_still_counts_as_broken():
    before, _, _ = settle(judge(RECORDS, published()), None, Status.PENDING)
    unsure, broken, status = settle(judge(RECORDS, published(spf=TIMEOUT)), before, Status.VERIFIED)
    assert broken == [] and status is Status.VERIFIED
    assert {c.purpose: c.known for c in unsure}[Purpose.SPF] is Verdict.OK  # last known, kept
    _, broken, status = settle(judge(RECORDS, published(spf=NXDOMAIN)), unsure, status)
    assert [c.purpose for c, _ in broken] == [Purpose.SPF] and status is Status.FAILING


def test_a_check_survives_its_round_trip_through_the_event_and_the_table():
    checks, _, _ = settle(judge(RECORDS, published(spf=TIMEOUT)), None, Status.PENDING)
    assert [RecordCheck.from_dict(c.to_dict()) for c in checks] == checks


# -- names ------------------------------------------------------------------------------------


def test_domain_names_are_lower_case_a_labels_and_anything_else_is_refused():
    assert domain_name(" News.Acme.Example. ") == "news.acme.example"
    assert domain_name("Bücher.example") == "xn--bcher-kva.example"
    for bad in ("localhost", "not a domain", "-x.example", "a..example", "x" * 64 + ".example", ""):
        with pytest.raises(UsageError, match="not a domain name"):
            domain_name(bad)
    assert selector_name("MF2026") == "mf2026"
    with pytest.raises(UsageError):
        selector_name("bad selector")


def test_a_record_is_plain_data_an_api_can_return():
    record = DnsRecord(Purpose.SPF, "TXT", "acme.example", "v=spf1 -all", True)
    assert record.to_dict()["purpose"] == "spf" and DOMAIN.to_dict()["status"] == "pending"
