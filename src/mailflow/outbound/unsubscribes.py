"""Outbound room: unsubscribe requests - whom a signed link names, and what unsubscribing them records.

The token in a campaign message's List-Unsubscribe link is mime.unsubscribe_token(): a
signed "<campaign id>:<email>". Nothing is stored when it is made; a request proves itself
by its signature. read_token() and plan() are pure decisions; unsubscribe() is the thin
shell that reads the address's state and appends the planned events in one transaction.
The web room serves the https link; a future inbound handler for the mailto link will call
the same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from mailflow.consumers.inline import writing
from mailflow.events.envelope import Metadata
from mailflow.events.registry import Event
from mailflow.events.store import EventStore
from mailflow.infra.services import scalar_row
from mailflow.infra.tenancy import DEFAULT_TENANT
from mailflow.mail import tokens
from mailflow.outbound import queries as q
from mailflow.outbound import streams
from mailflow.outbound.contacts import STOPPED_STATUSES
from mailflow.outbound.events import ContactStatusChanged
from mailflow.outbound.suppressions import added

# An unsubscribe leaves a stopped contact as it is: "bounced" and "complained" say more than
# "unsubscribed" does, and each of them already keeps the address from being mailed.

SUPPRESSION_REASON = "unsubscribe"


@dataclass(frozen=True)
class UnsubscribeRequest:
    """Who asked to leave, through a link from which campaign."""

    campaign_id: str
    email: str

    @property
    def reason(self) -> str:
        return f"unsubscribe link (campaign {self.campaign_id})"


class Outcome(str, Enum):
    UNSUBSCRIBED = "unsubscribed"  # the contact was active: now unsubscribed
    SUPPRESSED = "suppressed"  # no such contact: the address is suppressed instead
    ALREADY = "already"  # nothing to do: already unsubscribed, bounced, complained or suppressed


def read_token(secret: bytes | list[bytes], token: str) -> UnsubscribeRequest:
    """The request a genuine unsubscribe token stands for; tokens.BadToken for anything else.

    The inverse of mime.unsubscribe_token(). Other tokens signed with the same key (VERP
    return paths carry a bare job id) are refused: their payload has no "campaign:email".
    """
    payload = tokens.verify(secret, token)
    campaign_id, sep, email = payload.partition(":")
    if not sep or not campaign_id or "@" not in email:
        raise tokens.BadToken("not an unsubscribe token")
    return UnsubscribeRequest(campaign_id=campaign_id, email=email)


def plan(
    req: UnsubscribeRequest,
    subject: str,
    contact_status: str | None,
    suppressed: bool,
    suppression: Callable[[], Event],
) -> tuple[Outcome, list[tuple[str, Event]]]:
    """What to record for a request, given the subject of its address, the contact's status
    (None: no such contact) and whether it is suppressed; `suppression()` makes the
    SuppressionAdded to record (it seals the address, so only when one is recorded).

    - an active contact (or any status that does not stop sending) becomes unsubscribed;
    - a contact that is already unsubscribed, bounced or complained stays as it is;
    - an address with no contact is suppressed (reason "unsubscribe"), unless it already is,
      so that no later import, campaign or transactional send can mail it.
    """
    if contact_status is None:
        if suppressed:
            return Outcome.ALREADY, []
        return Outcome.SUPPRESSED, [(streams.suppression(subject), suppression())]
    if contact_status in STOPPED_STATUSES:
        return Outcome.ALREADY, []
    changed = ContactStatusChanged(subject=subject, status="unsubscribed", reason=req.reason)
    return Outcome.UNSUBSCRIBED, [(streams.contact(subject), changed)]


def unsubscribe(store: EventStore, req: UnsubscribeRequest, *, actor: str = "unsubscribe-link") -> Outcome:
    """Record the request: read, decide and append in one transaction, one request per address at a time.

    Committed when this returns, so a caller may acknowledge it (an HTTP 200). An operator's
    store (the web process serves every tenant) acts for the tenant whose campaign sent the
    link; a signed link whose campaign is unknown here predates tenants: the default tenant's.
    """
    if store.tenant is None:
        with store.pool.connection() as conn:
            row = conn.execute(q.CAMPAIGN_TENANT, (req.campaign_id,)).fetchone()
        store = store.for_tenant(row[0] if row else DEFAULT_TENANT)
    with writing(store) as w:
        subject = store.subject(w.conn, req.email)
        w.conn.execute(q.LOCK_ADDRESS, (subject,))
        status, suppressed = scalar_row(w.conn, q.ADDRESS_STATE, {"subject": subject})
        outcome, items = plan(
            req,
            subject,
            status,
            suppressed,
            lambda: added(w.conn, str(store.tenant), subject, req.email, SUPPRESSION_REASON, req.reason),
        )
        if items:
            md = Metadata(actor=actor, correlation_id=streams.campaign(req.campaign_id))
            w.record([(stream, event.to_new(md)) for stream, event in items])
    return outcome
