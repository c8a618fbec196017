"""Inbound room: classify received mail - bounce, complaint, auto-reply, unsubscribe, reply or
other - as a pure function of its bytes and a Context (model.py).

The message is parsed once, with the stdlib's lenient compat32 parser, and asked in a fixed
order, the first yes deciding: a feedback report (arf.py) - before the bounce parser,
because a complaint is a multipart/report too; a delivery status notification
(bounce.py); an automatic answer (autoreply.py) - after the bounce parser, because DSNs
carry `Auto-Submitted` as well; mail to a List-Unsubscribe address; a person answering
(reply.py cuts the quoted history); other. The outbound job it is about is then looked up
through the Context, in the order: a signed envelope recipient (VERP bounce or reply
address), In-Reply-To, References (newest first), the original's Return-Path or Message-ID
inside a report.

Parsing never raises: a message nothing can be made of is Kind.OTHER. The Context's
lookups are not guarded: a database that is down is the caller's to retry, not a verdict.
docs/inbound.md ("Classification") is the user's description of the same.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from email.message import Message
from typing import Any, TypeVar

from mailflow.inbound.classify import arf, autoreply, bounce, reply
from mailflow.inbound.classify.headers import address_list, first_address, header, message_ids
from mailflow.inbound.classify.model import Classification, Context, Kind, Original, Recipient

__all__ = ["Classification", "Context", "Kind", "Original", "Recipient", "classify"]

# "Re:" in the languages mail clients are set to: Aw (de), Sv (sv, da, no), Antw (nl),
# Odp (pl), Vs (fi), Ynt (tr), Rif/R (it), Réf (fr), Res (pt), 回复/回覆/答复 (zh), 返信 (ja).
_REPLY_SUBJECT = re.compile(
    r"^\s*(?:\[[^\]]{1,40}\]\s*)?(re|aw|sv|antw|odp|vs|ynt|rif|r|réf|res|回复|回覆|答复|返信)(\[\d+\])?\s*[:\uff1a]",  # a full-width colon too
    re.IGNORECASE,
)
_RECIPIENT_HEADERS = ("Delivered-To", "X-Original-To", "To", "Cc")
T = TypeVar("T")


@dataclass(frozen=True)
class _Read:
    """What the bytes say, before any lookup."""

    kind: Kind | None  # complaint, bounce, auto-reply; None: unsubscribe, reply or other, by the lookups
    base: Classification
    recipients: tuple[str, ...]  # who it was sent to: the envelope, else its headers
    answers: bool  # In-Reply-To, References or a "Re:" subject
    list_mail: bool
    report: bool  # a report or delivery failure no parser could read: never a reply
    msg: Message | None = None  # kept for the reply text, cut only when it is a reply

    def text(self) -> str:
        """The new text (reply.py, the slowest step): only for what turns out to be a reply."""
        return (_safely(reply.reply_text, self.msg) or "") if self.msg is not None else ""


def classify(raw: bytes, context: Context | None = None) -> Classification:
    """What `raw` (a whole message, headers and body) is. Never raises on bad input: a
    message nothing can be made of is Kind.OTHER."""
    ctx = context if context is not None else Context()
    read = _read(raw, ctx)
    job_id, found_by = _find_job(ctx, read.recipients, read.base)
    result = replace(read.base, job_id=job_id, found_by=found_by)
    if read.kind is not None:
        return replace(result, kind=read.kind)
    if any(ctx.unsubscribe_address(a) for a in read.recipients):
        return replace(result, kind=Kind.UNSUBSCRIBE, reply_text="")
    to_reply_address = found_by == "reply_address" or any(ctx.reply_address(a) for a in read.recipients)
    if not read.report and (job_id is not None or (not read.list_mail and (to_reply_address or read.answers))):
        return replace(result, kind=Kind.REPLY, reply_text=read.text())
    return replace(result, kind=Kind.OTHER, reply_text="")


def _read(raw: bytes, ctx: Context) -> _Read:
    # As given: the token in a signed address (VERP, unsubscribe) is case-sensitive.
    recipients = tuple(a.strip() for a in ctx.envelope_recipients if a.strip())
    try:
        msg = email.message_from_bytes(raw if isinstance(raw, bytes) else bytes(raw), policy=email.policy.compat32)
        return _decide(msg, recipients)
    except Exception:  # noqa: BLE001 - bad input is never an exception: nothing can be made of it
        return _Read(None, Classification(kind=Kind.OTHER), recipients, False, False, True)


def _decide(msg: Message, envelope: tuple[str, ...]) -> _Read:
    refs = message_ids(header(msg, "References"))
    in_reply_to = message_ids(header(msg, "In-Reply-To"))
    subject = header(msg, "Subject")
    own_id = message_ids(header(msg, "Message-ID"))
    base = Classification(
        kind=Kind.OTHER,
        message_id=own_id[0] if own_id else header(msg, "Message-ID"),
        in_reply_to=in_reply_to[0] if in_reply_to else "",
        references=refs,
        subject=subject,
        sender=first_address(header(msg, "From")),
    )
    recipients = envelope or tuple(
        dict.fromkeys(a for name in _RECIPIENT_HEADERS for a in address_list(header(msg, name)))
    )
    answers = bool(in_reply_to or refs or _REPLY_SUBJECT.match(subject))
    report = autoreply.looks_like_a_failure(msg)

    def read(kind: Kind | None, **fields: Any) -> _Read:
        return _Read(kind, replace(base, **fields), recipients, answers, autoreply.is_list_mail(msg), report, msg)

    complaint = _safely(arf.parse, msg)
    if complaint is not None:
        return read(
            Kind.COMPLAINT,
            recipients=complaint.recipients,
            feedback_type=complaint.feedback_type,
            original=complaint.original,
        )
    found = _safely(bounce.parse, msg)
    if found is not None:
        return read(Kind.BOUNCE, recipients=tuple(found.recipients), original=found.original)
    why = _safely(autoreply.detect, msg) or ""
    if why:
        answering = (Recipient(address=base.sender, reason="vacation", hard=False, action="delivered"),)
        text = _safely(reply.reply_text, msg) or ""
        return read(Kind.AUTO_REPLY, recipients=answering if base.sender else (), auto_submitted=why, reply_text=text)
    return read(None)


def _safely(parse: Callable[[Message], T | None], msg: Message) -> T | None:
    """One parser's answer; a parser that fails on a message has no answer for it."""
    try:
        return parse(msg)
    except Exception:  # noqa: BLE001 - bad input for one parser must not stop the others
        return None


def _find_job(ctx: Context, recipients: Iterable[str], base: Classification) -> tuple[str | None, str]:
    """The outbound job the message is about or answers, and how it was found."""
    for address in recipients:
        job = ctx.job_for_address(address)
        if job:
            if address.lower().startswith("bounces+"):
                return job, "verp"
            return job, "unsubscribe_address" if ctx.unsubscribe_address(address) else "reply_address"
    for mid in (base.in_reply_to,) if base.in_reply_to else ():
        job = ctx.job_for_message_id(mid)
        if job:
            return job, "in_reply_to"
    for mid in reversed(base.references):
        job = ctx.job_for_message_id(mid)
        if job:
            return job, "references"
    original = base.original
    if original.return_path:
        job = ctx.job_for_address(original.return_path)
        if job:
            return job, "original"
    if original.message_id:
        job = ctx.job_for_message_id(original.message_id)
        if job:
            return job, "original"
    return None, ""
