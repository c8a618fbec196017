"""`mailflow senders add|test` with a direct:// relay: the MX host is found and EHLOed; bad URLs are one line."""

from __future__ import annotations

import json

import pytest

from mailflow.testing.sink import SinkServer

from .conftest import run_cli

pytestmark = pytest.mark.process


def test_senders_test_on_a_direct_sender_ehlos_the_mx_host_of_the_domain_it_is_given(env):
    with SinkServer() as server:
        # The sink stands in for example.net's MX host; every other domain routes to a closed port.
        denv = dict(
            env, MAILFLOW_MX_OVERRIDES=json.dumps({"example.net": f"127.0.0.1:{server.port}", "*": "127.0.0.1:1"})
        )
        added = run_cli(
            denv, "senders", "add", "direct", "--from", "news@example.org", "--relay", "direct://?timeout=5"
        )
        assert added.returncode == 0, added.stderr
        assert "via direct to MX hosts, tls opportunistic" in added.stdout

        probed = run_cli(denv, "senders", "test", "direct", "--domain", "example.net", "--json")
        own_domain = run_cli(denv, "senders", "test", "direct")  # without --domain: the sender's own, example.org

    assert probed.returncode == 0, probed.stderr
    res = json.loads(probed.stdout)
    assert res["direct"] is True and (res["host"], res["port"]) == ("127.0.0.1", server.port)
    assert res["ehlo_code"] == 250 and res["tls"] == "opportunistic"
    assert own_domain.returncode == 2
    assert own_domain.stderr.startswith("error: relay 127.0.0.1:1 failed"), own_domain.stderr


@pytest.mark.parametrize(
    "url, why",
    [
        ("direct://mx.example.net", "direct delivery takes no host"),
        ("direct://?tls=tls", "tls for direct delivery must be none, opportunistic or starttls"),
        ("direct://?port=0", "port must be a number from 1 to 65535"),
    ],
)
def test_a_bad_direct_relay_url_is_one_error_line_with_exit_code_2_and_saves_nothing(env, url, why):
    res = run_cli(env, "senders", "add", "bad", "--from", "news@example.org", "--relay", url)
    assert res.returncode == 2
    [line] = res.stderr.splitlines()
    assert line.startswith(f"error: relay URL {url}: {why}"), res.stderr
    assert json.loads(run_cli(env, "senders", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    "name, value, why",
    [
        ("MAILFLOW_DNS_SERVERS", "10.0.0.53", "not valid JSON"),
        ("MAILFLOW_MX_OVERRIDES", "example.net=10.0.0.5", "not valid JSON"),
        ("MAILFLOW_EHLO_HOSTNAME", " ", "String should match pattern"),
    ],
)
def test_a_malformed_delivery_setting_is_one_error_line_with_exit_code_2(env, name, value, why):
    res = run_cli(dict(env, **{name: value}), "queues")
    assert res.returncode == 2
    [line] = res.stderr.splitlines()
    assert line.startswith(f"error: bad setting {name}: {why}"), res.stderr


@pytest.mark.parametrize(
    "name, value",
    [("MAILFLOW_DNS_SERVERS", '["dns.example.net"]'), ("MAILFLOW_MX_OVERRIDES", '{"example.net": "host:99999"}')],
)
def test_a_worker_with_an_unusable_route_setting_refuses_to_start(env, name, value):
    res = run_cli(dict(env, **{name: value}), "worker")
    assert res.returncode == 2
    [line] = res.stderr.splitlines()
    assert line.startswith(f"error: bad setting {name}: "), res.stderr
