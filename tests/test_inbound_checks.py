"""Inbound mail, what the server finds out before its 250 and what it does with it: SPF, DKIM
and DMARC against a real DNS server on loopback, the Authentication-Results on the stored
copy, the spam check (built-in rules, a real spamd) with per-tenant thresholds, quarantine,
default routing of bounces and replies to the sending identity, and malformed mail marked."""

from __future__ import annotations

import json

import dkim
import pytest

from mailflow.inbound import mailbox
from mailflow.inbound.authn import Authenticator
from mailflow.inbound.server import Limits
from mailflow.inbound.spam import Checker, Spamd
from mailflow.mail import tokens
from mailflow.outbound import sending, templates
from mailflow.outbound.senders import Sender
from mailflow.testing.dns import DnsServer, dkim_keypair

from .conftest import run_cli, wait_until
from .servers import free_port
from .spamd import RealSpamd
from .test_inbound import SECRET, Server, run, transaction

pytestmark = pytest.mark.process

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


KEY, RECORD = dkim_keypair()
# The test client connects from 127.0.0.1: that is the address SPF authorises (or not).
ZONE = {
    ("good.test", "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
    ("sel._domainkey.good.test", "TXT"): [RECORD],
    ("_dmarc.good.test", "TXT"): ["v=DMARC1; p=reject"],
    ("bank.test", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
    ("_dmarc.bank.test", "TXT"): ["v=DMARC1; p=reject"],
    ("shop.test", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
    ("_dmarc.shop.test", "TXT"): ["v=DMARC1; p=quarantine"],
    ("client.test", "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
}


def mail(from_: str, body: str = "Hello, are you open on Saturday?\r\n", subject: str = "A question") -> bytes:
    return (
        f"From: {from_}\r\nTo: help@acme.example\r\nSubject: {subject}\r\n"
        "Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <q1@good.test>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


def signed(data: bytes) -> bytes:
    return dkim.sign(data, b"sel", b"good.test", KEY, include_headers=[b"from", b"to", b"subject", b"date"]) + data


@pytest.fixture(scope="module")
def dns_server():
    with DnsServer(ZONE) as server:
        yield server


def serve(operator_store, dns_server, checker: Checker | None = None) -> Server:
    return Server(
        operator_store,
        Limits(max_message_bytes=256 * 1024),
        authenticator=Authenticator(nameservers=[dns_server.address], timeout_s=1.0),
        checker=checker,
    )


@pytest.fixture
def server(operator_store, acme, dns_server):
    s = serve(operator_store, dns_server)
    yield s
    s.close()


def stored(db) -> list[dict]:
    cols = ("id", "state", "auth", "spam", "defects", "routing", "reason")
    return [dict(zip(cols, r)) for r in db.execute(f"SELECT {', '.join(cols)} FROM inbound_messages").fetchall()]


def test_good_mail_signed_and_passing_spf_lands_in_its_mailbox_with_authentication_results(server, db, store):
    replies = run(transaction(server.port, "alice@good.test", ["help@acme.example"], signed(mail("alice@good.test"))))
    assert [c for c, _ in replies] == [250, 250, 250]
    [m] = stored(db)
    assert m["state"] == "routed"
    assert (m["auth"]["spf"], m["auth"]["dmarc"], [d["result"] for d in m["auth"]["dkim"]]) == (
        "pass",
        "pass",
        ["pass"],
    )
    assert m["routing"] == [
        {
            "recipient": "help@acme.example",
            "action": "mailbox",
            "target": "help@acme.example",
            "route_id": None,
            "captures": {},
        }
    ]
    with store.pool.connection() as conn:
        [row] = mailbox.messages(conn, mailbox="help@acme.example")
        raw = mailbox.raw(conn, str(row["id"]))
    assert row["unread"] is True
    first = raw.split(b"\r\n\r\n", 1)[0].decode()
    assert first.startswith("Authentication-Results: mx.test;")
    assert "spf=pass" in first and "dkim=pass" in first and "dmarc=pass" in first
    # the stored copy is the received bytes after mailflow's header, and the event names them by hash
    event = db.execute("SELECT data FROM events WHERE type = 'MessageReceived'").fetchone()[0]
    assert event["auth"]["dmarc"] == "pass" and event["spam"]["score"] < 5 and event["defects"] == []


def test_a_spoofed_from_failing_dmarc_with_p_reject_is_refused_at_data_and_nothing_is_stored(server, db):
    replies = run(transaction(server.port, "x@client.test", ["help@acme.example"], mail("Bank <alerts@bank.test>")))
    assert replies[-1][0] == 550 and replies[-1][1].startswith("5.7.1")
    assert stored(db) == []
    assert db.execute("SELECT count(*) FROM raw_messages").fetchone()[0] == 0
    [(data, tenant)] = db.execute("SELECT data, metadata->>'tenant' FROM events WHERE type = 'MessageRejected'")
    assert (data["stage"], tenant, data["message_id"]) == ("data", "default", None)


def test_p_quarantine_holds_the_message_and_release_delivers_it_drop_deletes_it(server, db, store, env):
    for subject in ("first", "second"):
        replies = run(
            transaction(
                server.port, "x@client.test", ["help@acme.example"], mail("Shop <news@shop.test>", subject=subject)
            )
        )
        assert replies[-1][0] == 250
    held = stored(db)
    assert [m["state"] for m in held] == ["quarantined", "quarantined"]
    assert all(m["reason"].startswith("spam score") for m in held)
    assert db.execute("SELECT count(*) FROM mailbox_messages").fetchone()[0] == 0
    listed = json.loads(run_cli(env, "quarantine", "list", "--json").stdout)
    assert {r["id"] for r in listed} == {str(m["id"]) for m in held}
    keep, throw = (str(m["id"]) for m in held)

    res = run_cli(env, "quarantine", "release", keep[:8])
    assert res.returncode == 0, res.stderr
    res = run_cli(env, "quarantine", "drop", throw[:8])
    assert res.returncode == 0, res.stderr
    states = {str(m["id"]): m["state"] for m in stored(db)}
    assert states == {keep: "routed", throw: "rejected"}
    assert [str(r[0]) for r in db.execute("SELECT message_id FROM mailbox_messages")] == [keep]
    res = run_cli(env, "messages", "raw", throw[:8])
    assert res.returncode != 0 and "deleted" in res.stderr
    # a released message cannot be released again
    again = run_cli(env, "quarantine", "release", keep[:8])
    assert again.returncode != 0 and "routed, not quarantined" in again.stderr


def test_a_tenants_own_thresholds_decide(operator_store, acme, dns_server, db, env):
    res = run_cli(env, "quarantine", "thresholds", "--quarantine", "30", "--reject", "40")
    assert res.returncode == 0 and "quarantine at 30, reject at 40" in res.stdout
    s = serve(operator_store, dns_server)
    try:
        replies = run(transaction(s.port, "x@client.test", ["help@acme.example"], mail("Bank <alerts@bank.test>")))
    finally:
        s.close()
    assert replies[-1][0] == 250  # 15 points of DMARC p=reject: under this tenant's thresholds
    [m] = stored(db)
    assert m["state"] == "routed" and m["spam"]["score"] >= 15


@pytest.fixture(scope="module")
def spamd():
    with RealSpamd() as daemon:
        yield daemon


def test_gtube_is_refused_at_data_by_a_real_spamd_and_spamd_down_leaves_mail_unscored(
    operator_store, acme, dns_server, db, spamd
):
    s = serve(operator_store, dns_server, Checker(Spamd("127.0.0.1", spamd.port, timeout_s=20), timeout_s=20))
    try:
        spam = run(transaction(s.port, "x@client.test", ["help@acme.example"], mail("x@client.test", GTUBE + "\r\n")))
        ham = run(transaction(s.port, "x@client.test", ["help@acme.example"], mail("x@client.test")))
    finally:
        s.close()
    assert spam[-1][0] == 550 and spam[-1][1].startswith("5.7.1")
    assert ham[-1][0] == 250
    [m] = stored(db)
    assert m["spam"]["scorer"] == "spamd" and m["spam"]["unscored"] is False

    down = serve(operator_store, dns_server, Checker(Spamd("127.0.0.1", free_port(), timeout_s=2), timeout_s=2))
    try:
        spam = run(transaction(down.port, "x@client.test", ["help@acme.example"], mail("x@client.test", GTUBE)))
    finally:
        down.close()
    assert spam[-1][0] == 250  # never lose mail: accepted, and marked
    unscored = [m for m in stored(db) if m["spam"]["unscored"]]
    assert len(unscored) == 1 and "refused" in unscored[0]["spam"]["error"]


def test_a_bounce_and_a_reply_go_to_the_sending_identitys_mailbox(server, db, store):
    sending.save_sender(store, Sender("news", "News@Example.org", "News", "smtp://127.0.0.1:1?tls=none"))
    templates.save(store, templates.Template("t", "Hi", "<p>Hi</p>"))
    job, _ = sending.send_transactional(store, sender="news", template="t", to="reader@example.net", variables={})
    verp = tokens.verp_address(SECRET, job, "example.org")

    def sent() -> list:
        return [
            run(transaction(server.port, "", [verp], mail("MAILER-DAEMON@mx.example.net", subject="Undelivered")))[-1][
                0
            ],
            run(transaction(server.port, "reader@example.net", ["news@example.org"], mail("reader@example.net")))[-1][
                0
            ],
        ]

    # The server reads new senders within its reload interval; the same bytes sent again are
    # the same message (stored once), so asking until both are accepted adds nothing twice.
    wait_until(lambda: sent() == [250, 250], 10, interval=0.3, what="both to be accepted")
    boxes = sorted((r[0], r[1]) for r in db.execute("SELECT mailbox, recipient FROM mailbox_messages"))
    assert boxes == [("news@example.org", verp), ("news@example.org", "news@example.org")]


def test_malformed_mail_is_stored_and_marked(server, db):
    broken = (
        b"From: x@client.test\r\nTo: help@acme.example\r\nContent-Type: multipart/mixed; boundary=zz\r\n"
        b"Subject: =?utf-8?b?not base64 at all?=\r\n\r\nno boundary ever comes\r\n"
    )
    replies = run(transaction(server.port, "x@client.test", ["help@acme.example"], broken))
    assert replies[-1][0] == 250
    [m] = stored(db)
    assert "StartBoundaryNotFoundDefect" in m["defects"]
    assert any(r.startswith("MIME_DEFECT") for r in m["spam"]["rules"])


def test_routes_take_what_no_mailbox_does_in_order_with_headers_captures_drop_and_reject(server, db, store):
    from mailflow.inbound import routes

    routes.add_route(store, "/(?P<team>[a-z]+)-tickets@acme\\.example/", "mailbox", "help@acme.example", priority=10)
    routes.add_route(store, "*@acme.example", "drop", headers=["Subject: (?i)newsletter"], priority=20)
    routes.add_route(store, "nope@acme.example", "reject", "We do not read this address", priority=5)
    routes.add_route(store, "*@acme.example", "mailbox", "help@acme.example", priority=40)

    def send(to: str, subject: str = "A question") -> list[int]:
        return [
            c for c, _ in run(transaction(server.port, "x@client.test", [to], mail("x@client.test", subject=subject)))
        ]

    wait_until(lambda: send("sales-tickets@acme.example") == [250, 250, 250], 10, interval=0.3, what="routes loaded")
    assert send("nope@acme.example")[:2] == [250, 550]  # refused at RCPT, with the route's text
    assert send("anyone@acme.example", subject="Our NEWSLETTER") == [250, 250, 250]
    assert send("anyone@acme.example", subject="Lunch") == [250, 250, 250]
    assert send("someone@elsewhere.example")[:2] == [250, 550]
    routed = [r[0] for r in db.execute("SELECT routing FROM inbound_messages ORDER BY received_at")]
    [tickets, newsletter, lunch] = [d[0] for d in routed]
    assert (tickets["action"], tickets["target"], tickets["captures"]) == (
        "mailbox",
        "help@acme.example",
        {"team": "sales"},
    )
    assert newsletter["action"] == "drop" and newsletter["route_id"] is not None
    assert (lunch["action"], lunch["recipient"]) == ("mailbox", "anyone@acme.example")
    boxes = db.execute("SELECT recipient FROM mailbox_messages ORDER BY delivered_at").fetchall()
    assert [b[0] for b in boxes] == ["sales-tickets@acme.example", "anyone@acme.example"]


def test_erasing_a_sender_deletes_the_raw_copies_of_their_mail_and_only_theirs(server, db, store):
    from mailflow.errors import NotFoundError
    from mailflow.outbound import contacts

    for sender in ("ann@sender.example", "bob@sender.example"):
        replies = run(transaction(server.port, sender, ["help@acme.example"], mail("x@client.test", subject=sender)))
        assert replies[-1][0] == 250
    assert db.execute("SELECT count(*) FROM raw_messages").fetchone()[0] == 2
    contacts.erase(store, "Ann@Sender.example")
    left = [bytes(r[0]) for r in db.execute("SELECT data FROM raw_messages")]
    assert len(left) == 1 and b"Subject: bob@sender.example" in left[0]
    assert db.execute("SELECT count(*) FROM inbound_messages").fetchone()[0] == 2  # the rows stay
    with store.pool.connection() as conn:
        raws = {}
        for m in mailbox.messages(conn):
            try:
                raws[str(m["id"])] = mailbox.raw(conn, str(m["id"]))
            except NotFoundError as exc:
                raws[str(m["id"])] = str(exc)
    assert sorted(isinstance(v, bytes) for v in raws.values()) == [False, True]
    assert any("sender erased" in v for v in raws.values() if isinstance(v, str))
