"""Inbound room: whose a recipient address is - the decision that keeps mailflow from being an
open relay. Pure functions of the address and a snapshot of the directory (no I/O).

A recipient is accepted only if mailflow is responsible for it:
  1. a mailbox (exactly, or with a +tag: `help+billing@` is `help@`);
  2. the VERP bounce address of one of its own outbound messages (`bounces+<signed job>@`
     a sender's or an inbound domain; the signature is checked, the job looked up after);
  3. the reply address of one of its senders (their From), and the List-Unsubscribe mailto
     address of one of its campaign messages (`unsubscribe+<signed campaign:address>@` a
     sender's or an inbound domain; signature checked, the campaign's tenant looked up after);
  4. an address at an inbound domain of a tenant that one of the tenant's routes takes
     (routes.py): the first route whose pattern matches decides - a reject without header
     conditions refuses it with its own `550 5.7.1` text, any other accepts it; an address
     there that neither a mailbox nor a route takes is `550 5.1.1` no such mailbox.
Everything else is `550 5.7.1` relaying denied. So are addresses that try to route through
mailflow: a source route (RFC 5321 says to ignore it, so what is left decides), the
percent hack (`victim%foreign.example@ours`), bang paths and quoted local parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from mailflow.inbound.routes import Route, rcpt_match

DENIED = "550 5.7.1 Relaying denied: mailflow does not receive mail for this address"
BAD_SYNTAX = "550 5.7.1 Relaying denied: routing through mailflow (%, !, quotes or a source route) is not accepted"
UNKNOWN_JOB = "550 5.1.1 This bounce address does not belong to a message mailflow sent"
UNKNOWN_UNSUBSCRIBE = "550 5.1.1 This unsubscribe address does not belong to a message mailflow sent"
NO_SUCH_MAILBOX = "550 5.1.1 No such mailbox: no mailbox or route here takes this address"

_LOCAL = re.compile(r"^[A-Za-z0-9#$&'*+/=?^_`{|}~.-]+$")  # dot-atom characters, without % and !
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


class Kind(StrEnum):
    MAILBOX = "mailbox"
    BOUNCE = "bounce"
    REPLY = "reply"
    UNSUBSCRIBE = "unsubscribe"
    ROUTE = "route"
    REFUSED = "refused"


@dataclass(frozen=True)
class Directory:
    """What mailflow receives for, as of one moment (server.py reloads it every few seconds)."""

    domains: dict[str, str] = field(default_factory=dict)  # inbound domain -> tenant
    mailboxes: dict[str, str] = field(default_factory=dict)  # address -> tenant
    senders: dict[str, frozenset[str]] = field(default_factory=dict)  # a sender's From -> tenants
    sender_domains: frozenset[str] = frozenset()  # where VERP bounces come back to
    routes: dict[str, tuple[Route, ...]] = field(default_factory=dict)  # tenant -> its routes, in order

    def routes_for(self, address: str) -> tuple[Route, ...]:
        """The routes that may take `address`: those of the tenant that receives for its
        domain, and no other tenant's (a regex route never sees another tenant's mail)."""
        tenant = self.domains.get(address.rpartition("@")[2].lower())
        return self.routes.get(tenant, ()) if tenant is not None else ()


@dataclass(frozen=True)
class Decision:
    kind: Kind
    address: str  # canonical (domain in lower case, source route dropped)
    tenants: tuple[str, ...] = ()
    job_id: str | None = None  # a bounce: the job it names (its tenant is looked up)
    campaign_id: str | None = None  # an unsubscribe by mail: the campaign it names (likewise)
    route_id: str | None = None  # a route's address: the route that took it (or refused it)
    reply: str = "250 2.1.5 OK"

    @property
    def accepted(self) -> bool:
        return self.kind is not Kind.REFUSED


def canonical(raw: str) -> str | None:
    """The address as mailflow takes it - the source route dropped, the domain in lower case,
    the local part as given (a VERP token is case-sensitive) - or None if it is not a plain,
    routable local@domain (see the module docstring)."""
    address = raw.strip().strip("<>")
    if address.startswith("@"):  # a source route: @relay1,@relay2:user@domain
        _, sep, address = address.partition(":")
        if not sep:
            return None
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not _LOCAL.match(local) or local.startswith(".") or ".." in local:
        return None
    domain = domain.lower().rstrip(".")
    if not _DOMAIN.match(domain):
        return None
    return f"{local}@{domain}"


def without_tag(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local.split('+', 1)[0]}@{domain}"


def decide(raw: str, directory: Directory, verp_job: Callable[[str], str | None]) -> Decision:
    """Accept or refuse one RCPT TO. `verp_job(address)` is the payload of a signed address
    mailflow made - a VERP address's job, an unsubscribe address's "campaign:address" - or
    None if it is not one, or the signature is wrong."""
    given = canonical(raw)
    if given is None:
        return Decision(Kind.REFUSED, raw, reply=BAD_SYNTAX)
    address = given.lower()  # mailboxes and senders compare in any case
    domain = address.rpartition("@")[2]
    for candidate in (address, without_tag(address)):
        tenant = directory.mailboxes.get(candidate)
        if tenant is not None:
            return Decision(Kind.MAILBOX, address, (tenant,))
    if address.startswith("bounces+") and (domain in directory.sender_domains or domain in directory.domains):
        job = verp_job(given)
        if job is None:
            return Decision(Kind.REFUSED, given, reply=UNKNOWN_JOB)
        return Decision(Kind.BOUNCE, given, job_id=job)
    if address.startswith("unsubscribe+") and (domain in directory.sender_domains or domain in directory.domains):
        payload = verp_job(given)
        campaign, sep, _ = (payload or "").partition(":")
        if not sep or not campaign:
            return Decision(Kind.REFUSED, given, reply=UNKNOWN_UNSUBSCRIBE)
        return Decision(Kind.UNSUBSCRIBE, given, campaign_id=campaign)
    owners = directory.senders.get(address)
    if owners:
        return Decision(Kind.REPLY, address, tuple(sorted(owners)))
    tenant = directory.domains.get(domain)
    if tenant is None:
        return Decision(Kind.REFUSED, address, reply=DENIED)
    route = rcpt_match(directory.routes_for(address), address)
    if route is None:
        return Decision(Kind.REFUSED, address, (tenant,), reply=NO_SUCH_MAILBOX)
    if route.refuses_at_rcpt:
        return Decision(Kind.REFUSED, address, (tenant,), route_id=route.id, reply=route.reply)
    return Decision(Kind.ROUTE, address, (tenant,), route_id=route.id)
