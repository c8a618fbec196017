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
):
    registry.register(_model)
