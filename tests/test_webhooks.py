"""Webhook endpoints against a real HTTP receiver: classified mail recorded in the log is fanned
out by the `webhooks` consumer to each subscribed endpoint of its tenant and POSTed by the
deliverer, signed so that the standardwebhooks package verifies it; failures are retried on the
(here millisecond) schedule, every attempt recorded; 410 and a long failure streak disable the
endpoint; private addresses are refused at `add` and again before each POST; the secret is
shown once and is in no event and no listing. The decisions are tested alone in
test_webhooks_rules.py."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
import uuid
from dataclasses import replace

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from mailflow.consumers import inline
from mailflow.consumers.runtime import ConsumerRunner
from mailflow.errors import NotFoundError, UsageError
from mailflow.inbound import webhooks
from mailflow.inbound.delivery import AddressGuard, HttpPoster, new_secret
from mailflow.inbound.events import BounceDetected, ClassifiedRecipient, ReplyReceived
from mailflow.inbound.webhooks import Options, Schedule, WebhookFanout
from mailflow.infra import personal
from mailflow.tenants import registry as tenants
from mailflow.testing.dns import DnsServer

from . import test_inbound_actions
from .conftest import run_cli, wait_until

pytestmark = pytest.mark.process  # the secret's tests read the CLI's output; the rest run in this process

LOOPBACK = AddressGuard(allow_private=True)  # the receivers listen on 127.0.0.1
receiver = test_inbound_actions.hooks  # the fixture: receiver({path: [statuses]}) -> an HTTP server in a thread
FAST = Options(schedule=Schedule(scale=0.0001, rand=lambda: 0.5), poll_s=0.02, lease_s=10.0)


@pytest.fixture
def deliverer(operator_rt):
    """The deliverer loop in a thread, as `mailflow inbound` and `mailflow webhooks deliver` run it."""
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(guard: AddressGuard = LOOPBACK, **options: object) -> None:
        stop = threading.Event()
        http = HttpPoster(timeout_s=5.0, guard=guard)
        opts = replace(FAST, **options)
        thread = threading.Thread(
            target=lambda: asyncio.run(
                webhooks.run(operator_rt.store, stop, vault=operator_rt.vault, http=http, options=opts)
            ),
            daemon=True,
        )
        thread.start()
        running.append((stop, thread))

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(15)


@pytest.fixture
def fan_out(operator_rt, settings):
    """Run the `webhooks` consumer over what the log has (catching up from PostgreSQL)."""

    def run() -> int:
        runner = ConsumerRunner(WebhookFanout(), operator_rt.store, settings.redis_url or "", settings)
        try:
            runner.ensure_checkpoint()
            return runner.catch_up(upto=operator_rt.store.sync())  # every committed event placed first
        finally:
            runner.close()

    return run


def reply(store, sender: str = "ann@sender.example", text: str = "Yes, please call me.") -> tuple[str, str]:
    """A ReplyReceived as the classifier records it; returns (message id, the sender's subject)."""
    message_id, job_id = str(uuid.uuid4()), str(uuid.uuid4())
    with inline.writing(store) as w:
        subject = store.subject(w.conn, sender)
        [sealed] = personal.seal_many(
            w.conn, store.tenant, [(subject, {"sender": sender, "subject": "Re: Our offer", "text": text})]
        )
        event = ReplyReceived(
            message_id=message_id, mailbox="news@acme.example", job_id=job_id, correspondent=subject, sealed=sealed
        )
        w.record([(f"inbound-message-{message_id}", event.to_new())])
    return message_id, subject


def bounce(store, addresses: list[str], *, delayed: bool = False) -> str:
    message_id = str(uuid.uuid4())
    with inline.writing(store) as w:
        subjects = [store.subject(w.conn, a) for a in addresses]
        sealed = personal.seal_many(w.conn, store.tenant, [(s, {"email": a}) for s, a in zip(subjects, addresses)])
        recipients = [
            ClassifiedRecipient(subject=s, sealed=t, status="5.1.1", reason="userunknown", hard=True)
            for s, t in zip(subjects, sealed)
        ]
        event = BounceDetected(message_id=message_id, recipients=recipients, delayed=delayed)
        w.record([(f"inbound-message-{message_id}", event.to_new())])
    return message_id


def add(rt, url: str, kinds: str = "all", guard: AddressGuard = LOOPBACK, store=None) -> tuple[webhooks.Endpoint, str]:
    return webhooks.add_endpoint(store or rt.store, rt.vault, guard, url, webhooks.parse_kinds(kinds))


def attempts_of(db, endpoint_id: str) -> list[dict]:
    cols = ("attempt", "outcome", "status", "error", "type")
    rows = db.execute(
        f"SELECT {', '.join(cols)} FROM webhook_attempts WHERE endpoint_id = %s ORDER BY at, attempt", (endpoint_id,)
    ).fetchall()
    return [dict(zip(cols, r)) for r in rows]


def endpoint_status(db, endpoint_id: str) -> tuple[str, str | None]:
    row = db.execute("SELECT status, disabled_reason FROM webhook_endpoints WHERE id = %s", (endpoint_id,)).fetchone()
    return (row[0], row[1]) if row else ("gone", None)


# -- deliveries --------------------------------------------------------------------------------


def test_a_reply_is_posted_signed_so_that_standard_webhooks_verifies_it_with_the_values_opened(
    rt, receiver, deliverer, fan_out
):
    hook = receiver({"/in": [200]})
    ep, secret = add(rt, hook.url("/in"), "reply")
    assert secret.startswith("whsec_")
    message_id, _ = reply(rt.store)
    assert fan_out() >= 1
    deliverer()
    [request] = wait_until(lambda: hook.hits("/in"), what="the delivery")
    Webhook(secret).verify(request["body"], request["headers"])  # the reference library
    with pytest.raises(WebhookVerificationError):  # and another secret does not
        Webhook(new_secret()).verify(request["body"], request["headers"])
    body = json.loads(request["body"])
    assert body["type"] == "reply.received"
    data = body["data"]
    assert (data["message_id"], data["sender"], data["subject"], data["text"]) == (
        message_id,
        "ann@sender.example",
        "Re: Our offer",
        "Yes, please call me.",
    )
    assert data["job_id"] and data["tenant"] == "default" and "sealed" not in data
    assert request["headers"]["webhook-id"].startswith("msg_")


def test_a_receiver_answering_500_three_times_then_200_gets_it_on_the_fourth_attempt_each_recorded(
    rt, receiver, deliverer, fan_out, db, operator_rt
):
    hook = receiver({"/flaky": [500, 500, 500, 200]})
    ep, secret = add(rt, hook.url("/flaky"), "reply")
    reply(rt.store)
    fan_out()
    deliverer()
    wait_until(lambda: db.execute("SELECT state FROM webhook_deliveries").fetchone()[0] == "done", what="done")
    requests = hook.hits("/flaky")
    assert len(requests) == 4
    assert len({r["headers"]["webhook-id"] for r in requests}) == 1  # one delivery: the receiver dedupes by it
    for r in requests:
        Webhook(secret).verify(r["body"], r["headers"])
    assert [(a["attempt"], a["outcome"], a["status"]) for a in attempts_of(db, ep.id)] == [
        (1, "retry", 500),
        (2, "retry", 500),
        (3, "retry", 500),
        (4, "done", 200),
    ]
    events = db.execute(
        "SELECT type, data FROM events WHERE type IN ('WebhookDelivered', 'WebhookDeliveryFailed') ORDER BY seq"
    ).fetchall()
    assert [(t, d["attempts"]) for t, d in events] == [
        ("WebhookDeliveryFailed", 1),
        ("WebhookDeliveryFailed", 2),
        ("WebhookDeliveryFailed", 3),
        ("WebhookDelivered", 4),
    ]
    assert db.execute("SELECT failure_streak FROM webhook_endpoints").fetchone()[0] == 0  # a success ends the streak

    def snapshot() -> list[tuple]:
        return db.execute(
            "SELECT e.*, a.* FROM webhook_endpoints e JOIN webhook_attempts a ON a.endpoint_id = e.id "
            "ORDER BY a.attempt"
        ).fetchall()

    before = snapshot()
    webhooks.PROJECTION.rebuild(operator_rt.store)
    assert snapshot() == before
    fan_out()  # the attempts' events make no delivery
    assert db.execute("SELECT count(*) FROM webhook_deliveries").fetchone()[0] == 1
    assert len(hook.hits()) == 4


def test_a_410_disables_the_endpoint_and_nothing_more_is_delivered_to_it(rt, receiver, deliverer, fan_out, db):
    hook = receiver({"/gone": [410]})
    ep, _ = add(rt, hook.url("/gone"), "reply")
    reply(rt.store)
    fan_out()
    deliverer()
    wait_until(lambda: endpoint_status(db, ep.id)[0] == "disabled", what="the endpoint to be disabled")
    assert "410" in (endpoint_status(db, ep.id)[1] or "")
    assert [(a["attempt"], a["outcome"], a["status"]) for a in attempts_of(db, ep.id)] == [(1, "final", 410)]
    reply(rt.store, "bob@sender.example")
    fan_out()
    assert db.execute("SELECT count(*) FROM webhook_deliveries").fetchone()[0] == 1  # none for the disabled one
    time.sleep(0.3)  # fifteen polls
    assert len(hook.hits()) == 1
    webhooks.enable_endpoint(rt.store, ep.id)
    assert endpoint_status(db, ep.id) == ("active", None)


def test_an_endpoint_whose_attempts_keep_failing_long_enough_is_disabled_and_its_pending_deliveries_cancelled(
    rt, receiver, deliverer, fan_out, db
):
    hook = receiver({"/down": [503]})
    ep, _ = add(rt, hook.url("/down"), "reply")
    reply(rt.store)
    reply(rt.store, "bob@sender.example")
    fan_out()
    deliverer(disable_after_failures=5, disable_after_s=0.0)
    wait_until(lambda: endpoint_status(db, ep.id)[0] == "disabled", what="the endpoint to be disabled")
    assert "5 attempts failed in a row" in (endpoint_status(db, ep.id)[1] or "")
    states = [s for (s,) in db.execute("SELECT state FROM webhook_deliveries").fetchall()]
    assert states == ["cancelled", "cancelled"]
    # the five, and any sent meanwhile (in flight while the fifth was recorded): each one recorded
    wait_until(lambda: len(attempts_of(db, ep.id)) == len(hook.hits()) >= 5, what="every attempt recorded")


def test_an_endpoint_taking_only_bounces_gets_no_reply_and_bounces_carry_the_bounced_addresses(
    rt, receiver, deliverer, fan_out
):
    hook = receiver({"/bounces": [200], "/replies": [200]})
    add(rt, hook.url("/bounces"), "bounce")
    add(rt, hook.url("/replies"), "reply,delayed")
    reply(rt.store)
    bounce(rt.store, ["gone@example.net", "left@example.net"])
    bounce(rt.store, ["slow@example.net"], delayed=True)
    fan_out()
    deliverer()
    wait_until(lambda: len(hook.hits()) == 3, what="three deliveries")
    [got] = hook.hits("/bounces")
    body = json.loads(got["body"])
    assert body["type"] == "bounce.detected"
    assert [(r["email"], r["reason"], r["hard"]) for r in body["data"]["recipients"]] == [
        ("gone@example.net", "userunknown", True),
        ("left@example.net", "userunknown", True),
    ]
    assert sorted(json.loads(r["body"])["type"] for r in hook.hits("/replies")) == ["bounce.delayed", "reply.received"]


def test_another_tenants_endpoint_gets_nothing_of_this_tenants_mail(rt, operator_rt, receiver, deliverer, fan_out, db):
    tenants.create(operator_rt.store, "acme")
    hook = receiver({"/ours": [200], "/theirs": [200]})
    add(rt, hook.url("/ours"), "all")
    theirs, _ = add(rt, hook.url("/theirs"), "all", store=operator_rt.store.for_tenant("acme"))
    reply(rt.store)
    fan_out()
    deliverer()
    wait_until(lambda: hook.hits("/ours"), what="our delivery")
    assert hook.hits("/theirs") == []
    with rt.connect() as conn:  # and this tenant cannot see theirs
        assert theirs.id not in [e.id for e in webhooks.endpoints(conn)]
        with pytest.raises(NotFoundError, match="no webhook endpoint"):
            webhooks.endpoint(conn, theirs.id)


def test_an_erased_persons_values_are_not_in_a_later_attempt(rt, receiver, deliverer, fan_out):
    hook = receiver({"/in": [500, 200]})
    add(rt, hook.url("/in"), "reply")
    _, subject = reply(rt.store)
    fan_out()
    deliverer(schedule=Schedule(delays_s=(1.0,), rand=lambda: 0.5))  # a second between the two attempts
    [first] = wait_until(lambda: hook.hits("/in"), what="the first attempt")
    assert json.loads(first["body"])["data"]["sender"] == "ann@sender.example"
    with rt.store.pool.connection() as conn, conn.transaction():
        personal.shred(conn, "default", [subject])
    wait_until(lambda: len(hook.hits("/in")) == 2, what="the second attempt")
    data = json.loads(hook.hits("/in")[1]["body"])["data"]
    assert (data["sender"], data["subject"], data["text"]) == (None, None, None)


# -- where POSTs may go ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/hook", "http://169.254.169.254/latest", "https://192.168.1.1/", "http://[::1]:8080/"]
)
def test_an_endpoint_at_a_private_address_is_refused(rt, url):
    with pytest.raises(UsageError, match="refused"):
        add(rt, url, guard=AddressGuard())


def test_an_endpoint_whose_name_resolves_to_a_private_address_is_refused(rt):
    records = {("hooks.internal.test", "A"): ["10.0.0.7"], ("ok.public.test", "A"): ["93.184.216.34"]}
    with DnsServer(records) as dns:
        guard = AddressGuard(nameservers=[dns.address])
        with pytest.raises(UsageError, match="hooks.internal.test resolves to 10.0.0.7 is a private address"):
            add(rt, "https://hooks.internal.test/in", guard=guard)
        ep, _ = add(rt, "https://ok.public.test/in", guard=guard)
        with pytest.raises(UsageError, match="does not resolve"):
            add(rt, "https://nowhere.public.test/in", guard=guard)
    assert ep.url == "https://ok.public.test/in"


def test_loopback_is_allowed_only_with_the_setting(rt):
    with pytest.raises(UsageError, match="loopback"):
        add(rt, "http://127.0.0.1:9/in", guard=AddressGuard())
    assert add(rt, "http://127.0.0.1:9/in", guard=AddressGuard(allow_private=True))[0].status == "active"


def test_an_address_allowed_at_add_is_checked_again_before_each_post(rt, receiver, deliverer, fan_out, db):
    hook = receiver({"/in": [200]})
    ep, _ = add(rt, hook.url("/in"), "reply")  # allowed then
    reply(rt.store)
    fan_out()
    deliverer(guard=AddressGuard())  # not now
    wait_until(lambda: attempts_of(db, ep.id), what="the attempt")
    [attempt] = attempts_of(db, ep.id)
    assert attempt["outcome"] == "final" and "loopback" in attempt["error"]
    assert hook.hits() == []


# -- the CLI -----------------------------------------------------------------------------------


def test_the_secret_is_shown_once_and_is_in_no_event_and_no_listing(rt, env, db, receiver):
    env = {**env, "MAILFLOW_WEBHOOKS_ALLOW_PRIVATE": "true"}
    hook = receiver({"/in": [200]})
    added = run_cli(env, "webhooks", "add", hook.url("/in"), "--events", "reply,bounce", "--json")
    assert added.returncode == 0, added.stderr
    created = json.loads(added.stdout)
    secret = created["secret"]
    assert secret.startswith("whsec_") and created["events"] == ["bounce", "reply"]

    listed = run_cli(env, "webhooks", "list")
    listed_json = run_cli(env, "webhooks", "list", "--json")
    assert created["id"] in listed.stdout and json.loads(listed_json.stdout)[0]["id"] == created["id"]
    tested = run_cli(env, "webhooks", "test", created["id"])
    assert tested.returncode == 0 and "done" in tested.stdout, tested.stdout + tested.stderr
    [request] = hook.hits("/in")
    Webhook(secret).verify(request["body"], request["headers"])
    assert json.loads(request["body"])["type"] == "webhook.test"
    shown = run_cli(env, "webhooks", "deliveries", created["id"])
    assert "webhook.test" in shown.stdout and "done" in shown.stdout
    for output in (listed, listed_json, tested, shown):
        assert secret not in output.stdout + output.stderr
    logged = db.execute("SELECT string_agg(data::text || metadata::text, ' ') FROM events").fetchone()[0]
    assert secret not in logged and secret.removeprefix("whsec_") not in logged


def test_bad_input_is_one_line_and_a_non_zero_exit(env):
    for args, code, words in (
        (("webhooks", "add", "ftp://example.net/x", "--events", "reply"), 2, "not an http"),
        (("webhooks", "add", "https://example.net/x", "--events", "replies"), 2, "unknown webhook event"),
        (("webhooks", "add", "http://10.1.2.3/x", "--events", "reply"), 2, "private address"),
        (("webhooks", "disable", "nope"), 5, "no webhook endpoint"),
        (("webhooks", "deliveries", "nope"), 5, "no webhook endpoint"),
    ):
        got = run_cli(env, *args)
        assert got.returncode == code, (args, got.stdout, got.stderr)
        assert got.stderr.count("\n") == 1 and words in got.stderr, got.stderr


def test_webhooks_deliver_runs_until_sigterm_and_stops_cleanly(rt, env, procs, receiver, fan_out):
    hook = receiver({"/in": [200]})
    add(rt, hook.url("/in"), "reply")
    reply(rt.store)
    fan_out()
    deliver = procs.start("webhooks", "deliver", env={**env, "MAILFLOW_WEBHOOKS_ALLOW_PRIVATE": "true"})
    wait_until(lambda: hook.hits("/in"), what="the delivery")
    deliver.send_signal(signal.SIGTERM)
    assert deliver.wait(30) == 0, procs.log_of(deliver)
    assert "inbound.webhooks.stop" in procs.log_of(deliver)


def test_mailflow_inbound_delivers_webhooks_beside_its_smtp_server(rt, env, procs, receiver, fan_out):
    hook = receiver({"/in": [200]})
    add(rt, hook.url("/in"), "reply")
    reply(rt.store)
    fan_out()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inbound = procs.start("inbound", "--port", str(port), env={**env, "MAILFLOW_WEBHOOKS_ALLOW_PRIVATE": "true"})
    wait_until(lambda: hook.hits("/in") or inbound.poll() is not None, what="the delivery")
    assert hook.hits("/in"), procs.log_of(inbound)
    inbound.send_signal(signal.SIGTERM)
    assert inbound.wait(30) == 0, procs.log_of(inbound)
