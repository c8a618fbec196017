"""Sending domains against real servers: `add` generates the DKIM key (kept in the vault, in no
event and no output) and shows the records; published on a loopback DNS server they verify;
one taken away, the periodic re-check reports it broken and the domain failing; a DNS server
that never answers is an error, not a broken record; another tenant sees nothing; senders of
the domain sign with its key; the queuer runs the re-check in a thread; the CLI end to end."""

from __future__ import annotations

import json
import os
import time

import dkim
import pytest
import structlog

from mailflow.consumers import inline
from mailflow.errors import ConflictError, NotFoundError
from mailflow.events.envelope import uuid7
from mailflow.outbound import domains, mime, sending
from mailflow.outbound.domains import Purpose, Resolver, Status, Verdict
from mailflow.outbound.queuer import Queuer
from mailflow.outbound.senders import Sender
from mailflow.outbound.templates import Rendered
from mailflow.tenants import registry

from .dns_server import DnsServer

pytestmark = pytest.mark.integration

OUT = "mta.mailflow.test"  # MAILFLOW_EHLO_HOSTNAME: what SPF authorises
IN = "mx.mailflow.test"  # MAILFLOW_INBOUND_HOSTNAME: where the return path's MX points
PRIVATE = "PRIVATE KEY"


@pytest.fixture
def dns_server():
    with DnsServer({("unrelated.test", "A"): ["192.0.2.1"]}) as server:
        yield server


@pytest.fixture
def s(settings, dns_server):
    return settings.model_copy(
        update={
            "ehlo_hostname": OUT,
            "inbound_hostname": IN,
            "dns_servers": [dns_server.address],
            "domain_dns_timeout_s": 0.5,
        }
    )


@pytest.fixture
def resolver(s):
    return Resolver.from_settings(s)


def publish(server: DnsServer, domain: domains.SendingDomain) -> None:
    """Put every record to publish on the loopback server (a long TXT value split into 255-byte strings)."""
    for record in domain.records:
        server.records[(record.name, record.type)] = [zone_value(record.type, record.strings)]
    server.records.pop(("unrelated.test", "A"), None)


def zone_value(rdtype: str, strings: list[str]) -> str:
    """A record's value as a zone file gives it: a TXT value as its quoted strings."""
    return " ".join(f'"{x}"' for x in strings) if rdtype == "TXT" else strings[0]


def events_of(db, *types: str) -> list[dict]:
    rows = db.execute("SELECT type, data FROM events WHERE type = ANY(%s) ORDER BY seq", (list(types),))
    return [{"type": t, **d} for t, d in rows.fetchall()]


ALL_TYPES = ("SendingDomainAdded", "SendingDomainChecked", "SendingDomainRecordBroken", "SendingDomainRemoved")


def test_add_shows_the_records_and_the_private_key_is_only_in_the_vault(rt, store, s, db):
    added = domains.add(store, rt.vault, "Acme.Example", settings=s)
    assert (added.domain, added.selector, added.status) == ("acme.example", "mailflow", Status.PENDING)
    assert [(r.purpose, r.name) for r in added.records] == [
        (Purpose.SPF, "acme.example"),
        (Purpose.DKIM, "mailflow._domainkey.acme.example"),
        (Purpose.DMARC, "_dmarc.acme.example"),
        (Purpose.RETURN_PATH, "acme.example"),
    ]
    assert added.records[3].value == f"10 {IN}."

    (event,) = events_of(db, "SendingDomainAdded")
    assert event["dkim_public_key"] == added.dkim_public_key and event["dkim_key"]["fingerprint"].startswith("sha256:")
    assert PRIVATE not in json.dumps(event) and PRIVATE not in json.dumps(added.to_dict())
    with rt.connect() as conn:
        pem = rt.vault.get(conn, event["dkim_key"]["id"])
    assert PRIVATE in pem  # the key that signs, encrypted at rest
    stored = db.execute("SELECT ciphertext FROM secrets WHERE owner = 'sending-domain:acme.example'").fetchone()
    assert PRIVATE.encode() not in bytes(stored[0])

    with pytest.raises(ConflictError, match="already"):
        domains.add(store, rt.vault, "acme.example", settings=s)
    again = domains.add(store, rt.vault, "acme.example", settings=s, exist_ok=True)  # a retried request
    assert again.dkim_public_key == added.dkim_public_key and len(events_of(db, "SendingDomainAdded")) == 1


def test_published_records_verify_then_one_taken_away_is_reported_broken_by_the_recheck(
    rt, store, operator_store, s, resolver, dns_server, db
):
    added = domains.add(store, rt.vault, "acme.example", settings=s)
    first = domains.verify(store, "acme.example", resolver, settings=s)
    assert first.status is Status.FAILING and not first.ok  # nothing published yet
    assert {c.status for c in first.checks} == {Verdict.MISSING}

    publish(dns_server, added)
    checked = domains.verify(store, "acme.example", resolver, settings=s)
    assert checked.ok and checked.status is Status.VERIFIED and checked.broken == []
    assert {c.purpose: c.status for c in checked.checks}[Purpose.DMARC] is Verdict.WARNING  # p=none
    with rt.connect() as conn:
        shown = domains.get(conn, "acme.example", settings=s)
    assert shown.status is Status.VERIFIED and shown.last_checked_at is not None
    assert [c.status for c in shown.last_check or []] == [c.status for c in checked.checks]

    del dns_server.records[("mailflow._domainkey.acme.example", "TXT")]
    dns_server.records[("unrelated.test", "A")] = ["192.0.2.1"]
    assert domains.recheck_due(operator_store, resolver, interval_s=3600, settings=s) == 0  # checked lately
    assert domains.recheck_due(operator_store, resolver, interval_s=0, settings=s) == 1
    (broken,) = events_of(db, "SendingDomainRecordBroken")
    assert (broken["purpose"], broken["name"], broken["was"], broken["now"]) == (
        "dkim",
        "mailflow._domainkey.acme.example",
        "ok",
        "missing",
    )
    with rt.connect() as conn:
        assert domains.get(conn, "acme.example", settings=s).status is Status.FAILING
    domains.recheck_due(operator_store, resolver, interval_s=0, settings=s)
    assert len(events_of(db, "SendingDomainRecordBroken")) == 1  # said once, not at every check
    for e in events_of(db, *ALL_TYPES):
        assert PRIVATE not in json.dumps(e)


def test_a_dns_server_that_never_answers_is_an_error_that_breaks_nothing(rt, store, s, resolver, dns_server, db):
    added = domains.add(store, rt.vault, "acme.example", settings=s)
    publish(dns_server, added)
    assert domains.verify(store, "acme.example", resolver, settings=s).status is Status.VERIFIED
    dns_server.silent.add("mailflow._domainkey.acme.example")
    began = time.monotonic()
    unsure = domains.verify(store, "acme.example", resolver, settings=s)
    assert time.monotonic() - began < 3  # bounded by the timeout (0.5 s), the questions asked at once
    dkim_check = {c.purpose: c for c in unsure.checks}[Purpose.DKIM]
    assert dkim_check.status is Verdict.ERROR and "no answer" in dkim_check.detail
    assert unsure.status is Status.VERIFIED and unsure.broken == [] and not unsure.ok
    assert events_of(db, "SendingDomainRecordBroken") == []


def test_another_tenant_can_neither_see_nor_change_nor_take_the_domain(rt, store, operator_store, s, resolver):
    domains.add(store, rt.vault, "acme.example", settings=s)
    registry.create(operator_store, "beta")
    beta = operator_store.for_tenant("beta")
    with inline.reading(beta) as conn:
        with pytest.raises(NotFoundError, match="no sending domain acme.example"):
            domains.get(conn, "acme.example", settings=s)
        assert domains.listing(conn, settings=s) == []
    with pytest.raises(NotFoundError):
        domains.verify(beta, "acme.example", resolver, settings=s)
    with pytest.raises(NotFoundError):
        domains.remove(beta, "acme.example")
    with pytest.raises(ConflictError, match="another tenant"):
        domains.add(beta, rt.vault, "acme.example", settings=s)
    with rt.connect() as conn:
        assert [d.domain for d in domains.listing(conn, settings=s)] == ["acme.example"]


def test_a_sender_without_a_key_of_its_own_signs_with_the_domains_and_holds_back_its_removal(rt, store, s, dns_server):
    added = domains.add(store, rt.vault, "acme.example", settings=s)
    sending.save_sender(store, Sender("news", "news@acme.example", "News", "smtp://127.0.0.1:2525?tls=none"), rt.vault)
    with rt.connect() as conn:
        signer = sending.load_sender(conn, "news", vault=rt.vault)
        plain = sending.load_sender(conn, "news")  # not for sending: its own references only
    assert signer.dkim_selector == "mailflow" and PRIVATE in (signer.dkim_key_pem or "")
    assert plain.dkim_selector is None
    out = mime.build(
        job_id=str(uuid7()),
        sender=signer,
        to="ann@example.net",
        rendered=Rendered("Hello", "", "Hi Ann"),
        secret=b"k" * 32,
    )
    record = added.records[1]
    assert out.data.startswith(b"DKIM-Signature:") and b"s=mailflow" in out.data[:400]

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record.value.encode() if name.decode().rstrip(".") == record.name else b""

    assert dkim.verify(out.data, dnsfunc=dnsfunc)  # the published key verifies the signature

    with pytest.raises(ConflictError, match="news"):
        domains.remove(store, "acme.example")
    sending.delete_sender(store, "news")
    domains.remove(store, "acme.example")
    with rt.connect() as conn, pytest.raises(NotFoundError):
        domains.get(conn, "acme.example", settings=s)
    left = rt.vault.listing
    with rt.connect() as conn:
        assert [x for x in left(conn) if x["owner"] == "sending-domain:acme.example"] == []


def test_dns_rechecks_are_a_periodic_duty_the_queuer_schedules_and_dns_trouble_is_the_duty_s_alone(
    rt, store, operator_store, s, redis_url, dns_server, db
):
    from mailflow.infra.services import redis_client
    from mailflow.runtime.duties import duties

    added = domains.add(store, rt.vault, "acme.example", settings=s)
    publish(dns_server, added)
    on = s.model_copy(update={"periodic_duties": True})
    queuer = Queuer(operator_store, redis_url, on)
    r = redis_client(redis_url, check=False)
    try:
        queuer.tick(r)  # the leader's housekeeping turns the due duties into low-priority jobs
        kinds = dict(db.execute("SELECT kind, priority FROM jobs WHERE tenant = '_system'").fetchall())
        assert kinds == {"aggregate": "low", "cleanup": "low", "dns_check": "low"}
        check = duties(operator_store, on)["dns_check"]
        assert check({}) == "checked 1 sending domain(s)"
        (checked,) = events_of(db, "SendingDomainChecked")
        assert checked["status"] == "verified"
        assert check({}) == "checked 0 sending domain(s)"  # checked lately

        dns_server.silent.update(r.name for r in added.records)  # a DNS server that hangs
        db.execute("UPDATE sending_domains SET last_checked_at = now() - interval '2 hours'")
        db.execute("UPDATE periodic SET next_due = now() WHERE name = 'dns_check'")
        db.execute("UPDATE jobs SET state = 'completed' WHERE tenant = '_system'")
        queuer._housekept = 0.0  # housekeeping is at most once a second
        began = time.monotonic()
        queuer.tick(r)
        assert time.monotonic() - began < 2  # scheduling the duty does not wait for DNS
        assert db.execute("SELECT count(*) FROM jobs WHERE kind = 'dns_check'").fetchone() == (2,)
        check({})
        assert events_of(db, "SendingDomainChecked")[-1]["status"] == "verified"  # errors: status kept

        broken = duties(operator_store, on.model_copy(update={"dns_servers": ["not-an-address"]}))["dns_check"]
        with pytest.raises(Exception):  # noqa: B017 - the worker retries a duty that raises, whatever it raised
            broken({})
        assert queuer.tick(r) >= 0
    finally:
        r.close()


# -- the command line ---------------------------------------------------------------------------


def cli(env, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`mailflow ARGS` in this process, as cli.main() runs it, with the sending-domains noun in the table."""
    from mailflow import cli as entry
    from mailflow.commands import base

    for k in [k for k in os.environ if k.startswith("MAILFLOW_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("MAILFLOW_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setitem(entry.COMMANDS, "sending-domains", ("sending_domains", "Sending domains."))
    base.state.settings = None
    logging_before = structlog.get_config()
    try:
        with pytest.raises(SystemExit) as exited:
            entry.main(list(args))
    finally:
        structlog.configure(**logging_before)
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


@pytest.fixture
def dns_env(env, dns_server):
    return dict(
        env,
        MAILFLOW_EHLO_HOSTNAME=OUT,
        MAILFLOW_INBOUND_HOSTNAME=IN,
        MAILFLOW_DNS_SERVERS=json.dumps([dns_server.address]),
        MAILFLOW_DOMAIN_DNS_TIMEOUT_S="0.5",
    )


def test_the_sending_domains_commands_end_to_end(dns_env, dns_server, monkeypatch, capsys, operator_store, s):
    def run(*args: str, env: dict[str, str] = dns_env) -> tuple[int, str, str]:
        return cli(env, monkeypatch, capsys, "sending-domains", *args)

    code, added, err = run("add", "acme.example")
    assert code == 0, err
    lines = added.splitlines()
    print(added)
    assert max(len(line) for line in lines) <= 80
    assert lines[0] == "sending from acme.example" and lines[1].startswith("DKIM selector mailflow, key sha256:")
    assert "SPF  TXT  acme.example" in lines and "DKIM  TXT  mailflow._domainkey.acme.example" in lines
    assert f"    v=spf1 a:{OUT} ~all" in lines and f"    10 {IN}." in lines
    assert PRIVATE not in added

    code, _, err = run("add", "acme.example")
    assert (
        code == 4 and err.startswith("error: acme.example is a sending domain already") and len(err.splitlines()) == 1
    )

    code, shown, _ = run("show", "acme.example", "--json")
    detail = json.loads(shown)
    assert code == 0 and detail["status"] == "pending" and detail["last_check"] is None and PRIVATE not in shown
    wrapped = "".join(line[4:] for line in lines[lines.index("DKIM  TXT  mailflow._domainkey.acme.example") + 1 :][:6])
    assert f"p={detail['dkim_public_key']}" in wrapped  # the value, cut into lines of 76

    code, out, _ = run("verify", "acme.example")
    assert code == 1 and out.startswith("acme.example: failing") and "missing  spf" in out

    for r in detail["records"]:
        dns_server.records[(r["name"], r["type"])] = [zone_value(r["type"], r["strings"])]
    code, out, err = run("verify", "acme.example")
    assert code == 0, (out, err)
    assert out.splitlines()[0] == "acme.example: verified" and "warning  dmarc" in out
    assert max(len(line) for line in out.splitlines()) <= 80

    code, listed, _ = run("list")
    assert code == 0 and listed.startswith("acme.example") and "verified" in listed
    code, shown, _ = run("show", "acme.example")
    assert code == 0 and "ok       dkim" in shown and max(len(x) for x in shown.splitlines()) <= 80

    del dns_server.records[("_dmarc.acme.example", "TXT")]
    code, out, _ = run("verify", "acme.example", "--json")
    check = json.loads(out)
    assert code == 1 and check["status"] == "failing" and [b["purpose"] for b in check["broken"]] == ["dmarc"]

    registry.create(operator_store, "beta")
    beta = dict(dns_env, MAILFLOW_TENANT="beta")
    for args in (("show", "acme.example"), ("verify", "acme.example"), ("remove", "acme.example")):
        code, _, err = run(*args, env=beta)
        assert code == 5 and err.startswith("error: no sending domain acme.example"), err
    assert run("list", "--json", env=beta)[1].strip() == "[]"

    code, out, _ = run("remove", "acme.example", "--json")
    assert code == 0 and json.loads(out) == {"removed": "acme.example"}
    assert run("show", "acme.example")[0] == 5
    code, _, err = run("add", "not a domain")
    assert code == 2 and "not a domain name" in err


def test_the_sending_domains_table_is_an_inline_projection_that_a_rebuild_gives_back(
    rt, store, operator_store, s, resolver, dns_server, db
):
    from mailflow.runtime.projections import inline_projections

    assert inline_projections()["sending_domains"] is domains.PROJECTION
    added = domains.add(store, rt.vault, "acme.example", settings=s)
    domains.add(store, rt.vault, "news.acme.example", settings=s, selector="mf2026")
    publish(dns_server, added)
    domains.verify(store, "acme.example", resolver, settings=s)
    domains.remove(store, "news.acme.example")
    table = "SELECT tenant, domain, dkim_selector, status, last_check, last_checked_at FROM sending_domains"
    before = db.execute(table).fetchall()
    domains.PROJECTION.rebuild(operator_store)
    assert db.execute(table).fetchall() == before and [r[1] for r in before] == ["acme.example"]
