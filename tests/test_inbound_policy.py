"""Inbound mail: the decision that keeps mailflow from being an open relay, without servers."""

from __future__ import annotations

import pytest

from mailflow.inbound import policy
from mailflow.inbound.policy import Directory, Kind
from mailflow.mail import tokens

pytestmark = pytest.mark.pure

SECRET = b"inbound-test-key"

DIR = Directory(
    domains={"acme.example": "acme"},
    mailboxes={"help@acme.example": "acme", "desk@other.example": "beta"},
    senders={"news@shop.example": frozenset({"default"})},
    sender_domains=frozenset({"shop.example"}),
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
        ("anyone@acme.example", Kind.DOMAIN, ("acme",)),  # the tenant's domain: routes decide
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


def test_a_bounce_address_is_accepted_only_with_a_genuine_signature():
    good = tokens.verp_address(SECRET, "0190f5a2-7c1e-7d0a-9b1e-1f2a3b4c5d6e", "shop.example")
    d = policy.decide(good, DIR, _verp)
    assert d.kind is Kind.BOUNCE and d.job_id == "0190f5a2-7c1e-7d0a-9b1e-1f2a3b4c5d6e"
    forged = tokens.verp_address(b"another-key", "0190f5a2-7c1e-7d0a-9b1e-1f2a3b4c5d6e", "shop.example")
    assert policy.decide(forged, DIR, _verp).reply.startswith("550 5.1.1")
    assert policy.decide("bounces+x@foreign.example", DIR, _verp).reply.startswith("550 5.7.1")
