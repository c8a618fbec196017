"""Inbound room: where each recipient's copy of a message goes - pure functions of the RCPT
decisions, the tenant's routes, the headers and the spam verdict (no I/O).

A mailbox recipient lands in its mailbox; a bounce of mailflow's own mail and a reply to one
of its senders land in the sending identity's mailbox (the sender's From); any other
accepted address goes where the tenant's routes say (routes.py: the first that takes it, and
the ones after it while they say `continue`). An address no route takes any more (a route
with header conditions that do not match) is dropped, and says so.

The spam verdict comes first: a tenant whose reject threshold the score reaches refuses its
part (`rejected`, nothing stored for it); one whose quarantine threshold it reaches holds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message

from mailflow.inbound import routes as routing_table
from mailflow.inbound.events import Delivery
from mailflow.inbound.policy import Decision, Directory, Kind, without_tag
from mailflow.inbound.spam import Score, Thresholds, action
from mailflow.inbound.store import Outcome

NO_ROUTE = "no route takes this address"


@dataclass(frozen=True)
class Recipient:
    """One accepted RCPT TO: the policy's decision and, where it has one, its default mailbox
    (the mailbox itself; for a bounce or a reply, the sending identity's address)."""

    decision: Decision
    mailbox: str | None = None


UNSUBSCRIBED = "an unsubscribe by mail: applied by the classifier, kept in no mailbox"


def default_mailbox(decision: Decision, directory: Directory, bounce_sender: str | None = None) -> str | None:
    """Where an accepted recipient lands without a route: a mailbox itself (its +tag
    dropped), a reply in the sender's address, a bounce in the bounced job's sender's
    From (`bounce_sender`, looked up by the caller)."""
    address = decision.address
    if decision.kind is Kind.MAILBOX:
        return address if address in directory.mailboxes else without_tag(address)
    if decision.kind is Kind.REPLY:
        return address
    if decision.kind is Kind.BOUNCE:
        return bounce_sender
    return None


def deliveries(
    recipients: Sequence[Recipient], routes: Sequence[routing_table.Route], headers: Message
) -> list[Delivery]:
    out: list[Delivery] = []
    for r in recipients:
        address = r.decision.address
        if r.decision.kind in (Kind.MAILBOX, Kind.BOUNCE, Kind.REPLY):
            out.append(Delivery(recipient=address, action="mailbox", target=r.mailbox or address.lower()))
            continue
        if r.decision.kind is Kind.UNSUBSCRIBE:  # applied from the stored copy, kept in no mailbox
            out.append(Delivery(recipient=address, action="drop", target=UNSUBSCRIBED))
            continue
        matched = routing_table.match(routes, address, headers)
        if not matched:
            out.append(Delivery(recipient=address, action="drop", target=NO_ROUTE))
        for m in matched:
            out.append(
                Delivery(
                    recipient=address,
                    action=m.route.action,
                    target=m.route.target,
                    route_id=m.route.id,
                    captures=dict(m.captures),
                )
            )
    return out


def outcome(score: Score | None, thresholds: Thresholds, planned: list[Delivery]) -> Outcome:
    """One tenant's outcome: rejected or quarantined for its spam score, else routed."""
    verdict = "accept" if score is None else action(score, thresholds)
    if verdict == "reject":
        assert score is not None
        return Outcome("rejected", reason=f"spam score {score.score:.1f} >= {thresholds.reject:g}")
    if verdict == "quarantine":
        assert score is not None
        return Outcome("quarantined", reason=f"spam score {score.score:.1f} >= {thresholds.quarantine:g}")
    if planned and all(d.action == "reject" for d in planned):
        return Outcome("rejected", reason=planned[0].target or "refused by a route")
    return Outcome("routed", tuple(planned))
