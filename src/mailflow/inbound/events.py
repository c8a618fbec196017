"""Inbound room: the events of the domains and mailboxes mailflow receives for, and of the mail
it accepted."""

from __future__ import annotations

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


for _model in (InboundDomainAdded, InboundDomainRemoved, MailboxAdded, MailboxRemoved, MessageReceived):
    registry.register(_model)
