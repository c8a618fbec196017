"""Webhook endpoints' decisions, without servers: which addresses a POST may go to, when a
delivery is tried again, what a receiver's answer means, when an endpoint has failed long
enough to be disabled, what a classified event's body says, and the kinds an endpoint takes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mailflow.errors import UsageError
from mailflow.events.envelope import Envelope, Metadata
from mailflow.inbound import webhooks
from mailflow.inbound.delivery import Attempt, refusal
from mailflow.inbound.webhooks import Schedule

pytestmark = pytest.mark.pure


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "127.0.0.1",
        "::1",
        "fe80::1",
        "fc00::5",
        "100.64.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_private_loopback_and_link_local_addresses_are_refused_unless_allowed(address):
    assert refusal(address) is not None
    assert refusal(address, allow_private=True) is None


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "240.0.0.1", "255.255.255.255"])
def test_unspecified_multicast_and_reserved_addresses_are_refused_even_when_private_ones_are_allowed(address):
    assert refusal(address, allow_private=True) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "1.1.1.1"])
def test_public_addresses_are_allowed(address):
    assert refusal(address) is None


def test_the_reason_names_the_kind_of_address_and_the_setting():
    assert "link-local" in (refusal("169.254.169.254") or "")
    assert "loopback" in (refusal("127.0.0.1") or "")
    assert "MAILFLOW_WEBHOOKS_ALLOW_PRIVATE" in (refusal("10.1.2.3") or "")


def test_retries_follow_the_schedule_over_about_three_days_then_stop():
    schedule = Schedule(rand=lambda: 0.5)  # the middle of the jitter: the schedule itself
    delays = [schedule.delay(n) for n in range(1, schedule.max_attempts)]
    assert delays[:5] == [5, 300, 1800, 7200, 18000]
    assert 2.5 * 86400 < sum(delays) < 3.5 * 86400
    assert schedule.max_attempts == 11
    last = webhooks.judge(Attempt(500, "HTTP 500"), schedule.max_attempts, schedule)
    assert last.verdict.outcome == "final" and "gave up after 11 attempts" in last.verdict.error


def test_each_retry_is_jittered_within_its_bounds():
    low, high = Schedule(rand=lambda: 0.0), Schedule(rand=lambda: 1.0)
    assert low.delay(2) == pytest.approx(300 * 0.8) and high.delay(2) == pytest.approx(300 * 1.2)


def test_a_longer_retry_after_is_honoured_up_to_the_longest_delay():
    schedule = Schedule(rand=lambda: 0.5)
    assert schedule.delay(1, retry_after_s=120) == 120
    assert schedule.delay(3, retry_after_s=5) == 1800
    assert schedule.delay(1, retry_after_s=10**9) == max(webhooks.SCHEDULE_S)


def test_the_schedule_can_run_in_milliseconds():
    assert Schedule(scale=0.001, rand=lambda: 0.5).delay(1) == pytest.approx(0.005)


def test_what_a_receivers_answer_means():
    assert [webhooks.webhook_outcome(s) for s in (200, 202, 299)] == ["done"] * 3
    assert [webhooks.webhook_outcome(s) for s in (None, 408, 429, 500, 503)] == ["retry"] * 5
    assert [webhooks.webhook_outcome(s) for s in (400, 401, 404, 413, 301)] == ["final"] * 5
    assert webhooks.webhook_outcome(410) == "gone"
    gone = webhooks.judge(Attempt(410, "HTTP 410 Gone"), 1, Schedule())
    assert gone.gone and gone.verdict.outcome == "final"
    retried = webhooks.judge(Attempt(503, "HTTP 503", duration_s=0.25), 1, Schedule(rand=lambda: 0.5))
    assert (retried.verdict.outcome, retried.verdict.delay_s, retried.duration_ms) == ("retry", 5, 250)
    refused = webhooks.judge(Attempt(None, "refused: 10.0.0.1 is private", permanent=True), 1, Schedule())
    assert refused.verdict.outcome == "final" and not refused.gone


def test_an_endpoint_is_disabled_only_after_failing_often_and_for_long_enough():
    now = datetime(2026, 1, 2, tzinfo=UTC)
    day = timedelta(days=1)
    assert webhooks.failing_long_enough(20, now - day, now, failures=20, window_s=86400)
    assert not webhooks.failing_long_enough(19, now - 3 * day, now, failures=20, window_s=86400)  # not often
    assert not webhooks.failing_long_enough(500, now - day / 2, now, failures=20, window_s=86400)  # not long


def test_the_kinds_an_endpoint_takes():
    assert webhooks.parse_kinds("reply, bounce") == ["bounce", "reply"]
    assert webhooks.parse_kinds("all") == sorted(webhooks.KINDS)
    assert webhooks.parse_kinds("auto-reply") == ["auto_reply"]
    with pytest.raises(UsageError, match="unknown webhook event 'replies'"):
        webhooks.parse_kinds("reply,replies")
    with pytest.raises(UsageError, match="no webhook event"):
        webhooks.parse_kinds(" , ")


def test_the_kind_of_a_classified_event():
    assert webhooks.kind_of("BounceDetected", {"delayed": False}) == "bounce"
    assert webhooks.kind_of("BounceDetected", {"delayed": True}) == "delayed"
    assert webhooks.kind_of("ReplyReceived", {}) == "reply"
    assert webhooks.kind_of("MessageReceived", {}) is None


def test_a_delivery_keeps_its_webhook_id_and_each_endpoint_has_its_own():
    event = str(uuid.uuid4())
    one = webhooks.delivery_id("t", "ep1", event)
    assert one == webhooks.delivery_id("t", "ep1", event) != webhooks.delivery_id("t", "ep2", event)
    assert webhooks.webhook_msg_id(one) == "msg_" + uuid.UUID(one).hex


def _envelope(etype: str, data: dict) -> Envelope:
    return Envelope(
        uuid.uuid4(), 42, "default/inbound-message-x", 3, etype, 1, data, Metadata(tenant="default"),
        datetime(2026, 1, 1, 12, tzinfo=UTC),
    )  # fmt: skip


def test_the_body_carries_the_opened_values_and_nothing_sealed_or_pseudonymous():
    env = _envelope(
        "ReplyReceived",
        {"message_id": "m1", "job_id": "j1", "correspondent": "subj", "sealed": "s1.xyz", "mailbox": "help@a.example"},
    )
    body = webhooks.payload(env, {"sender": "ann@x.example", "subject": "Re: hi", "text": "Thanks!"})
    assert body["type"] == "reply.received" and body["timestamp"] == "2026-01-01T12:00:00+00:00"
    data = body["data"]
    assert (data["sender"], data["subject"], data["text"], data["job_id"]) == (
        "ann@x.example",
        "Re: hi",
        "Thanks!",
        "j1",
    )
    assert (data["event_id"], data["position"], data["tenant"]) == (str(env.id), 42, "default")
    assert "sealed" not in data and "correspondent" not in data


def test_an_erased_persons_values_are_sent_as_null():
    env = _envelope(
        "BounceDetected",
        {
            "message_id": "m1",
            "recipients": [
                {"subject": "a", "sealed": "s1.a", "reason": "userunknown"},
                {"subject": "b", "sealed": "s1.b"},
            ],
        },
    )
    body = webhooks.payload(env, None, [{"email": "bob@x.example"}, None])
    assert body["type"] == "bounce.detected"
    assert body["data"]["sender"] is None
    assert body["data"]["recipients"] == [{"reason": "userunknown", "email": "bob@x.example"}, {"email": None}]
