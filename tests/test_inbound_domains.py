"""`mailflow domains add|show|check` and `mailflow mailboxes show` from the command line: the MX
record to publish, `check` against a real DNS server on loopback (ok by name and by address,
wrong, missing, temperror from a server that never answers), what `show` counts after real
SMTP deliveries, and another tenant's domain or mailbox not found."""

from __future__ import annotations

import json
import time

import pytest

from mailflow.inbound import directory, routes
from mailflow.inbound.server import Limits

from .conftest import run_cli
from .dns_server import DnsServer
from .test_inbound import Server, message, run, transaction

pytestmark = pytest.mark.process

HOST = "mx.mailflow.test"  # MAILFLOW_INBOUND_HOSTNAME: the host an MX should name
ZONE = {
    (HOST, "A"): ["192.0.2.10"],
    ("ok.test", "MX"): [f"10 {HOST}."],
    ("ok.test", "TXT"): ["v=spf1 mx -all"],
    ("_dmarc.ok.test", "TXT"): ["v=DMARC1; p=reject"],
    ("alias.test", "MX"): ["10 mail.alias.test."],  # another name for this host's address
    ("mail.alias.test", "A"): ["192.0.2.10"],
    ("wrong.test", "MX"): ["20 mx2.elsewhere.test.", "10 mx1.elsewhere.test."],
    ("wrong.test", "TXT"): ["v=spf1 include:elsewhere.test -all"],
    ("mx1.elsewhere.test", "A"): ["198.51.100.1"],
    ("mx2.elsewhere.test", "A"): ["198.51.100.2"],
    ("nomx.test", "TXT"): ["v=spf1 -all"],  # exists, without an MX
    ("slow.test", "MX"): ["10 mx.slow.test."],  # never answered: see `silent`
}
# gone.test has no records at all: NXDOMAIN.
DOMAINS = ["alias.test", "gone.test", "nomx.test", "ok.test", "slow.test", "wrong.test"]


@pytest.fixture
def dns_server():
    with DnsServer(ZONE, silent={"slow.test"}) as server:
        yield server


@pytest.fixture
def dns_env(env, dns_server):
    return dict(
        env,
        MAILFLOW_INBOUND_HOSTNAME=HOST,
        MAILFLOW_DNS_SERVERS=json.dumps([dns_server.address]),
        MAILFLOW_INBOUND_DNS_TIMEOUT_S="0.5",
    )


def ok(env: dict[str, str], *args: str) -> str:
    res = run_cli(env, *args)
    assert res.returncode == 0, (res.stdout, res.stderr)
    return res.stdout


def fails(env: dict[str, str], code: int, *args: str) -> str:
    res = run_cli(env, *args)
    assert res.returncode == code, (res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr
    return res.stderr


def test_domains_add_prints_the_mx_record_to_publish_for_this_host(dns_env):
    out = ok(dns_env, "domains", "add", "Support.Example.org")
    assert out.splitlines() == [
        "receiving mail for support.example.org",
        f"publish: support.example.org. MX 10 {HOST}.",
    ]
    again = json.loads(ok(dns_env, "domains", "add", "support.example.org", "--json"))
    assert again == {"domain": "support.example.org", "created": False, "mx": f"support.example.org. MX 10 {HOST}."}


def test_domains_check_says_ok_wrong_missing_or_temperror_per_domain_and_exits_1_unless_all_are_ok(dns_env, dns_server):
    for d in DOMAINS:
        ok(dns_env, "domains", "add", d)

    res = run_cli(dns_env, "domains", "check", "--json")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["ok"], doc["host"], doc["addresses"]) == (False, HOST, ["192.0.2.10"])
    found = {v["domain"]: v for v in doc["domains"]}
    assert list(found) == DOMAINS
    assert {d: v["status"] for d, v in found.items()} == {
        "alias.test": "ok",
        "gone.test": "missing",
        "nomx.test": "missing",
        "ok.test": "ok",
        "slow.test": "temperror",
        "wrong.test": "wrong",
    }
    assert (found["ok.test"]["here"], found["ok.test"]["spf"], found["ok.test"]["dmarc"]) == (
        HOST,
        "present",
        "present",
    )
    assert (found["alias.test"]["here"], found["alias.test"]["detail"]) == (
        "mail.alias.test",
        "MX 10 mail.alias.test (this host, by address)",
    )
    wrong = found["wrong.test"]
    assert wrong["mx"] == [
        {"preference": 10, "host": "mx1.elsewhere.test"},
        {"preference": 20, "host": "mx2.elsewhere.test"},
    ]
    assert wrong["detail"] == "MX elsewhere: 10 mx1.elsewhere.test, 20 mx2.elsewhere.test"
    assert (wrong["spf"], wrong["dmarc"], wrong["publish"]) == ("present", "absent", f"wrong.test. MX 10 {HOST}.")
    assert (found["gone.test"]["detail"], found["nomx.test"]["detail"]) == ("no such domain", "no MX record")
    assert found["nomx.test"]["spf"] == "present"
    assert found["slow.test"]["detail"] == "MX lookup failed: no answer in 0.5 s"
    assert found["slow.test"]["spf"] == "unknown"
    assert dns_server.queries[("slow.test", "MX")] >= 1  # asked, through MAILFLOW_DNS_SERVERS, and given up on

    res = run_cli(dns_env, "domains", "check")
    assert res.returncode == 1, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[found[d]["status"], d] for d in DOMAINS]
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[3].endswith("spf:yes dmarc:yes") and f"MX 10 {HOST} (this host)" in lines[3]

    assert ok(dns_env, "domains", "check", "OK.test").split()[:2] == ["ok", "ok.test"]
    assert run_cli(dns_env, "domains", "check", "wrong.test").returncode == 1
    started = time.monotonic()
    assert run_cli(dns_env, "domains", "check", "slow.test").returncode == 1
    assert time.monotonic() - started < 4.0  # MAILFLOW_INBOUND_DNS_TIMEOUT_S (0.5 s), not the default 5 s
    assert "no inbound domain unknown.test" in fails(dns_env, 5, "domains", "check", "unknown.test")
    assert (
        "exit code 0 when every domain checked is ok, 1"
        in " ".join(ok(dns_env, "domains", "check", "-h").split()).lower()
    )


@pytest.fixture
def acme(store):
    directory.add_domain(store, "acme.example")
    directory.add_domain(store, "other.example")
    directory.add_mailbox(store, "help@acme.example", "Help desk")
    directory.add_mailbox(store, "desk@acme.example")
    return store


def test_domains_show_and_mailboxes_show_count_what_was_delivered_and_list_the_routes(acme, operator_store, dns_env):
    sales = routes.add_route(acme, "sales@acme.example", "mailbox", "help@acme.example")
    regex = routes.add_route(acme, "/^ops-[a-z]+@acme\\.example$/", "drop", priority=10)
    catch_all = routes.add_route(acme, "*@acme.example", "reject", priority=200)
    routes.add_route(acme, "*@other.example", "drop")  # another domain's: not shown for acme.example
    server = Server(operator_store, Limits(max_message_bytes=64 * 1024))
    try:
        for i, to in enumerate(["help@acme.example", "Help+billing@acme.example", "sales@acme.example"]):
            assert [c for c, _ in run(transaction(server.port, "ann@sender.example", [to], message(to, f"m{i}")))] == [
                250,
                250,
                250,
            ]
        for to in ["desk@acme.example", "x@other.example"]:
            assert run(transaction(server.port, "ann@sender.example", [to], message(to, to)))[-1][0] == 250
    finally:
        server.close()

    show = json.loads(ok(dns_env, "domains", "show", "ACME.example", "--json"))
    assert (show["domain"], show["mx"]) == ("acme.example", f"acme.example. MX 10 {HOST}.")
    assert [(b["address"], b["name"], b["messages"]) for b in show["mailboxes"]] == [
        ("desk@acme.example", "", 1),
        ("help@acme.example", "Help desk", 3),
    ]
    assert [r["id"] for r in show["routes"]] == [regex.id, sales.id, catch_all.id]
    assert show["messages"] == {"received": 4, "by_state": {"routed": 4}, "in_mailboxes": 4, "unread": 4}
    text = ok(dns_env, "domains", "show", "acme.example")
    assert f"publish   acme.example. MX 10 {HOST}." in text
    assert "mailbox   help@acme.example  3 message(s), 3 unread  Help desk" in text
    assert f"route     {sales.id}  sales@acme.example -> mailbox help@acme.example" in text
    assert "(a regex: may match here)" in text

    box = json.loads(ok(dns_env, "mailboxes", "show", "Help@ACME.example", "--json", "--latest", "2"))
    assert (box["address"], box["name"], box["messages"], box["unread"]) == ("help@acme.example", "Help desk", 3, 3)
    assert [r["id"] for r in box["routes"]] == [sales.id]
    assert [m["recipient"] for m in box["latest"]] == ["sales@acme.example", "help+billing@acme.example"]
    oldest = json.loads(ok(dns_env, "mailboxes", "show", "help@acme.example", "--json", "-n", "5"))["latest"][-1]
    assert oldest["recipient"] == "help@acme.example" and oldest["read_at"] is None

    ok(dns_env, "messages", "read", oldest["id"])
    box = json.loads(ok(dns_env, "mailboxes", "show", "help@acme.example", "--json"))
    assert (box["messages"], box["unread"]) == (3, 2)
    assert [m["read_at"] is not None for m in box["latest"]] == [False, False, True]
    text = ok(dns_env, "mailboxes", "show", "help@acme.example").splitlines()
    assert text[:4] == ["mailbox   help@acme.example", "name      Help desk", text[2], "messages  3 (2 unread)"]
    assert f"route     {sales.id}  sales@acme.example (priority 100)" in text
    assert [line.split()[4:] for line in text if line.startswith("message ")][-1] == ["read", "help@acme.example"]
    assert json.loads(ok(dns_env, "domains", "show", "acme.example", "--json"))["messages"]["unread"] == 3

    assert "no mailbox nobody@acme.example" in fails(dns_env, 5, "mailboxes", "show", "nobody@acme.example")
    assert "no inbound domain nowhere.example" in fails(dns_env, 5, "domains", "show", "nowhere.example")
    assert "not a domain name" in fails(dns_env, 2, "domains", "show", "not a domain")


def test_another_tenants_domain_and_mailbox_are_not_found(acme, operator_store, dns_env):
    from mailflow.tenants import registry

    registry.create(operator_store, "beta")
    beta = dict(dns_env, MAILFLOW_TENANT="beta")
    assert "no inbound domain acme.example" in fails(beta, 5, "domains", "show", "acme.example")
    assert "no inbound domain acme.example" in fails(beta, 5, "domains", "check", "acme.example")
    assert "no mailbox help@acme.example" in fails(beta, 5, "mailboxes", "show", "help@acme.example")
    assert ok(beta, "domains", "check").startswith("no inbound domains to check")  # none of acme's
    assert json.loads(ok(beta, "domains", "check", "--json"))["domains"] == []
    assert json.loads(ok(dns_env, "domains", "show", "acme.example", "--json"))["domain"] == "acme.example"
