"""What came back, end to end: mail arriving over SMTP is classified by the inbound_classifier
consumer and its effects applied by outbound_feedback - each exactly once, whatever is
redelivered or replayed."""

from __future__ import annotations

import pytest

from mailflow.consumers.runtime import ConsumerRunner
from mailflow.inbound.classifier import InboundClassifier
from mailflow.inbound.server import Limits
from mailflow.mail import tokens
from mailflow.mail.message_ids import message_id
from mailflow.outbound import campaigns, segments, suppressions, templates
from mailflow.outbound.contacts import import_csv_text
from mailflow.outbound.feedback import OutboundFeedback
from mailflow.outbound.senders import Sender
from mailflow.outbound.sending import save_sender
from mailflow.testing import mail

from .test_inbound import Server, run, transaction

pytestmark = pytest.mark.process

CLASSIFIED = ("BounceDetected", "ComplaintReceived", "AutoReplyReceived", "ReplyReceived", "OtherReceived")


@pytest.fixture
def world(rt, acme, operator_store, settings):
    """A campaign `spring` to ann, bob and cy (started: one pending job each), an inbound server
    that knows the runtime's signing key, and the two consumers, run on demand."""
    save_sender(rt.store, Sender("news", "news@example.org", "News", "smtp://127.0.0.1:9?tls=none"))
    templates.save(rt.store, templates.Template("news", "News", "<p>Hello</p>", "Hello"))
    import_csv_text(rt.store, "email,name\nann@example.net,Ann\nbob@example.net,Bob\ncy@example.net,Cy\n")
    segments.define(rt.store, "all", {})
    cid = campaigns.create(rt.store, name="spring", sender="news", template="news", segment="all")
    campaigns.start(rt.store, cid)
    server = Server(operator_store, Limits(), secret=rt.keyring.signing_key)
    runners = [
        ConsumerRunner(p, operator_store, rt.services.redis_url, settings, consumer_id="t")
        for p in (InboundClassifier(), OutboundFeedback())
    ]
    w = World(rt, cid, server, runners)
    yield w
    server.close()
    for runner in runners:
        runner.close()


class World:
    def __init__(self, rt, cid, server, runners) -> None:
        self.rt, self.cid, self.server, self.runners = rt, cid, server, runners

    def job(self, email: str) -> str:
        with self.rt.connect() as conn:
            subject = self.rt.store.subject(conn, email)
            return str(
                conn.execute(
                    "SELECT id FROM jobs WHERE campaign_id = %s AND subject = %s", (self.cid, subject)
                ).fetchone()[0]
            )

    def sent(self, email: str) -> mail.Sent:
        job = self.job(email)
        verp = tokens.verp_address(self.rt.keyring.signing_key, job, "example.org")
        return mail.Sent(message_id(job, "example.org"), verp, "news@example.org", email)

    def deliver(self, data: bytes, rcpt: str, mail_from: str = "") -> None:
        replies = run(transaction(self.server.port, mail_from, [rcpt], data))
        assert [c for c, _ in replies] == [250, 250, 250], replies

    def settle(self) -> None:
        """Both consumers to the head, the classifier's new events included (sync: every
        committed event has its position, also while other transactions hold the horizon)."""
        for runner in self.runners:
            runner.store.sync()
            runner.catch_up()

    def rows(self, sql: str, *args):
        with self.rt.connect() as conn:
            return conn.execute(sql, args).fetchall()

    def state(self, email: str) -> tuple[str | None, str | None]:
        with self.rt.connect() as conn:
            subject = self.rt.store.subject(conn, email)
            contact = conn.execute("SELECT status FROM contacts WHERE subject = %s", (subject,)).fetchone()
            sup = conn.execute("SELECT reason FROM suppressions WHERE subject = %s", (subject,)).fetchone()
        return (contact[0] if contact else None, sup[0] if sup else None)


def test_a_hard_bounce_to_a_campaigns_verp_address_suppresses_the_contact_and_the_next_campaign_skips_it(world):
    ann = world.sent("ann@example.net")
    world.deliver(mail.postfix_dsn(ann, "5.1.1", "550"), ann.return_path)
    world.settle()
    assert world.state("ann@example.net") == ("bounced", "bounce: userunknown")
    (fb,) = world.rows("SELECT kind, reason, status, hard, job_id::text FROM feedback")
    assert fb == ("bounce", "userunknown", "5.1.1", True, world.job("ann@example.net"))
    assert world.rows("SELECT data->>'found_by' FROM events WHERE type = 'BounceDetected'") == [("verp",)]
    again = campaigns.create(world.rt.store, name="summer", sender="news", template="news", segment="all")
    assert campaigns.start(world.rt.store, again) == 2  # bob and cy; not ann
    report = campaigns.status(world.rt.connect(), world.cid)
    assert report["jobs"]["pending"] == 3


def test_a_soft_bounce_does_not_suppress_and_is_counted_and_a_delay_is_only_history(world):
    bob, cy = world.sent("bob@example.net"), world.sent("cy@example.net")
    full = f"<{bob.to}>: Mailbox full: quota exceeded"
    world.deliver(mail.postfix_dsn(bob, "5.2.2", "552", full), bob.return_path)
    world.deliver(mail.postfix_dsn(cy, "4.4.1", "451", "Connection timed out"), cy.return_path)  # Action: delayed
    world.settle()
    assert world.state("bob@example.net") == ("active", None) and world.state("cy@example.net") == ("active", None)
    assert world.rows("SELECT data->>'count' FROM events WHERE type = 'SoftBounceCounted'") == [("1",)]
    assert sorted(world.rows("SELECT kind, hard FROM feedback")) == [("bounce", False), ("delayed", False)]
    assert world.rows("SELECT count(*) FROM suppressions") == [(0,)]


def test_the_soft_bounce_limit_suppresses(world):
    bob = world.sent("bob@example.net")
    for _ in range(3):  # three different DSNs (each has its own Message-ID and date)
        world.deliver(mail.postfix_dsn(bob, "5.2.2", "552", "Mailbox full"), bob.return_path)
    world.settle()
    assert world.state("bob@example.net") == ("bounced", "soft_bounces")


def test_a_bounce_that_blames_the_sender_suppresses_nobody_and_raises_an_alert(world):
    cy = world.sent("cy@example.net")
    world.deliver(mail.postfix_dsn(cy, "5.7.1", "554"), cy.return_path)
    world.settle()
    assert world.state("cy@example.net") == ("active", None)
    assert world.rows("SELECT sender, domain, kind FROM deliverability_alerts") == [("news", "example.org", "bounce")]


def test_a_reply_stops_that_contacts_remaining_campaign_mail_and_an_auto_reply_does_not(world):
    ann, bob = world.sent("ann@example.net"), world.sent("bob@example.net")
    world.deliver(mail.reply(ann, "Thanks, please call me."), "news@example.org", "ann@example.net")
    world.deliver(mail.out_of_office(bob), "news@example.org", "bob@example.net")
    world.settle()
    states = dict(world.rows("SELECT id::text, state || '/' || coalesce(failure_kind, '') FROM jobs"))
    assert states[world.job("ann@example.net")] == "failed/stopped"
    assert states[world.job("bob@example.net")] == "pending/"
    assert world.rows("SELECT count(*) FROM campaign_stops") == [(1,)]
    kinds = dict(world.rows("SELECT kind, count(*) FROM feedback GROUP BY kind"))
    assert kinds == {"reply": 1, "auto_reply": 1}
    linked = world.rows("SELECT data->>'job_id', data->>'found_by' FROM events WHERE type = 'ReplyReceived'")
    assert linked == [(world.job("ann@example.net"), "in_reply_to")]


def test_a_reply_without_references_is_linked_by_the_reply_address_to_the_last_message_sent(world):
    ann = world.sent("ann@example.net")
    with world.rt.connect() as conn:  # the job was sent: accepted by the remote server
        conn.execute("UPDATE jobs SET accepted_at = now() WHERE id = %s", (world.job("ann@example.net"),))
    world.deliver(mail.reply(ann, "Count me in.", references=False), "news@example.org", "ann@example.net")
    world.settle()
    linked = world.rows("SELECT data->>'job_id', data->>'found_by' FROM events WHERE type = 'ReplyReceived'")
    assert linked == [(world.job("ann@example.net"), "reply_address")]


def test_mail_to_a_campaigns_list_unsubscribe_address_unsubscribes_that_contact_once(world):
    from mailflow.outbound.mime import unsubscribe_token

    token = unsubscribe_token(world.rt.keyring.signing_key, "bob@example.net", world.cid)
    address = f"unsubscribe+{token}@example.org"  # the mailto: of the campaign message's List-Unsubscribe
    leave = b"From: bob@example.net\r\nTo: " + address.encode() + b"\r\nSubject: unsubscribe\r\n\r\n\r\n"
    world.deliver(leave, address, "bob@example.net")
    world.deliver(leave.replace(b"Subject: unsubscribe", b"Subject: stop"), address, "bob@example.net")  # twice
    world.settle()
    assert world.state("bob@example.net") == ("unsubscribed", None)
    assert world.rows("SELECT type, count(*) FROM events WHERE type = 'UnsubscribeReceived' GROUP BY 1") == [
        ("UnsubscribeReceived", 2)
    ]
    changed = world.rows("SELECT data->>'status' FROM events WHERE type = 'ContactStatusChanged'")
    assert changed == [("unsubscribed",)]  # the second one found them unsubscribed already
    forged = address.replace(token[-4:], "AAAA")
    replies = run(transaction(world.server.port, "bob@example.net", [forged], None))
    assert replies[-1][0] == 550


def test_a_complaint_stops_the_contact_and_raises_an_alert(world):
    cy = world.sent("cy@example.net")
    world.deliver(mail.arf_complaint(cy), cy.return_path)
    world.settle()
    assert world.state("cy@example.net")[0] == "complained"
    assert world.rows("SELECT kind, reason FROM deliverability_alerts") == [("complaint", "abuse")]


def test_the_same_message_delivered_twice_or_replayed_has_its_effect_once(world):
    ann = world.sent("ann@example.net")
    dsn = mail.postfix_dsn(ann, "5.1.1", "550")
    world.deliver(dsn, ann.return_path)
    world.settle()
    world.deliver(dsn, ann.return_path)  # the sender did not see our 250 and sent it again
    for runner in world.runners:  # and both consumers are rewound to the start and replay everything
        with world.rt.connect() as conn:
            conn.execute("UPDATE consumer_checkpoints SET position = 0 WHERE consumer = %s", (runner.name,))
    world.settle()
    events = dict(world.rows("SELECT type, count(*) FROM events GROUP BY type"))
    assert events["BounceDetected"] == 1 and events["FeedbackReceived"] == 1 and events["SuppressionAdded"] == 1
    assert world.rows("SELECT count(*) FROM feedback") == [(1,)]
    assert suppressions.listing(world.rt.connect())[0].reason == "bounce: userunknown"


def test_every_received_message_is_classified_once(world):
    ann = world.sent("ann@example.net")
    world.deliver(mail.exim_bounce(ann), ann.return_path)
    hello = b"From: someone@else.example\r\nTo: help@acme.example\r\nSubject: hello\r\n\r\nhi\r\n"
    world.deliver(hello, "help@acme.example", "someone@else.example")
    world.settle()
    classified = world.rows(
        "SELECT type, count(*) FROM events WHERE type = ANY(%s) GROUP BY type ORDER BY type", list(CLASSIFIED)
    )
    assert classified == [("BounceDetected", 1), ("OtherReceived", 1)]
    assert world.rows("SELECT count(*) FROM inbound_classifications") == [(2,)]


def test_kill_9_of_the_classifier_mid_batch_again_and_again_classifies_each_message_exactly_once(
    world, procs, env, settings
):
    """A backlog of bounces and replies; the classifier process is killed with kill -9 at random
    moments while it works through it (small batches, so that most kills land mid-way), then
    run to the end: every message has exactly one classification event, and the effects
    applied after are one per message."""
    import random
    import signal

    from mailflow.outbound.contacts import import_csv_text as load

    from .conftest import wait_until

    load(world.rt.store, "email,name\n" + "\n".join(f"p{i}@example.net,P{i}" for i in range(60)) + "\n")
    cid = campaigns.create(world.rt.store, name="bulk", sender="news", template="news", segment="all")
    campaigns.start(world.rt.store, cid)
    world.cid = cid
    people = [f"p{i}@example.net" for i in range(60)]
    for i, email in enumerate(people):
        sent = world.sent(email)
        if i % 3 == 2:
            world.deliver(mail.reply(sent, f"Answer {i}"), "news@example.org", email)
        else:
            world.deliver(
                mail.postfix_dsn(sent, "5.1.1", "550") if i % 2 else mail.gmail_bounce(sent), sent.return_path
            )
    head = world.runners[0].store.sync()
    child_env = dict(env, MAILFLOW_CATCHUP_BATCH_SIZE="3")

    def checkpoint() -> int:
        with world.rt.connect() as conn:
            row = conn.execute(
                "SELECT position FROM consumer_checkpoints WHERE consumer = 'inbound_classifier'"
            ).fetchone()
        return int(row[0]) if row else 0

    rng = random.Random(settings.redis_prefix)
    kills = 0
    for _ in range(4):
        if checkpoint() >= head:
            break
        p = procs.start("consume", "inbound_classifier", "--consumer-id", "k9", env=child_env)
        target = checkpoint() + rng.randint(1, 25)
        wait_until(lambda: checkpoint() >= target or p.poll() is not None, 60, 0.005, "the classifier to progress")
        assert p.poll() is None, procs.log_of(p)[-2000:]
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        kills += 1
    p = procs.start("consume", "inbound_classifier", "--consumer-id", "k9", env=child_env)
    wait_until(lambda: checkpoint() >= head, 120, 0.05, "the classifier to reach the head")
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert kills >= 2
    per_message = world.rows(
        "SELECT data->>'message_id', count(*) FROM events WHERE type = ANY(%s) GROUP BY 1", list(CLASSIFIED)
    )
    assert world.rows("SELECT error FROM dead_letters") == []
    assert len(per_message) == 60 and all(n == 1 for _, n in per_message)
    world.settle()
    kinds = dict(world.rows("SELECT kind, count(*) FROM feedback WHERE campaign_id = %s GROUP BY kind", cid))
    assert kinds == {"bounce": 40, "reply": 20}


def test_classified_mail_is_announced_on_the_notifications_channel_as_the_relay_publishes_it(world, rt, settings):
    """Every classified message is an event on mailflow:events and, as the relay publishes it,
    a message on mailflow:notifications (the envelope); other events are not announced."""
    import threading

    import orjson

    from mailflow.events.relay import Relay
    from mailflow.infra.services import redis_client

    from .conftest import wait_until

    r = redis_client(rt.services.redis_url)
    sub = r.pubsub()
    sub.subscribe(rt.keys.notifications)
    ann = world.sent("ann@example.net")
    world.deliver(mail.reply(ann, "Yes please"), "news@example.org", "ann@example.net")
    world.settle()
    stop = threading.Event()
    relay = Relay(world.runners[0].store, rt.services.redis_url, settings)
    t = threading.Thread(target=relay.run, args=(stop,))
    t.start()
    got: list[dict] = []
    try:

        def announced() -> bool:
            while (m := sub.get_message(timeout=0.01)) is not None:
                if m["type"] == "message":
                    got.append(orjson.loads(m["data"]))
            return bool(got)

        wait_until(announced, 20, 0.05, "a notification")
        head = world.runners[0].store.head()
        wait_until(lambda: r.xlen(rt.keys.events) >= head, 20, 0.05, "the relay to publish everything")
        announced()
    finally:
        stop.set()
        t.join(10)
    assert [(n["type"], n["data"]["job_id"]) for n in got] == [("ReplyReceived", world.job("ann@example.net"))]
    assert got[0]["metadata"]["tenant"] == "default"


def test_reprocess_records_only_what_changed_and_applies_no_effect_twice(world, env):
    """After an upgrade (here: the stored verdict of one message is not what the classifier
    says today), `mailflow inbound reprocess` records one reclassified event for it and none
    for the others; its effects are not applied a second time."""
    import orjson

    from .conftest import run_cli

    ann, bob = world.sent("ann@example.net"), world.sent("bob@example.net")
    world.deliver(mail.postfix_dsn(ann, "5.1.1", "550"), ann.return_path)
    world.deliver(mail.reply(bob, "Sure"), "news@example.org", "bob@example.net")
    world.settle()
    done = run_cli(env, "inbound", "reprocess", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"seen": 2, "changed": 0, "now": {}}
    with world.rt.connect() as conn:  # as an older classifier left it
        conn.execute("UPDATE inbound_classifications SET digest = 'older' WHERE kind = 'bounce'")
    again = run_cli(env, "inbound", "reprocess", "--since", "1h", "--json")
    assert again.returncode == 0, again.stderr
    assert orjson.loads(again.stdout) == {"seen": 2, "changed": 1, "now": {"bounce": 1}}
    world.settle()
    flags = world.rows("SELECT data->>'reclassified' FROM events WHERE type = 'BounceDetected' ORDER BY seq")
    assert flags == [("false",), ("true",)]
    events = dict(world.rows("SELECT type, count(*) FROM events GROUP BY type"))
    assert events["SuppressionAdded"] == 1 and events["FeedbackReceived"] == 2  # the bounce's and the reply's
    bad = run_cli(env, "inbound", "reprocess", "--since", "last tuesday")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--since" in bad.stderr
