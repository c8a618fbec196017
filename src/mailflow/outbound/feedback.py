"""Outbound room: what came back - the effects of bounces, complaints, auto-replies, replies and
unsubscribes by mail, each an event, each applied once.

Inbound says what a received message is (BounceDetected, ComplaintReceived, ...: inbound/
classifier.py); the `outbound_feedback` consumer decides here what that means for sending:

- a hard bounce suppresses the address (its reason recorded) and marks the contact bounced;
- a soft one is counted, and `soft_limit` soft bounces within `soft_window_s` suppress it
  (reason soft_bounces); a delayed DSN changes nothing but the job's history;
- a bounce that blames the sender (blocked, filtered, spamdetected, policyviolation, ...:
  SENDER_REASONS) never suppresses the recipient: it raises a deliverability alert for the
  sender and its domain instead;
- a complaint stops the contact (complained; an address without a contact is suppressed)
  and raises an alert;
- an auto-reply is recorded, and is not a reply;
- an unsubscribe by mail is the unsubscribe of its signed address (unsubscribes.plan());
- a reply is linked to its job, campaign and contact, and a campaign that stops on reply
  (the default) sends that contact nothing more: its unsent jobs end as `stopped`, and the
  worker refuses any other (campaign_stops).

Every effect is an event (FeedbackReceived on the job's stream is its history; the catalogue's
SuppressionAdded and ContactStatusChanged; SoftBounceCounted, DeliverabilityAlertRaised,
CampaignStoppedForContact; JobFailed), recorded in the consumer's transaction, so each is
applied exactly once however often the message is redelivered. `effects()` is the decision,
pure; `OutboundFeedback.apply()` the shell. The `feedback` inline projection keeps the
feedback, campaign_stops and deliverability_alerts tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailflow.config import Settings
from mailflow.consumers import inline
from mailflow.consumers.inline import InlineProjection, register
from mailflow.consumers.projection import Projection
from mailflow.events.envelope import Envelope, Metadata
from mailflow.events.registry import Event
from mailflow.events.store import EventStore
from mailflow.mail import tokens
from mailflow.outbound import queries as q
from mailflow.outbound import streams, unsubscribes
from mailflow.outbound.events import (
    CampaignStoppedForContact,
    ContactStatusChanged,
    DeliverabilityAlertRaised,
    FeedbackReceived,
    JobFailed,
    SoftBounceCounted,
    SuppressionAdded,
)
from mailflow.outbound.suppressions import added

NAME = "outbound_feedback"

# The classification events this consumer acts on (inbound/events.py), by type name: the room
# reads inbound's facts from the log, not inbound's code.
BOUNCE, COMPLAINT, AUTO_REPLY, UNSUBSCRIBE, REPLY = (
    "BounceDetected",
    "ComplaintReceived",
    "AutoReplyReceived",
    "UnsubscribeReceived",
    "ReplyReceived",
)
TYPES = frozenset({BOUNCE, COMPLAINT, AUTO_REPLY, UNSUBSCRIBE, REPLY})

# Reasons that blame the sending side (its IP, domain, authentication or content), not the
# address: never a suppression, always an alert.
SENDER_REASONS = frozenset(
    {
        "blocked",
        "filtered",
        "spamdetected",
        "policyviolation",
        "badreputation",
        "requireptr",
        "authfailure",
        "securityerror",
        "rejected",
        "norelaying",
        "virusdetected",
        "contenterror",
        "notcompliantrfc",
        "failedstarttls",
    }
)
# Actions of a DSN recipient that say nothing went wrong (yet).
NOT_FAILED = frozenset({"delayed", "delivered", "relayed", "expanded"})


@dataclass(frozen=True)
class Job:
    """The outbound job a message is about, as the effects need it."""

    job_id: str
    subject: str
    campaign_id: str | None
    sender: str
    domain: str
    stop_on_reply: bool = True


@dataclass(frozen=True)
class Person:
    """One person a classified message is about: its state now, and for a bounce the verdict."""

    subject: str
    sealed: str | None = None  # {"email"} under the subject's key, when the message named them
    contact_status: str | None = None
    suppressed: str | None = None
    reason: str = ""
    status: str = ""
    hard: bool = False
    action: str = "failed"
    soft_count: int = 0  # soft bounces already counted within the window (other messages)
    seen: str = ""  # verdict() of what this message was already recorded as for this person


@dataclass(frozen=True)
class Limits:
    soft_limit: int = 3
    soft_window_s: float = 14 * 86400.0


def verdict(fb: FeedbackReceived | dict[str, Any]) -> str:
    """What a FeedbackReceived (or its feedback row) says, for telling a replay from a change."""
    d = fb.model_dump() if isinstance(fb, FeedbackReceived) else fb
    return f"{d['kind']}|{d.get('reason', '')}|{d.get('status', '')}|{bool(d.get('hard'))}"


def effects(
    etype: str,
    data: dict[str, Any],
    job: Job | None,
    people: Sequence[Person],
    limits: Limits = Limits(),
) -> list[tuple[str, Event]]:
    """The events one classified message causes (see the module docstring), in order."""
    mid = data["message_id"]
    kind = {BOUNCE: "delayed" if data.get("delayed") else "bounce", COMPLAINT: "complaint"}.get(
        etype, {AUTO_REPLY: "auto_reply", UNSUBSCRIBE: "unsubscribe", REPLY: "reply"}.get(etype, "")
    )
    out: list[tuple[str, Event]] = []
    job_id, campaign_id = (job.job_id, job.campaign_id) if job else (None, None)
    for p in people:
        fb = FeedbackReceived(
            message_id=mid,
            subject=p.subject,
            job_id=job_id,
            campaign_id=campaign_id,
            kind=kind,
            reason=p.reason,
            status=p.status,
            hard=p.hard if kind == "bounce" else False,
        )
        if p.seen == verdict(fb):  # replayed, or reprocessed to the same verdict: applied already
            continue
        out.append((streams.job(job_id) if job_id else streams.contact(p.subject), fb))
        if kind == "bounce" and p.action not in NOT_FAILED:
            out += _bounce(p, job, mid, limits)
        elif kind == "complaint":
            out += _complaint(p, job, mid, data.get("feedback_type") or "abuse")
    if out and kind == "reply" and job is not None and job.campaign_id and job.stop_on_reply:
        stop = CampaignStoppedForContact(
            campaign_id=job.campaign_id, subject=job.subject, reason="reply", message_id=mid
        )
        out.append((streams.campaign(job.campaign_id), stop))
    return out


def _bounce(p: Person, job: Job | None, mid: str, limits: Limits) -> list[tuple[str, Event]]:
    if p.reason in SENDER_REASONS:
        return [_alert(job, "bounce", p.reason, mid, p.status)] if job else []
    if p.hard:
        return _stop(p, f"bounce: {p.reason}", f"{p.status} {p.reason}".strip(), "bounced")
    count = p.soft_count + 1
    counted = SoftBounceCounted(
        subject=p.subject,
        message_id=mid,
        count=count,
        limit=limits.soft_limit,
        window_days=limits.soft_window_s / 86400,
    )
    out: list[tuple[str, Event]] = [(streams.contact(p.subject), counted)]
    if count >= limits.soft_limit:
        out += _stop(p, "soft_bounces", f"{count} soft bounces, the last {p.reason}", "bounced")
    return out


def _complaint(p: Person, job: Job | None, mid: str, feedback_type: str) -> list[tuple[str, Event]]:
    out: list[tuple[str, Event]] = [_alert(job, "complaint", feedback_type, mid, "")] if job else []
    if p.contact_status == "complained" or (p.contact_status is None and p.suppressed is not None):
        return out
    return out + _stop(p, "complaint", feedback_type, "complained")


def _stop(p: Person, reason: str, detail: str, status: str) -> list[tuple[str, Event]]:
    """Suppress the address and mark its contact (an address without a contact: suppressed)."""
    out: list[tuple[str, Event]] = []
    if p.suppressed is None:
        added = SuppressionAdded(subject=p.subject, sealed=p.sealed, reason=reason, detail=detail)
        out.append((streams.suppression(p.subject), added))
    if p.contact_status is not None and p.contact_status != status:
        out.append((streams.contact(p.subject), ContactStatusChanged(subject=p.subject, status=status, reason=reason)))
    return out


def _alert(job: Job | None, kind: str, reason: str, mid: str, detail: str) -> tuple[str, Event]:
    assert job is not None
    alert = DeliverabilityAlertRaised(
        sender=job.sender, domain=job.domain, kind=kind, reason=reason, job_id=job.job_id, message_id=mid, detail=detail
    )
    return streams.sender(job.sender), alert


class OutboundFeedback(Projection):
    """The consumer group that applies what came back (module docstring)."""

    name = NAME
    description = "applies bounces, complaints, replies and unsubscribes by mail: suppressions, stops, alerts"

    def __init__(self) -> None:
        self.store: EventStore | None = None
        self.limits = Limits()
        self.keys: list[bytes] = []

    def bind(self, store: EventStore, settings: Settings | None = None) -> None:
        self.store = store
        if settings is not None:
            self.limits = Limits(settings.soft_bounce_limit, settings.soft_bounce_window_days * 86400)
        self.keys = store.people.vault.keyring.verifying_keys

    def apply(self, conn: psycopg.Connection, events: list[Envelope]) -> None:
        assert self.store is not None, "OutboundFeedback.bind(store) was not called"
        mine = [e for e in events if e.type in TYPES]
        for tenant, run in groupby(mine, key=lambda e: e.metadata.tenant or "default"):
            store = self.store.for_tenant(tenant)
            with inline.writing(store, conn) as w:  # one writing transaction per tenant's run
                for env in run:
                    self._one(w, store, tenant, env)

    def _one(self, w: inline.Writer, store: EventStore, tenant: str, env: Envelope) -> None:
        """One message's effects, recorded at once: the next message of the batch sees them
        (the soft bounces counted, the suppression added)."""
        md = Metadata(correlation_id=env.metadata.correlation_id, causation_id=str(env.id), tenant=tenant)
        if env.type == UNSUBSCRIBE:
            w.record([(s, e.to_new(md)) for s, e in self._unsubscribe(w.conn, store, env)])
            return
        job = _job(w.conn, tenant, env.data.get("job_id"))
        people = self._people(w.conn, tenant, env, job)
        caused = effects(env.type, env.data, job, people, self.limits)
        if any(isinstance(e, CampaignStoppedForContact) for _, e in caused):
            assert job is not None and job.campaign_id is not None
            unsent = w.conn.execute(q.UNSENT_CONTACT_JOBS, (tenant, job.campaign_id, job.subject)).fetchall()
            caused += [
                (
                    streams.job(jid),
                    JobFailed(
                        job_id=jid, attempt=attempts, reply="the contact replied: campaign stopped", kind="stopped"
                    ),
                )
                for jid, attempts in unsent
            ]
        if caused:
            w.record([(s, e.to_new(md)) for s, e in caused])

    def _people(self, conn: psycopg.Connection, tenant: str, env: Envelope, job: Job | None) -> list[Person]:
        """Who the message is about: the job's recipient when it names one of our jobs (a
        forwarded address in the DSN is still our contact's), else each recipient it names
        (a complaint or bounce without a job), else its correspondent (a reply)."""
        rows = [r for r in env.data.get("recipients") or [] if r.get("subject")]
        if job is not None:
            first = next((r for r in rows if r.get("action") not in NOT_FAILED), rows[0] if rows else {})
            mine = next((r for r in rows if r["subject"] == job.subject), first)
            rows = [{**mine, "subject": job.subject, "sealed": mine.get("sealed")}]
        elif env.type in (BOUNCE, COMPLAINT):
            pass
        else:
            return []  # an auto-reply or reply that answers nothing of ours has no effect
        subjects = [r["subject"] for r in rows]
        state = {
            r["subject"]: r
            for r in conn.cursor(row_factory=dict_row).execute(q.FEEDBACK_PEOPLE, (subjects, tenant, tenant)).fetchall()
        }
        people = []
        for r in rows:
            s = state.get(r["subject"], {})
            soft = 0
            if env.type == BOUNCE and not r.get("hard"):
                window = (tenant, r["subject"], self.limits.soft_window_s, env.data["message_id"])
                (soft,) = conn.execute(q.SOFT_BOUNCES, window).fetchone() or (0,)
            seen = (
                conn.cursor(row_factory=dict_row)
                .execute(q.FEEDBACK_KIND, (tenant, env.data["message_id"], r["subject"]))
                .fetchone()
            )
            people.append(
                Person(
                    subject=r["subject"],
                    sealed=r.get("sealed"),
                    contact_status=s.get("contact_status"),
                    suppressed=s.get("suppressed"),
                    reason=r.get("reason", ""),
                    status=r.get("status", ""),
                    hard=bool(r.get("hard")),
                    action=r.get("action", "failed"),
                    soft_count=int(soft),
                    seen=verdict(seen) if seen else "",
                )
            )
        return people

    def _unsubscribe(self, conn: psycopg.Connection, store: EventStore, env: Envelope) -> list[tuple[str, Event]]:
        """Mail to a List-Unsubscribe mailto address: the unsubscribe its signed token asks for."""
        local = str(env.data.get("mailbox", "")).partition("@")[0]
        try:
            req = unsubscribes.read_token(self.keys, local.split("+", 1)[1])
        except (tokens.BadToken, IndexError):
            return []
        subject = store.subject(conn, req.email)
        conn.execute(q.LOCK_ADDRESS, (subject,))
        status, suppressed = conn.execute(q.ADDRESS_STATE, {"subject": subject}).fetchone() or (None, False)
        _, items = unsubscribes.plan(
            req,
            subject,
            status,
            bool(suppressed),
            lambda: added(
                conn, str(store.tenant), subject, req.email, unsubscribes.SUPPRESSION_REASON, "unsubscribe by mail"
            ),
        )
        fb = FeedbackReceived(
            message_id=env.data["message_id"], subject=subject, campaign_id=req.campaign_id, kind="unsubscribe"
        )
        return [(streams.contact(subject), fb), *items]

    def reset(self, conn: psycopg.Connection, from_position: int, applied_upto: int) -> None:
        """Nothing to undo: the effects are events in the log (a suppression is lifted with
        `mailflow suppressions remove`), and replaying a classification records none twice
        (the feedback table is keyed by message and person)."""


def _job(conn: psycopg.Connection, tenant: str, job_id: str | None) -> Job | None:
    if not job_id:
        return None
    row = conn.cursor(row_factory=dict_row).execute(q.FEEDBACK_JOBS, (tenant, [job_id])).fetchone()
    return Job(**row) if row else None


# -- the feedback inline projection -------------------------------------------------------------


def _tenant(env: Envelope) -> str:
    return env.metadata.tenant or "default"


def _feedback(conn: psycopg.Connection, events: list[Envelope]) -> None:
    for e in events:
        d = e.data
        conn.execute(
            q.ADD_FEEDBACK,
            (
                _tenant(e),
                d["message_id"],
                d["subject"],
                d.get("job_id"),
                d.get("campaign_id"),
                d["kind"],
                d.get("reason", ""),
                d.get("status", ""),
                d.get("hard", False),
                e.recorded_at,
            ),
        )


def _stopped(conn: psycopg.Connection, events: list[Envelope]) -> None:
    for e in events:
        d = e.data
        conn.execute(
            q.ADD_CAMPAIGN_STOP,
            (_tenant(e), d["campaign_id"], d["subject"], d["reason"], d["message_id"], e.recorded_at),
        )


def _alerted(conn: psycopg.Connection, events: list[Envelope]) -> None:
    for e in events:
        d = e.data
        conn.execute(
            q.ADD_ALERT,
            (
                _tenant(e),
                d["sender"],
                d["domain"],
                d["kind"],
                d["reason"],
                d.get("job_id"),
                d["message_id"],
                e.recorded_at,
            ),
        )


PROJECTION = register(
    InlineProjection(
        "feedback",
        "what came back per job and person, campaign stops, deliverability alerts (inline)",
        ("feedback", "campaign_stops", "deliverability_alerts"),
        {
            FeedbackReceived.event_type: _feedback,
            CampaignStoppedForContact.event_type: _stopped,
            DeliverabilityAlertRaised.event_type: _alerted,
        },
    )
)


def campaign_counts(conn: psycopg.Connection, campaign_id: str) -> dict[str, int]:
    """What came back for a campaign: people per kind (bounces split hard and soft)."""
    counts = dict.fromkeys(
        ("bounced_hard", "bounced_soft", "delayed", "complained", "replied", "auto_replied", "unsubscribed"), 0
    )
    names = {"complaint": "complained", "reply": "replied", "auto_reply": "auto_replied", "unsubscribe": "unsubscribed"}
    for kind, hard, n in conn.execute(q.CAMPAIGN_FEEDBACK, (campaign_id,)).fetchall():
        key = ("bounced_hard" if hard else "bounced_soft") if kind == "bounce" else names.get(str(kind), str(kind))
        counts[key] = counts.get(key, 0) + int(n)
    return counts
