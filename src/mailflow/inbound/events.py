"""Inbound room: the events of the domains and mailboxes mailflow receives for, and of the mail
it accepted."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from mailflow.events.registry import Event, registry

_model: type[Event]


class InboundDomainAdded(Event):
    domain: str


class InboundDomainRemoved(Event):
    domain: str


class MailboxAdded(Event):
    address: str
    name: str = ""


class MailboxRemoved(Event):
    address: str


class RouteAdded(Event):
    """One of the tenant's routes (inbound/routes.py): mail to an address matching `pattern`,
    and whose headers match every [name, regex] of `headers`, goes to `action` with `target`
    (the mailbox or forward address, the URL, the reject text); with `continue_matching`
    the routes after it are tried too. Routes are tried by priority, then in the order added."""

    route_id: str
    priority: int
    pattern: str
    headers: list[tuple[str, str]] = Field(default_factory=list)
    action: Literal["mailbox", "forward", "http", "reject", "drop"]
    target: str = ""
    continue_matching: bool = False


class RouteRemoved(Event):
    route_id: str


class MessageReceived(Event):
    """A message accepted over SMTP and committed (its raw bytes in raw_messages, by sha256)
    before the 250 was sent. One event per tenant the recipients belong to.

    The sender is a person (or a machine): named by subject, the envelope sender and the
    client's IP sealed under that subject's key (infra/personal.py). A bounce (null sender)
    has no subject, and its client IP is kept as is."""

    message_id: str
    sha256: str
    size: int
    recipients: list[str]  # this tenant's: its own addresses, not people's
    sender_subject: str | None = None
    sealed: str | None = None  # {"mail_from", "client_ip"}
    client_ip: str | None = None  # only when there is no sender subject
    helo: str = ""
    tls: bool = False
    auth: dict[str, Any] | None = None  # authn.Verdicts.to_event(): SPF, DKIM, ARC, DMARC
    spam: dict[str, Any] | None = None  # spam.Score.to_event()
    defects: list[str] = Field(default_factory=list)  # what made it malformed (empty: well-formed)


class Delivery(BaseModel):
    """Where one recipient's copy goes: a route's action (or the default for a mailbox, a
    bounce or a reply), with the route's captures."""

    recipient: str
    action: str  # mailbox | forward | http | reject | drop
    target: str = ""  # the mailbox, the forward address, the URL, the reject text
    route_id: str | None = None
    captures: dict[str, str] = Field(default_factory=dict)


class MessageRouted(Event):
    """The routing decision for one tenant's recipients of a received (or released) message."""

    message_id: str
    deliveries: list[Delivery]


class MessageQuarantined(Event):
    """Held: its spam score reached the tenant's quarantine threshold. Nothing is delivered
    until an operator releases it (`mailflow quarantine release`) or drops it."""

    message_id: str
    reason: str


class MessageReleased(Event):
    message_id: str


class MessageRejected(Event):
    """Not delivered: refused at DATA for its spam score (`message_id` None: nothing was
    stored), dropped by a route, or dropped from quarantine."""

    message_id: str | None = None
    sha256: str
    stage: str  # data | route | quarantine
    reason: str


class MessageRead(Event):
    message_id: str
    mailbox: str
    read: bool = True


class ThresholdsSet(Event):
    quarantine: float
    reject: float


class RouteActionDone(Event):
    """A route's http POST was answered 2xx, or its forward accepted by the relay (actions.py).
    `status` is the HTTP status or the SMTP reply code; `attempts` counts this one."""

    message_id: str
    recipient: str
    action: str  # http | forward
    target: str
    attempts: int
    status: int


class RouteActionFailed(Event):
    """One attempt at a route's action failed: retried at `retry_at`, or, `final`, given up
    (a refusal that retrying cannot change, or the last attempt). No secret, no body: the
    error is the status line or the reply, or what went wrong on the way."""

    message_id: str
    recipient: str
    action: str  # http | forward
    target: str
    attempts: int
    error: str
    final: bool
    status: int | None = None  # HTTP status or SMTP reply code, when there was an answer
    retry_at: datetime | None = None  # when not final: when it is tried again


class ClassifiedRecipient(BaseModel):
    """One recipient a bounce or a complaint is about: a person, so named by subject, the
    address sealed under that subject's key ({"email"}); None for both when the report
    named no usable address. The diagnostic has the address replaced by <recipient>."""

    subject: str | None = None
    sealed: str | None = None
    status: str = ""
    reply_code: str = ""
    reason: str = "undefined"
    hard: bool = False
    action: str = "failed"
    remote_mta: str = ""
    diagnostic: str = ""


class Classified(Event):
    """What the classifier (inbound/classify/) made of a received message, for one tenant:
    the base of the six classification events below, one of which is recorded for each
    MessageReceived (and again by `mailflow inbound reprocess` only when the verdict changed).

    `job_id` is the outbound job it is about or answers (found by VERP address, reply address,
    In-Reply-To/References or the original headers inside a report: `found_by`). Its own
    Message-ID, In-Reply-To and References are kept for threading. Its correspondent (the
    From) is a person: named by subject, with the From address, the subject line and the
    reply text sealed under that subject's key ({"sender", "subject", "text"})."""

    message_id: str  # the received message (MessageReceived.message_id)
    mailbox: str = ""  # the tenant's address it was received at (first recipient)
    job_id: str | None = None
    found_by: str = ""
    header_message_id: str = ""
    in_reply_to: str = ""
    references: list[str] = Field(default_factory=list)
    correspondent: str | None = None
    sealed: str | None = None
    reclassified: bool = False  # recorded by a reprocess, replacing an earlier verdict


class BounceDetected(Classified):
    """A delivery status notification. Per recipient: status, reason and the hard verdict
    ("stop sending to this address"). `delayed`: every recipient's action is `delayed`."""

    recipients: list[ClassifiedRecipient] = Field(default_factory=list)
    delayed: bool = False
    original_message_id: str = ""


class ComplaintReceived(Classified):
    """An abuse / feedback report (ARF, RFC 5965) about one of mailflow's messages."""

    recipients: list[ClassifiedRecipient] = Field(default_factory=list)
    feedback_type: str = ""
    original_message_id: str = ""


class AutoReplyReceived(Classified):
    """An automatic answer (RFC 3834, out of office): recorded, never counted as a reply."""

    why: str = ""  # the header or subject that made it one


class UnsubscribeReceived(Classified):
    """Mail to one of mailflow's List-Unsubscribe mailto addresses."""


class ReplyReceived(Classified):
    """A person answering (the new text, without quoted history and signature, is sealed)."""


class OtherReceived(Classified):
    """Mail that is none of the above (a new conversation, a newsletter, ...)."""


CLASSIFIED_TYPES = (
    BounceDetected,
    ComplaintReceived,
    AutoReplyReceived,
    UnsubscribeReceived,
    ReplyReceived,
    OtherReceived,
)


class WebhookEndpointAdded(Event):
    """A tenant's webhook endpoint (inbound/webhooks.py): classified mail of the kinds in
    `events` is POSTed to `url`, signed with the endpoint's own secret - kept in the vault:
    the event carries only its reference and fingerprint."""

    endpoint_id: str
    url: str
    events: list[str]
    secret: dict[str, str]  # SecretRef.to_dict(): {"id", "fingerprint"}


class WebhookEndpointDisabled(Event):
    """No more deliveries to the endpoint (its pending ones are cancelled): `reason` says why -
    the operator, the receiver answered 410 Gone, or its deliveries kept failing."""

    endpoint_id: str
    reason: str
    by: Literal["operator", "gone", "failing"] = "operator"


class WebhookEndpointEnabled(Event):
    endpoint_id: str


class WebhookEndpointRemoved(Event):
    endpoint_id: str


class WebhookDelivered(Event):
    """One attempt of a delivery answered 2xx. `delivery_id` is the webhook-id's uuid (the
    same for every attempt); `attempts` counts this one; `test`: a `mailflow webhooks test`."""

    endpoint_id: str
    delivery_id: str
    type: str  # reply.received, bounce.detected, ..., webhook.test
    attempts: int
    status: int
    duration_ms: int | None = None
    test: bool = False


class WebhookDeliveryFailed(Event):
    """One attempt of a delivery failed: retried at `retry_at`, or, `final`, given up. No
    secret, no body: the error is the status line or what went wrong on the way."""

    endpoint_id: str
    delivery_id: str
    type: str
    attempts: int
    error: str
    final: bool
    status: int | None = None
    retry_at: datetime | None = None
    duration_ms: int | None = None
    test: bool = False


WEBHOOK_TYPES = (
    WebhookEndpointAdded,
    WebhookEndpointDisabled,
    WebhookEndpointEnabled,
    WebhookEndpointRemoved,
    WebhookDelivered,
    WebhookDeliveryFailed,
)

for _model in (
    InboundDomainAdded,
    InboundDomainRemoved,
    MailboxAdded,
    MailboxRemoved,
    RouteAdded,
    RouteRemoved,
    MessageReceived,
    MessageRouted,
    MessageQuarantined,
    MessageReleased,
    MessageRejected,
    MessageRead,
    ThresholdsSet,
    RouteActionDone,
    RouteActionFailed,
    *CLASSIFIED_TYPES,
    *WEBHOOK_TYPES,
):
    registry.register(_model)

# Classified mail is announced live on `<prefix>:notifications` as it is relayed (events/relay.py).
registry.announce("notifications", *CLASSIFIED_TYPES)
