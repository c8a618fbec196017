"""Direct delivery: MX lookups (a real DNS server on loopback) and sending to each recipient domain's MX hosts."""

from __future__ import annotations

import asyncio
import random

import pytest

from mailflow.errors import ConfigurationError, UsageError
from mailflow.infra.services import connect
from mailflow.outbound import mx, sending
from mailflow.outbound.senders import Sender, parse_relay_url
from mailflow.testing.sink import Sink, SinkServer

from .dns_server import DnsServer
from .test_outbound_pipeline import run_pipeline, setup_catalog, states

pytestmark = pytest.mark.integration

# -- pure decisions -------------------------------------------------------------------------


def test_mx_hosts_are_tried_by_preference_and_equal_preferences_are_shuffled():
    records = [
        mx.MxRecord(20, "backup.example.net"),
        mx.MxRecord(10, "a.example.net"),
        mx.MxRecord(10, "b.example.net"),
    ]
    orders = {tuple(mx.delivery_hosts("example.net", records, True, random.Random(seed))) for seed in range(20)}
    assert orders == {
        ("a.example.net", "b.example.net", "backup.example.net"),
        ("b.example.net", "a.example.net", "backup.example.net"),
    }


def test_a_domain_without_mx_is_its_own_mail_exchanger_only_if_it_has_an_address():
    assert mx.delivery_hosts("example.net", None, True) == ["example.net"]
    with pytest.raises(mx.NoRoute, match="no MX and no address"):
        mx.delivery_hosts("example.net", None, False)


def test_a_null_mx_means_the_domain_takes_no_mail():
    with pytest.raises(mx.NoRoute, match="null MX"):
        mx.delivery_hosts("example.net", [mx.MxRecord(0, ".")], True)


def test_overrides_name_hosts_and_optional_ports_and_reject_nonsense():
    assert mx.parse_overrides({"Example.NET": "10.0.0.5:2525, backup.internal, [2001:db8::5]:26, 2001:db8::6"}) == {
        "example.net": [("10.0.0.5", 2525), ("backup.internal", None), ("2001:db8::5", 26), ("2001:db8::6", None)]
    }
    for bad in ["host:port", "host:0", "", "[2001:db8::5", "[2001:db8::5]x"]:
        with pytest.raises(ConfigurationError, match="MAILFLOW_MX_OVERRIDES"):
            mx.parse_overrides({"example.net": bad})


def test_dns_servers_are_ip_addresses_with_optional_ports():
    resolver = mx.MxResolver(nameservers=["10.0.0.53", "127.0.0.1:5353", "[::1]:5300"])
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [
        ("10.0.0.53", 53),
        ("127.0.0.1", 5353),
        ("::1", 5300),
    ]
    for bad in ["dns.example.net", "10.0.0.1:x"]:
        with pytest.raises(ConfigurationError, match="MAILFLOW_DNS_SERVERS"):
            mx.MxResolver(nameservers=[bad])


@pytest.mark.parametrize(
    "url, expected",
    [
        ("direct://", (25, "opportunistic")),
        ("direct://?tls=none", (25, "none")),
        ("direct://?port=2525&tls=starttls", (2525, "starttls")),
    ],
)
def test_direct_relay_urls(url, expected):
    r = parse_relay_url(url)
    assert r.direct and r.host == "" and (r.port, r.tls) == expected


@pytest.mark.parametrize(
    "url", ["direct://mx.example.net", "direct://?tls=tls", "direct://?port=0", "direct://?colour=red"]
)
def test_bad_direct_relay_urls_are_refused(url):
    with pytest.raises(UsageError):
        parse_relay_url(url)


# -- the resolver against a real DNS server ---------------------------------------------------

ZONE = {
    ("multi.test", "MX"): ["20 backup.multi.test.", "10 primary.multi.test."],
    ("bare.test", "A"): ["127.0.0.1"],  # no MX: the implicit MX is the domain itself
    ("nomail.test", "MX"): ["0 ."],
    ("noaddress.test", "TXT"): ['"v=spf1 -all"'],
}


def test_the_resolver_follows_rfc_5321_and_caches_one_lookup_per_domain():
    async def scenario(server):
        resolver = mx.MxResolver(nameservers=[server.address], timeout_s=2)
        many = await asyncio.gather(*[resolver.hosts("multi.test") for _ in range(20)])
        assert all(h == [("primary.multi.test", None), ("backup.multi.test", None)] for h in many)
        assert await resolver.hosts("MULTI.test.") == many[0]  # case and trailing dot do not matter
        assert await resolver.hosts("bare.test") == [("bare.test", None)]
        for domain, why in [
            ("nomail.test", "null MX"),
            ("missing.test", "does not exist"),
            ("noaddress.test", "no MX and no address"),
        ]:
            with pytest.raises(mx.NoRoute, match=why):
                await resolver.hosts(domain)
        with pytest.raises(mx.NoRoute):  # the negative answer is cached too
            await resolver.hosts("missing.test")

    with DnsServer(ZONE) as server:
        asyncio.run(scenario(server))
    assert server.queries[("multi.test", "MX")] == 1  # twenty concurrent callers and a repeat: one question
    assert server.queries[("missing.test", "MX")] == 1


def test_a_dns_server_that_does_not_answer_is_a_temporary_failure():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never replies
        silent.bind(("127.0.0.1", 0))
        resolver = mx.MxResolver(nameservers=[f"127.0.0.1:{silent.getsockname()[1]}"], timeout_s=0.5)
        with pytest.raises(mx.LookupFailed, match="multi.test"):
            asyncio.run(resolver.hosts("multi.test"))


# -- sending ------------------------------------------------------------------------------------


def test_direct_delivery_groups_by_domain_falls_back_to_the_next_mx_and_fails_domains_without_mail(
    rt, settings, db_url
):
    """Each domain's mail goes to its own MX; a dead primary MX falls through to the backup."""
    sink_a, sink_b = Sink(), Sink()
    with SinkServer(sink_a) as a, SinkServer(sink_b) as b:
        assert a.port != b.port
        zone = {
            # a-domain.net: one MX, the first sink
            ("a-domain.net", "MX"): ["10 localhost."],
            # b-domain.net: the primary MX refuses connections (nothing listens on 127.0.0.2), the backup is the sink
            ("b-domain.net", "MX"): ["5 127.0.0.2.", "50 localhost."],
            ("nomail-domain.net", "MX"): ["0 ."],
        }
        with DnsServer(zone) as dns_server:
            # DNS gives host names; the port comes from the relay URL. Both sinks cannot share
            # one port, so b-domain.net is routed by an override naming its port (like a transport table).
            settings = settings.model_copy(
                update={
                    "dns_servers": [dns_server.address],
                    "mx_overrides": {"b-domain.net": f"127.0.0.2:{b.port},127.0.0.1:{b.port}"},
                    "queuer_interval_s": 0.02,
                }
            )
            setup_catalog(rt.store, "smtp://unused.invalid:1")
            sending.save_sender(
                rt.store,
                Sender("direct", "news@example.org", "News", f"direct://?port={a.port}&tls=opportunistic&timeout=5"),
            )
            rcpts = ["ann@a-domain.net", "bob@a-domain.net", "cid@b-domain.net", "dan@nomail-domain.net"]
            for to in rcpts:
                sending.send_transactional(
                    rt.store, sender="direct", template="reset", to=to, variables={"name": "N", "code": 1}
                )
            run_pipeline(
                rt,
                settings,
                lambda: len(states(db_url)) == 4 and set(states(db_url).values()) <= {"completed", "failed"},
            )
    assert states(db_url) == {
        "ann@a-domain.net": "completed",
        "bob@a-domain.net": "completed",
        "cid@b-domain.net": "completed",
        "dan@nomail-domain.net": "failed",
    }
    assert sink_a.delivered_to() == {"ann@a-domain.net": 1, "bob@a-domain.net": 1}
    assert sink_b.delivered_to() == {"cid@b-domain.net": 1}
    with connect(db_url) as c:
        kind, reply = c.execute(
            "SELECT failure_kind, last_reply FROM jobs WHERE email = 'dan@nomail-domain.net'"
        ).fetchone()
        attempts = c.execute("SELECT attempts FROM jobs WHERE email = 'cid@b-domain.net'").fetchone()[0]
    assert kind == "no_route" and "null MX" in reply
    assert attempts == 1  # the dead primary did not cost an attempt: the backup took it at once
    assert dns_server.queries[("a-domain.net", "MX")] == 1
