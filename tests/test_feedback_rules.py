"""What came back, decided (outbound/feedback.effects): which events a bounce, a complaint, an
auto-reply or a reply causes - no servers."""

from __future__ import annotations

import pytest

from mailflow.outbound.events import (
    CampaignStoppedForContact,
    ContactStatusChanged,
    DeliverabilityAlertRaised,
    FeedbackReceived,
    SoftBounceCounted,
    SuppressionAdded,
)
from mailflow.outbound.feedback import AUTO_REPLY, BOUNCE, COMPLAINT, REPLY, Job, Limits, Person, effects

pytestmark = pytest.mark.pure

JOB = Job("0190-job", "subj-ann", "0190-campaign", "news", "example.org")
TX = Job("0190-tx", "subj-ann", None, "tx", "example.org")


def kinds(out):
    return [type(e).__name__ for _, e in out]


def person(**kw) -> Person:
    return Person(**{"subject": "subj-ann", "sealed": "v1.sealed", "contact_status": "active", **kw})


def test_a_hard_bounce_suppresses_the_address_with_its_reason_and_marks_the_contact_bounced():
    out = effects(BOUNCE, {"message_id": "m1"}, JOB, [person(reason="userunknown", status="5.1.1", hard=True)])
    assert kinds(out) == ["FeedbackReceived", "SuppressionAdded", "ContactStatusChanged"]
    added = out[1][1]
    assert isinstance(added, SuppressionAdded) and added.reason == "bounce: userunknown" and added.sealed == "v1.sealed"
    changed = out[2][1]
    assert isinstance(changed, ContactStatusChanged) and changed.status == "bounced"
    fb = out[0][1]
    assert isinstance(fb, FeedbackReceived) and fb.hard and fb.job_id == JOB.job_id and out[0][0] == "job-0190-job"


def test_a_soft_bounce_is_counted_and_only_the_limit_suppresses():
    limits = Limits(soft_limit=3)
    first = effects(BOUNCE, {"message_id": "m1"}, JOB, [person(reason="mailboxfull", soft_count=0)], limits)
    assert kinds(first) == ["FeedbackReceived", "SoftBounceCounted"]
    counted = first[1][1]
    assert isinstance(counted, SoftBounceCounted) and counted.count == 1
    third = effects(BOUNCE, {"message_id": "m3"}, JOB, [person(reason="mailboxfull", soft_count=2)], limits)
    assert kinds(third) == ["FeedbackReceived", "SoftBounceCounted", "SuppressionAdded", "ContactStatusChanged"]
    assert third[2][1].reason == "soft_bounces"


@pytest.mark.parametrize("reason", ["blocked", "filtered", "spamdetected", "policyviolation"])
def test_a_bounce_that_blames_the_sender_never_suppresses_and_raises_an_alert(reason):
    out = effects(BOUNCE, {"message_id": "m1"}, JOB, [person(reason=reason, hard=True)])
    assert kinds(out) == ["FeedbackReceived", "DeliverabilityAlertRaised"]
    alert = out[1][1]
    assert isinstance(alert, DeliverabilityAlertRaised) and (alert.sender, alert.domain) == ("news", "example.org")


def test_a_delayed_dsn_changes_nothing_but_the_history():
    out = effects(BOUNCE, {"message_id": "m1", "delayed": True}, JOB, [person(reason="expired", action="delayed")])
    assert kinds(out) == ["FeedbackReceived"] and out[0][1].kind == "delayed"


def test_an_address_already_suppressed_is_not_suppressed_again():
    out = effects(BOUNCE, {"message_id": "m1"}, JOB, [person(reason="userunknown", hard=True, suppressed="manual")])
    assert kinds(out) == ["FeedbackReceived", "ContactStatusChanged"]  # the contact is still marked bounced


def test_a_complaint_stops_the_contact_and_raises_an_alert():
    out = effects(COMPLAINT, {"message_id": "m1", "feedback_type": "abuse"}, JOB, [person(reason="feedback")])
    assert kinds(out) == ["FeedbackReceived", "DeliverabilityAlertRaised", "SuppressionAdded", "ContactStatusChanged"]
    assert out[3][1].status == "complained" and out[1][1].kind == "complaint"


def test_a_reply_to_a_campaign_that_stops_on_reply_stops_it_for_that_contact():
    out = effects(REPLY, {"message_id": "m1"}, JOB, [person()])
    assert kinds(out) == ["FeedbackReceived", "CampaignStoppedForContact"]
    stop = out[1][1]
    assert isinstance(stop, CampaignStoppedForContact) and stop.subject == "subj-ann" and stop.reason == "reply"


def test_a_reply_to_a_campaign_that_does_not_stop_on_reply_or_to_transactional_mail_stops_nothing():
    keep_going = Job(JOB.job_id, JOB.subject, JOB.campaign_id, JOB.sender, JOB.domain, stop_on_reply=False)
    assert kinds(effects(REPLY, {"message_id": "m1"}, keep_going, [person()])) == ["FeedbackReceived"]
    assert kinds(effects(REPLY, {"message_id": "m1"}, TX, [person()])) == ["FeedbackReceived"]


def test_an_auto_reply_is_recorded_and_stops_nothing():
    out = effects(AUTO_REPLY, {"message_id": "m1"}, JOB, [person()])
    assert kinds(out) == ["FeedbackReceived"] and out[0][1].kind == "auto_reply"


def test_a_replayed_or_reprocessed_message_that_is_still_what_it_was_causes_nothing_new():
    same = person(reason="mailboxfull", soft_count=2, seen="bounce|mailboxfull||False")
    assert effects(BOUNCE, {"message_id": "m1"}, JOB, [same]) == []
    changed = person(reason="userunknown", status="5.1.1", hard=True, seen="bounce|mailboxfull||False")
    assert kinds(effects(BOUNCE, {"message_id": "m1"}, JOB, [changed]))[:2] == ["FeedbackReceived", "SuppressionAdded"]
