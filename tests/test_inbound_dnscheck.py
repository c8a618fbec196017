"""`mailflow domains check`'s decision, without DNS: an MX answer (and the addresses of its
hosts, and the TXT answers) in, ok / wrong / missing / temperror out, and the record to publish."""

from __future__ import annotations

import pytest

from mailflow.inbound.dnscheck import Lookup, Outcome, Presence, Status, ThisHost, judge, mail_hosts, mx_record

pytestmark = pytest.mark.pure

HERE = ThisHost("mx.mailflow.test", frozenset({"192.0.2.10", "2001:db8::10"}))
BY_NAME_ONLY = ThisHost("mx.mailflow.test")
NXDOMAIN = Lookup(Outcome.NXDOMAIN)
NODATA = Lookup(Outcome.NODATA)
TIMEOUT = Lookup(Outcome.TEMPERROR, error="no answer in 5 s")


def test_the_record_to_publish_points_the_domain_at_this_host_in_zone_file_form():
    assert mx_record("Support.Example.org", "MX.example.net.") == "support.example.org. MX 10 mx.example.net."


def test_an_mx_naming_this_host_in_any_letter_case_and_with_the_final_dot_is_ok():
    v = judge("acme.example", Lookup.answer("10 MX.Mailflow.Test."), BY_NAME_ONLY)
    assert (v.status, v.here, v.mx) == (Status.OK, "mx.mailflow.test", ((10, "mx.mailflow.test"),))
    assert v.ok and v.detail == "MX 10 mx.mailflow.test (this host)"


def test_an_mx_whose_address_is_one_of_this_hosts_is_ok_by_address():
    answers = {"mail.acme.example": Lookup.answer("2001:db8:0:0::10")}  # the same address, written longer
    v = judge("acme.example", Lookup.answer("10 mail.acme.example."), HERE, answers)
    assert (v.status, v.here) == (Status.OK, "mail.acme.example")
    assert v.detail == "MX 10 mail.acme.example (this host, by address)"


def test_a_backup_mx_here_is_ok_and_says_which_host_is_tried_first():
    v = judge("acme.example", Lookup.answer("20 mx.mailflow.test.", "5 primary.elsewhere.example."), HERE)
    assert v.status is Status.OK
    assert v.mx == ((5, "primary.elsewhere.example"), (20, "mx.mailflow.test"))
    assert v.detail.endswith("; primary.elsewhere.example (5) is tried first")


def test_mx_records_naming_only_other_hosts_are_wrong_and_listed_by_preference():
    answers = {"b.example": Lookup.answer("198.51.100.2"), "a.example": Lookup.answer("198.51.100.1")}
    v = judge("acme.example", Lookup.answer("20 b.example.", "10 a.example."), HERE, answers)
    assert (v.status, v.here) == (Status.WRONG, None)
    assert v.detail == "MX elsewhere: 10 a.example, 20 b.example" and not v.ok


def test_an_mx_elsewhere_is_wrong_when_this_host_has_no_known_address_to_compare():
    v = judge("acme.example", Lookup.answer("10 mail.acme.example."), BY_NAME_ONLY, {})
    assert v.status is Status.WRONG


@pytest.mark.parametrize(
    ("mx", "detail"),
    [
        (NXDOMAIN, "no such domain"),
        (NODATA, "no MX record"),
        (Lookup.answer(), "no MX record"),
        (Lookup.answer("0 ."), "a null MX: the domain says it takes no mail"),
    ],
)
def test_no_domain_no_mx_and_a_null_mx_are_missing(mx, detail):
    v = judge("acme.example", mx, HERE)
    assert (v.status, v.detail) == (Status.MISSING, detail)


def test_dns_that_does_not_answer_is_a_temperror_not_a_verdict_on_the_domain():
    v = judge("acme.example", TIMEOUT, HERE)
    assert (v.status, v.detail) == (Status.TEMPERROR, "MX lookup failed: no answer in 5 s")


def test_an_mx_host_whose_address_could_not_be_looked_up_is_a_temperror_unless_another_host_is_here():
    mx = Lookup.answer("10 mail.acme.example.", "20 backup.acme.example.")
    unsure = judge("acme.example", mx, HERE, {"mail.acme.example": TIMEOUT, "backup.acme.example": NXDOMAIN})
    assert (unsure.status, unsure.detail) == (Status.TEMPERROR, "address lookup failed for mail.acme.example")
    sure = judge(
        "acme.example", mx, HERE, {"mail.acme.example": TIMEOUT, "backup.acme.example": Lookup.answer("192.0.2.10")}
    )
    assert (sure.status, sure.here) == (Status.OK, "backup.acme.example")


def test_spf_and_dmarc_are_present_only_for_a_record_of_their_version_and_unknown_when_dns_failed():
    v = judge(
        "acme.example",
        NXDOMAIN,
        HERE,
        spf=Lookup.answer("google-site-verification=abc", "V=SPF1 -all"),
        dmarc=Lookup.answer("v=DMARC1;p=reject"),
    )
    assert (v.spf, v.dmarc) == (Presence.PRESENT, Presence.PRESENT)
    v = judge("acme.example", NXDOMAIN, HERE, spf=Lookup.answer("v=spf10 nonsense"), dmarc=NXDOMAIN)
    assert (v.spf, v.dmarc) == (Presence.ABSENT, Presence.ABSENT)
    v = judge("acme.example", NXDOMAIN, HERE, spf=TIMEOUT)
    assert (v.spf, v.dmarc) == (Presence.UNKNOWN, Presence.UNKNOWN)


def test_the_hosts_asked_for_their_addresses_are_the_mx_hosts_by_preference_without_a_null_mx():
    assert mail_hosts(Lookup.answer("20 b.example.", "10 A.example.", "30 a.example.", "0 .")) == [
        "a.example",
        "b.example",
    ]
    assert mail_hosts(TIMEOUT) == []


def test_a_verdict_as_json_names_every_field():
    v = judge("Acme.example", Lookup.answer("10 mx.mailflow.test."), HERE, spf=NODATA, dmarc=NXDOMAIN)
    assert v.to_dict() == {
        "domain": "acme.example",
        "status": "ok",
        "detail": "MX 10 mx.mailflow.test (this host)",
        "mx": [{"preference": 10, "host": "mx.mailflow.test"}],
        "here": "mx.mailflow.test",
        "spf": "absent",
        "dmarc": "absent",
    }


def test_a_check_line_fits_80_columns_cutting_a_long_name_and_then_the_detail_but_never_the_verdict():
    from mailflow.commands.domains import check_line

    long_name = "a-rather-long-subdomain.of-some-organisation.example.com"
    v = judge(long_name, Lookup.answer("10 mx1.elsewhere.example.", "20 mx2.elsewhere.example."), HERE, spf=NODATA)
    line = check_line(v)
    assert line == "wrong     a-rather-long-subdomain.of-so...  MX elsewhere: 10 ...  spf:no dmarc:?"
    assert len(line) == 80
    short = check_line(judge("ok.test", Lookup.answer("10 mx.mailflow.test."), HERE, spf=TIMEOUT, dmarc=NODATA))
    assert short == "ok        ok.test  MX 10 mx.mailflow.test (this host)  spf:? dmarc:no"
