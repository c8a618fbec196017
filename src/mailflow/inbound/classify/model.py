"""Inbound room, classification: what a received message is, as plain data.

`classify()` (classify/__init__.py) turns a message's bytes into a Classification; the
pipeline (the inbound_classifier consumer), `mailflow inbound classify`, `mailflow inbound
reprocess` and bench/classify.py all call that one function. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    BOUNCE = "bounce"  # a delivery status notification (RFC 3464) or an MTA's own format
    COMPLAINT = "complaint"  # an abuse / feedback report (ARF, RFC 5965)
    AUTO_REPLY = "auto_reply"  # an automatic answer (RFC 3834, out of office, ...)
    UNSUBSCRIBE = "unsubscribe"  # mail to a List-Unsubscribe mailto address
    REPLY = "reply"  # a person answering
    OTHER = "other"


@dataclass(frozen=True)
class Recipient:
    """One recipient a bounce or a complaint is about. `reason` is in sisimai's vocabulary
    (userunknown, mailboxfull, blocked, feedback, vacation, ...); `hard` means "stop sending
    to this address" (sisimai's hardbounce). `action` is the DSN's (failed, delayed,
    delivered, relayed, expanded)."""

    address: str
    status: str = ""  # enhanced status code, '5.1.1' ('' when none was found)
    reply_code: str = ""  # SMTP reply code, '550'
    reason: str = "undefined"
    hard: bool = False
    action: str = "failed"
    remote_mta: str = ""
    diagnostic: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "status": self.status,
            "reply_code": self.reply_code,
            "reason": self.reason,
            "hard": self.hard,
            "action": self.action,
            "remote_mta": self.remote_mta,
            "diagnostic": self.diagnostic,
        }


@dataclass(frozen=True)
class Original:
    """What a bounce or a complaint says about the message it is about: from the
    message/rfc822 or text/rfc822-headers part, or from the headers quoted in an MTA's
    text. Any field may be empty."""

    message_id: str = ""  # with angle brackets, as written
    return_path: str = ""  # the envelope sender: mailflow's VERP address when it was ours
    sender: str = ""  # From
    to: str = ""
    subject: str = ""


@dataclass(frozen=True)
class Context:
    """What the pipeline knows besides the bytes, and its lookups of mailflow's own outbound
    messages. Every field has a default, so that a file on its own can be classified.

    `envelope_recipients`: RCPT TO of this message (a VERP bounce address names its job);
    `job_for_address(address)`: the job a signed address names - a VERP bounce address, or a
    per-message reply address (signature checked) - else None;
    `reply_address(address)`: the address is one of the tenant's senders' (a From people
    answer to);
    `job_for_message_id(mid)`: the job whose Message-ID this is, else None;
    `unsubscribe_address(address)`: the address is one of mailflow's List-Unsubscribe mailto
    addresses."""

    envelope_recipients: tuple[str, ...] = ()
    mail_from: str = ""
    job_for_address: Callable[[str], str | None] = field(default=lambda _a: None)
    job_for_message_id: Callable[[str], str | None] = field(default=lambda _m: None)
    reply_address: Callable[[str], bool] = field(default=lambda _a: False)
    unsubscribe_address: Callable[[str], bool] = field(default=lambda _a: False)


@dataclass(frozen=True)
class Classification:
    kind: Kind
    recipients: tuple[Recipient, ...] = ()
    feedback_type: str = ""  # a complaint's Feedback-Type (abuse, fraud, opt-out, auth-failure, ...)
    original: Original = Original()
    job_id: str | None = None  # one of ours: the job this message is about or answers
    found_by: str = (
        ""  # how job_id was found: verp | reply_address | unsubscribe_address | in_reply_to | references | original
    )
    reply_text: str = ""  # a reply's (or auto-reply's) new text, without quoted history and signature
    # Its own headers, for threading (threads projection): Message-ID, In-Reply-To, References.
    message_id: str = ""
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    subject: str = ""
    sender: str = ""  # the From address (canonical, lower case), '' if none
    auto_submitted: str = ""  # why it is an auto-reply: the header or subject that said so

    @property
    def delayed(self) -> bool:
        """A bounce that only says delivery is delayed (every recipient `delayed`)."""
        return (
            self.kind is Kind.BOUNCE and bool(self.recipients) and all(r.action == "delayed" for r in self.recipients)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "recipients": [r.to_dict() for r in self.recipients],
            "feedback_type": self.feedback_type,
            "original_message_id": self.original.message_id,
            "original_return_path": self.original.return_path,
            "job_id": self.job_id,
            "found_by": self.found_by,
            "reply_text": self.reply_text,
            "message_id": self.message_id,
            "in_reply_to": self.in_reply_to,
            "references": list(self.references),
            "subject": self.subject,
            "sender": self.sender,
            "auto_submitted": self.auto_submitted,
        }
