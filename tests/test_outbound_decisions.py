"""Pure outbound decisions (no servers): SMTP reply verdicts, retry delays, rate limits."""

from __future__ import annotations

import random

import pytest

from mailflow.outbound.ratelimit import RateLimiter
from mailflow.outbound.replies import FailureKind, Outcome, RetrySchedule, classify, retry_hint_seconds, transient

pytestmark = pytest.mark.pure


@pytest.mark.parametrize(
    "code,msg,outcome,kind,suppress",
    [
        (250, "2.0.0 Ok: queued as 4XyZ", Outcome.DELIVERED, FailureKind.NONE, False),
        (421, "4.7.0 Try again later", Outcome.RETRY, FailureKind.TRANSIENT, False),
        (451, "4.3.0 temporary failure", Outcome.RETRY, FailureKind.TRANSIENT, False),
        (
            550,
            "5.1.1 <x@example.org>: Recipient address rejected: User unknown",
            Outcome.FAILED,
            FailureKind.BAD_MAILBOX,
            True,
        ),
        (550, "5.7.1 Message rejected due to poor reputation", Outcome.FAILED, FailureKind.POLICY, False),
        (552, "5.2.2 Mailbox full", Outcome.FAILED, FailureKind.MAILBOX_FULL, False),
        (552, "5.3.4 Message size exceeds fixed limit", Outcome.FAILED, FailureKind.MESSAGE, False),
        (550, "No such user here", Outcome.FAILED, FailureKind.BAD_MAILBOX, True),
        (554, "Transaction failed", Outcome.FAILED, FailureKind.PERMANENT, False),
    ],
)
def test_smtp_replies_are_classified_by_code_and_enhanced_status(code, msg, outcome, kind, suppress):
    v = classify(code, msg)
    assert (v.outcome, v.kind, v.suppress) == (outcome, kind, suppress)


def test_retry_hints_in_replies_are_honoured():
    assert retry_hint_seconds("4.7.0 Greylisted, please try again in 120 seconds") == 120
    assert retry_hint_seconds("450 4.2.0 retry after 5 minutes") == 300
    assert retry_hint_seconds("451 4.3.0 temporary failure") is None
    assert classify(450, "Greylisted: try again in 90 seconds").retry_after_s == 90
    assert transient("timed out").outcome is Outcome.RETRY


def test_retry_delays_grow_with_full_jitter_and_stop_after_the_last_attempt():
    sched = RetrySchedule(base_s=300, factor=1.3, max_attempts=18, jitter=False)
    assert sched.delay(1) == 300
    assert sched.delay(2) == pytest.approx(390)
    assert sched.delay(17) == pytest.approx(min(6 * 3600, 300 * 1.3**16))
    assert sched.delay(18) is None
    jittered = RetrySchedule()
    rnd = random.Random(7)
    samples = [jittered.delay(3, rnd=rnd) for _ in range(500)]
    assert all(0 <= s <= 300 * 1.3**2 for s in samples)
    assert max(samples) - min(samples) > 300  # spread out, not a thundering herd
    assert jittered.delay(1, hint_s=900, rnd=rnd) >= 900


def test_token_buckets_limit_each_sender_and_domain_separately():
    rl = RateLimiter(limits={"*": 10, "gmail.com": 2}, burst_seconds=1)
    assert rl.take("news", "gmail.com", 100, now=0.0) == 2
    assert rl.take("news", "gmail.com", 100, now=0.0) == 0
    assert rl.take("news", "example.org", 100, now=0.0) == 10
    assert rl.take("alerts", "gmail.com", 100, now=0.0) == 2  # another sender, its own bucket
    assert rl.take("news", "gmail.com", 100, now=0.5) == 1  # refills at 2/s
    assert rl.take("news", "GMAIL.com", 100, now=10.0) == 2  # never beyond the burst


def test_a_dkim_record_is_refused_for_a_key_mailflow_cannot_sign_with():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from mailflow.errors import UserError
    from mailflow.outbound.senders import Sender, check_sender, dkim_record

    pem = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    sender = Sender("news", "news@example.org", "", "smtp://127.0.0.1:25", "ed1", pem)
    with pytest.raises(UserError, match="DKIM keys are RSA"):
        dkim_record(sender)
    with pytest.raises(UserError, match="DKIM keys are RSA"):
        check_sender(sender)  # refused when saved, not when the first message is signed


def test_enhanced_status_codes_are_found_in_replies_and_say_what_failed():
    from mailflow.mail.status import enhanced_code, find_enhanced

    found = find_enhanced("550-5.1.1 The email account that you tried to reach does not exist")
    assert found is not None and str(found) == "5.1.1" and found.permanent
    assert found.meaning == "bad destination mailbox address"
    assert find_enhanced("452 4.2.2 Mailbox full").meaning == "mailbox full"
    assert not find_enhanced("421 4.7.0 try later").permanent
    assert find_enhanced("5.9.99 odd").meaning == "unknown"
    assert enhanced_code("250 ok") is None


@pytest.mark.parametrize(
    "reply, expected",
    [
        (
            "550 5.1.1 <Ann.Lee@Example.NET>: Recipient address rejected",
            "550 5.1.1 <recipient>: Recipient address rejected",
        ),
        ("mailbox ann.lee@example.net is full (ann.lee@example.net)", "mailbox <recipient> is full (<recipient>)"),
        ("250 2.0.0 Ok: queued as 4F2A", "250 2.0.0 Ok: queued as 4F2A"),
        ("550 no such user bob.lee@example.net", "550 no such user bob.lee@example.net"),  # someone else's
    ],
)
def test_a_recorded_reply_names_the_job_not_the_recipients_address(reply, expected):
    from mailflow.mail.addresses import without_address

    assert without_address(reply, "ann.lee@example.net") == expected
