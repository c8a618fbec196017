"""Inbound mail: the decision that keeps mailflow from being an open relay, and what the routes
decide at RCPT TO, without servers."""

from __future__ import annotations

import pytest

from mailflow.inbound import policy
from mailflow.inbound.policy import Directory, Kind
from mailflow.inbound.routes import Action, Route
from mailflow.mail import tokens

pytestmark = pytest.mark.pure

SECRET = b"inbound-test-key"

DIR = Directory(
    domains={"acme.example": "acme", "beta.example": "beta"},
    mailboxes={"help@acme.example": "acme", "desk@other.example": "beta"},
    senders={"news@shop.example": frozenset({"default"})},
    sender_domains=frozenset({"shop.example"}),
    routes={
        "acme": (
            Route("spam", "acme", 10, "spam@acme.example", Action.REJECT, "Go away"),
            Route("urgent", "acme", 20, "urgent@acme.example", Action.REJECT, headers=(("subject", "urgent"),)),
            Route("all", "acme", 100, "/.*/", Action.DROP),  # a regex: any address - of acme's domains only
        )
    },
)


def _verp(address: str) -> str | None:
    try:
        return tokens.job_from_verp(SECRET, address)
    except tokens.BadToken:
        return None


# -- the decision, without servers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("rcpt", "kind", "tenants"),
    [
        ("help@acme.example", Kind.MAILBOX, ("acme",)),
        ("Help+Billing@ACME.example", Kind.MAILBOX, ("acme",)),  # any case, +tag stripped
        ("desk@other.example", Kind.MAILBOX, ("beta",)),  # a mailbox outside an inbound domain
        ("anyone@acme.example", Kind.ROUTE, ("acme",)),  # a route of the tenant's takes it
        ("urgent@acme.example", Kind.ROUTE, ("acme",)),  # a reject that needs its headers: not yet
        ("news@shop.example", Kind.REPLY, ("default",)),  # a reply to one of its senders
        ("@relay.example:help@acme.example", Kind.MAILBOX, ("acme",)),  # a source route is ignored
    ],
)
def test_addresses_mailflow_is_responsible_for_are_accepted_for_their_tenant(rcpt, kind, tenants):
    d = policy.decide(rcpt, DIR, _verp)
    assert (d.kind, d.tenants) == (kind, tenants) and d.reply.startswith("250")


@pytest.mark.parametrize(
    "rcpt",
    [
        "victim@foreign.example",  # someone else's domain
        "other@shop.example",  # a sender's domain is not an inbound domain
        "@acme.example:victim@foreign.example",  # a source route through us
        "victim%foreign.example@acme.example",  # the percent hack
        "foreign.example!victim@acme.example",  # a bang path
        '"victim@foreign.example"@acme.example',  # a quoted local part
    ],
)
def test_everything_else_is_relaying_denied(rcpt):
    d = policy.decide(rcpt, DIR, _verp)
    assert d.kind is Kind.REFUSED and d.reply.startswith("550 5.7.1")


def test_an_address_at_an_inbound_domain_that_no_mailbox_or_route_takes_is_no_such_mailbox():
    d = policy.decide("anyone@beta.example", DIR, _verp)  # acme's regex takes any address, but not beta's
    assert (d.kind, d.tenants, d.reply) == (Kind.REFUSED, ("beta",), policy.NO_SUCH_MAILBOX)
    assert d.reply.startswith("550 5.1.1")
    assert DIR.routes_for("anyone@beta.example") == () and DIR.routes_for("x@foreign.example") == ()


def test_a_route_that_rejects_without_header_conditions_refuses_at_rcpt_with_its_own_text():
    d = policy.decide("Spam+x@acme.example", DIR, _verp)
    assert (d.kind, d.route_id, d.reply) == (Kind.REFUSED, "spam", "550 5.7.1 Go away")
    taken = policy.decide("anyone@acme.example", DIR, _verp)
    assert (taken.kind, taken.route_id, taken.reply) == (Kind.ROUTE, "all", "250 2.1.5 OK")


def test_a_mailbox_keeps_its_mail_before_any_route_is_tried():
    d = policy.decide("help+spam@acme.example", DIR, _verp)
    assert (d.kind, d.route_id) == (Kind.MAILBOX, None)


def test_a_bounce_address_is_accepted_only_with_a_genuine_signature():
    good = tokens.verp_address(SECRET, "0190f5a2-7c1e-7d0a-9b1e-1f2a3b4c5d6e", "shop.example")
    d = policy.decide(good, DIR, _verp)
    assert d.kind is Kind.BOUNCE and d.job_id == "0190f5a2-7c1e-7d0a-9b1e-1f2a3b4c5d6e"
    forged = tokens.verp_address(b"another-key", "0190f5a2-7c1e-7d0a-9b1e-1f2a3b4c5d6e", "shop.example")
    assert policy.decide(forged, DIR, _verp).reply.startswith("550 5.1.1")
    assert policy.decide("bounces+x@foreign.example", DIR, _verp).reply.startswith("550 5.7.1")


def test_a_list_unsubscribe_address_is_accepted_only_with_a_genuine_campaign_token():
    campaign = "0190f5a2-7c1e-7d0a-9b1e-1f2a3b4c5d6e"
    good = f"unsubscribe+{tokens.sign(SECRET, campaign + ':ann@example.net')}@shop.example"
    d = policy.decide(good, DIR, _verp)
    assert d.kind is Kind.UNSUBSCRIBE and d.campaign_id == campaign and d.accepted
    forged = f"unsubscribe+{tokens.sign(b'another-key', campaign + ':ann@example.net')}@shop.example"
    assert policy.decide(forged, DIR, _verp).reply == policy.UNKNOWN_UNSUBSCRIBE
    a_job_token = f"unsubscribe+{tokens.sign(SECRET, campaign)}@shop.example"  # a VERP payload: no address
    assert policy.decide(a_job_token, DIR, _verp).reply == policy.UNKNOWN_UNSUBSCRIBE
    assert policy.decide(good.replace("shop.example", "foreign.example"), DIR, _verp).reply.startswith("550 5.7.1")
