"""API room, infra service: what a tenant receives - inbound domains (and their MX record and
DNS check), mailboxes, routes, and the secret the routes' http actions sign with.

The writes and reads are inbound/directory.py's, routes.py's, dnscheck.py's and actions.py's,
as `mailflow domains|mailboxes|routes` call them. One difference from the CLI, on purpose: a
route's http URL is checked by the webhook endpoints' address guard (inbound/webhooks.py), so
a key cannot point mail at a loopback, private or link-local address (169.254.169.254) unless
MAILFLOW_WEBHOOKS_ALLOW_PRIVATE; the operator's CLI on the server is not held to it.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Literal

from fastapi import Path, Query, Request, Response
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from mailflow.api import queries as q
from mailflow.api.auth import Ctx, require
from mailflow.api.models import Body, Deleted
from mailflow.api.pagination import CursorQuery, LimitQuery, Page, keyset, page
from mailflow.api.problems import responses
from mailflow.api.routes.senders import NO_NUL
from mailflow.api.routing import service_router
from mailflow.errors import NotFoundError, UserError
from mailflow.inbound import actions, directory, dnscheck, routes, webhooks

router = service_router()


DOMAIN = r"^[A-Za-z0-9.\-]+$"  # the characters of a name inbound/policy.canonical takes (it checks the labels)
ADDRESS = r"^[^\x00-\x20\x7f@]+@[A-Za-z0-9.\-]+$"
DomainName = Path(min_length=1, max_length=253, pattern=DOMAIN, description="A domain name, like support.example.org.")
Address = Path(min_length=3, max_length=254, pattern=ADDRESS, description="A mailbox address, like help@example.org.")
RouteId = Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9]+$", description="A route's id (8 hex digits).")
MAX_INT64 = 2**63 - 1


@lru_cache(maxsize=8)
def _hostname(configured: str | None) -> str:
    """The host MX records name (MAILFLOW_INBOUND_HOSTNAME, else the FQDN), looked up once."""
    return dnscheck.hostname(configured)


def _host(ctx: Ctx) -> str:
    return _hostname(ctx.gate.settings.inbound_hostname)


# -- inbound domains ---------------------------------------------------------------------------


class InboundDomainRequest(Body):
    domain: str = Field(min_length=1, max_length=253, pattern=DOMAIN, description="The domain to receive mail for.")


class InboundMxRecord(BaseModel):
    """The MX record to publish: `name. MX preference host.`"""

    name: str
    type: Literal["MX"] = "MX"
    preference: int
    host: str
    zone_line: str


class InboundDomain(BaseModel):
    domain: str
    created_at: datetime
    mailboxes: int
    mx: InboundMxRecord


class AddedInboundDomain(BaseModel):
    domain: str
    created: bool = Field(description="False when the tenant received mail for it already.")
    mx: InboundMxRecord


class InboundMailbox(BaseModel):
    address: str
    name: str
    created_at: datetime
    messages: int
    unread: int


class InboundMessageCounts(BaseModel):
    received: int
    by_state: dict[str, int]
    in_mailboxes: int
    unread: int


class RouteHeader(BaseModel):
    name: str = Field(description="A header name, lower case.")
    regex: str


class InboundRoute(BaseModel):
    id: str
    priority: int
    pattern: str
    kind: Literal["exact", "tag", "catch-all", "regex"]
    headers: list[RouteHeader] = Field(description="Conditions; all must match.")
    action: Literal["mailbox", "forward", "http", "reject", "drop"]
    target: str = Field(description="The mailbox or forward address, the URL, or the reject text.")
    continue_matching: bool
    description: str = Field(description="The action in words.")
    created_at: datetime | None


class InboundDomainDetails(BaseModel):
    domain: str
    created_at: datetime
    mx: InboundMxRecord
    mailboxes: list[InboundMailbox]
    routes: list[InboundRoute] = Field(
        description="The routes that may take its mail: patterns at it, and every regex."
    )
    messages: InboundMessageCounts


class InboundMxHost(BaseModel):
    preference: int
    host: str


class InboundDomainCheck(BaseModel):
    """Whether the domain's mail comes here, as `mailflow domains check` says it."""

    ok: bool
    host: str = Field(description="The host MX records should name.")
    addresses: list[str] = Field(description="This host's addresses, as found.")
    domain: str
    status: Literal["ok", "wrong", "missing", "temperror"]
    detail: str
    mx: list[InboundMxHost]
    here: str | None = Field(description="The MX host that is this host.")
    spf: Literal["present", "absent", "unknown"]
    dmarc: Literal["present", "absent", "unknown"]
    publish: InboundMxRecord


def _mx(domain: str, host: str) -> InboundMxRecord:
    return InboundMxRecord(
        name=dnscheck.name_of(domain) + ".",
        preference=dnscheck.MX_PREFERENCE,
        host=dnscheck.name_of(host) + ".",
        zone_line=dnscheck.mx_record(domain, host),
    )


def _route(r: routes.Route) -> InboundRoute:
    return InboundRoute(
        id=r.id,
        priority=r.priority,
        pattern=r.pattern,
        kind=str(r.recipient.kind),
        headers=[RouteHeader(name=n, regex=x) for n, x in r.headers],
        action=str(r.action),
        target=r.target,
        continue_matching=r.continue_matching,
        description=r.describe(),
        created_at=r.created_at,
    )


@router.post(
    "/inbound-domains",
    status_code=201,
    response_model=AddedInboundDomain,
    tags=["inbound-domains"],
    responses={**responses(409), 200: {"model": AddedInboundDomain, "description": "The tenant had it already"}},
)
def add_domain(body: InboundDomainRequest, response: Response, ctx: Ctx = require("infra:write")) -> AddedInboundDomain:
    """Receive mail for a domain (201; 200 when the tenant had it already), and the MX record to
    publish for it (pointing at MAILFLOW_INBOUND_HOSTNAME, else the server's FQDN). 409 when
    another tenant receives for it."""
    name, created = directory.add_domain(ctx.store, body.domain)
    if not created:
        response.status_code = 200
    return AddedInboundDomain(domain=name, created=created, mx=_mx(name, _host(ctx)))


@router.get("/inbound-domains", response_model=Page[InboundDomain], tags=["inbound-domains"], responses=responses())
def list_domains(
    ctx: Ctx = require("infra:read"), limit: int = LimitQuery, cursor: str | None = CursorQuery
) -> Page[InboundDomain]:
    """The tenant's inbound domains, by name, with their mailbox counts and MX records."""
    after = keyset(cursor, str)
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            q.INBOUND_DOMAINS_PAGE, {"after": after[0] if after else None, "limit": limit + 1}
        ).fetchall()
    items, next_cursor = page(rows, limit, lambda r: [r["domain"]])
    host = _host(ctx)
    return Page[InboundDomain](
        items=[
            InboundDomain(
                domain=r["domain"], created_at=r["created_at"], mailboxes=r["mailboxes"], mx=_mx(r["domain"], host)
            )
            for r in items
        ],
        next_cursor=next_cursor,
    )


@router.get(
    "/inbound-domains/{domain}", response_model=InboundDomainDetails, tags=["inbound-domains"], responses=responses(404)
)
def get_domain(domain: str = DomainName, ctx: Ctx = require("infra:read")) -> InboundDomainDetails:
    """One inbound domain: the MX record to publish, its mailboxes, the routes that may take
    its mail, and its received messages by state - as `mailflow domains show`."""
    with ctx.reading() as conn:
        row = directory.domain_details(conn, domain)
    return InboundDomainDetails(
        domain=row["domain"],
        created_at=row["created_at"],
        mx=_mx(row["domain"], _host(ctx)),
        mailboxes=[InboundMailbox.model_validate(b) for b in row["mailboxes"]],
        routes=[_route(r) for r in row["routes"]],
        messages=InboundMessageCounts.model_validate(row["messages"]),
    )


@router.delete("/inbound-domains/{domain}", response_model=Deleted, tags=["inbound-domains"], responses=responses(404))
def remove_domain(domain: str = DomainName, ctx: Ctx = require("infra:write")) -> Deleted:
    """Stop receiving mail for the domain."""
    directory.remove_domain(ctx.store, domain)
    return Deleted()


@router.get(
    "/inbound-domains/{domain}/check",
    response_model=InboundDomainCheck,
    tags=["inbound-domains"],
    responses=responses(404),
)
def check_domain(domain: str = DomainName, ctx: Ctx = require("infra:read")) -> InboundDomainCheck:
    """Look up the domain's MX records (and, as information, SPF and DMARC) and say whether
    its mail comes here: ok, wrong (the MX names other hosts), missing (no such domain, no MX,
    a null MX) or temperror (DNS did not answer: ask again). DNS is asked through
    MAILFLOW_DNS_SERVERS when set; each question waits at most MAILFLOW_INBOUND_DNS_TIMEOUT_S."""
    s = ctx.gate.settings
    with ctx.reading() as conn:
        name = directory.domain(conn, domain)["domain"]
    host = _host(ctx)
    me, [verdict] = asyncio.run(
        dnscheck.check(
            [name], host, nameservers=s.dns_servers, timeout_s=s.inbound_dns_timeout_s, listen_address=s.inbound_host
        )
    )
    found = verdict.to_dict()
    return InboundDomainCheck.model_validate(
        {**found, "ok": verdict.ok, "host": me.name, "addresses": sorted(me.addresses), "publish": _mx(name, host)}
    )


# -- mailboxes ---------------------------------------------------------------------------------


class MailboxRequest(Body):
    address: str = Field(
        min_length=3, max_length=254, pattern=ADDRESS, description="local@domain at one of the tenant's domains."
    )
    name: str = Field("", max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$", description="A display name.")


class AddedMailbox(BaseModel):
    address: str


class MailboxMessage(BaseModel):
    id: str
    received_at: datetime | None
    recipient: str | None
    read_at: datetime | None


class MailboxDetails(BaseModel):
    address: str
    name: str
    created_at: datetime
    messages: int
    unread: int
    routes: list[InboundRoute] = Field(description="The routes that deliver to it.")
    latest: list[MailboxMessage]


@router.post("/mailboxes", status_code=201, response_model=AddedMailbox, tags=["mailboxes"], responses=responses())
def add_mailbox(body: MailboxRequest, ctx: Ctx = require("infra:write")) -> AddedMailbox:
    """A mailbox at one of the tenant's inbound domains (mail to address+tag lands in it too).
    Adding one that exists sets its name."""
    return AddedMailbox(address=directory.add_mailbox(ctx.store, body.address, body.name))


@router.get("/mailboxes", response_model=Page[InboundMailbox], tags=["mailboxes"], responses=responses())
def list_mailboxes(
    ctx: Ctx = require("infra:read"), limit: int = LimitQuery, cursor: str | None = CursorQuery
) -> Page[InboundMailbox]:
    """The tenant's mailboxes, by address, with how many messages each holds (and unread)."""
    after = keyset(cursor, str)
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.MAILBOXES_PAGE, {"after": after[0] if after else None, "limit": limit + 1}).fetchall()
    items, next_cursor = page(rows, limit, lambda r: [r["address"]])
    return Page[InboundMailbox](items=[InboundMailbox.model_validate(r) for r in items], next_cursor=next_cursor)


@router.get("/mailboxes/{address}", response_model=MailboxDetails, tags=["mailboxes"], responses=responses(404))
def get_mailbox(
    address: str = Address,
    ctx: Ctx = require("infra:read"),
    latest: int = Query(5, ge=0, le=100, description="How many of its latest messages."),
) -> MailboxDetails:
    """One mailbox: its name, message counts, the routes that deliver to it, its latest messages."""
    with ctx.reading() as conn:
        row = directory.mailbox_details(conn, address, latest=latest)
    return MailboxDetails(
        address=row["address"],
        name=row["name"],
        created_at=row["created_at"],
        messages=row["messages"],
        unread=row["unread"],
        routes=[_route(r) for r in row["routes"]],
        latest=[MailboxMessage.model_validate({**m, "id": str(m["id"])}) for m in row["latest"]],
    )


@router.delete("/mailboxes/{address}", response_model=Deleted, tags=["mailboxes"], responses=responses(404, 409))
def remove_mailbox(address: str = Address, ctx: Ctx = require("infra:write")) -> Deleted:
    """Remove a mailbox (its messages stay); 409 while a route delivers to it."""
    directory.remove_mailbox(ctx.store, address)
    return Deleted()


# -- routes ------------------------------------------------------------------------------------


class RouteRequest(Body):
    pattern: str = Field(
        min_length=1,
        max_length=300,
        pattern=NO_NUL,
        description="help@example.org, help+*@example.org, *@example.org, or a /regex/ (named groups are captured).",
    )
    action: Literal["mailbox", "forward", "http", "reject", "drop"]
    target: str = Field(
        "",
        max_length=2000,
        pattern=NO_NUL,
        description="mailbox: its address; forward: an address; http: a URL; reject: the reply text (optional); "
        "drop: empty.",
    )
    headers: list[Annotated[str, Field(min_length=1, max_length=300, pattern=NO_NUL)]] = Field(
        default_factory=list, max_length=20, description="Conditions 'Name: regex'; all must match."
    )
    priority: int | None = Field(
        None,
        ge=-routes.MAX_PRIORITY,
        le=routes.MAX_PRIORITY,
        description=f"Lower is tried first ({routes.DEFAULT_PRIORITY}).",
    )
    continue_matching: bool = Field(False, description="Try the routes after this one too.")


class RouteSecret(BaseModel):
    secret: str = Field(description="whsec_...: shown this once, kept only in the vault.")
    rotated: bool = True


@router.post("/routes", status_code=201, response_model=InboundRoute, tags=["routes"], responses=responses(404, 409))
def add_route(body: RouteRequest, ctx: Ctx = require("infra:write")) -> InboundRoute:
    """Add a route - as `mailflow routes add` (routes are tried by priority, then in the order
    added). A mailbox target must be one of the tenant's mailboxes (404 otherwise); an http
    URL must not be, or resolve to, a loopback, private or link-local address unless
    MAILFLOW_WEBHOOKS_ALLOW_PRIVATE."""
    target = body.target
    if body.action == "http":
        target = webhooks.check_url(target, webhooks.guard_for(ctx.gate.settings))
    route = routes.add_route(
        ctx.store,
        body.pattern,
        body.action,
        target,
        headers=body.headers,
        priority=body.priority,
        continue_matching=body.continue_matching,
    )
    return _route(route)


@router.get("/routes", response_model=Page[InboundRoute], tags=["routes"], responses=responses())
def list_routes(
    ctx: Ctx = require("infra:read"), limit: int = LimitQuery, cursor: str | None = CursorQuery
) -> Page[InboundRoute]:
    """The tenant's routes, in the order they are tried."""
    after = keyset(cursor, int, int)
    if after is not None and not (abs(after[0]) <= routes.MAX_PRIORITY and 0 <= after[1] <= MAX_INT64):
        raise UserError("cursor is not one this API gave out")
    params = {
        "after_priority": after[0] if after else None,
        "after_seq": after[1] if after else None,
        "limit": limit + 1,
    }
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.ROUTES_PAGE, params).fetchall()
    items, next_cursor = page(rows, limit, lambda r: [r["priority"], r["seq"]])
    return Page[InboundRoute](items=[_route(routes.from_row(r)) for r in items], next_cursor=next_cursor)


@router.get("/routes/{route_id}", response_model=InboundRoute, tags=["routes"], responses=responses(404))
def get_route(route_id: str = RouteId, ctx: Ctx = require("infra:read")) -> InboundRoute:
    """One route."""
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.ROUTE, {"id": route_id.strip().lower()}).fetchone()
    if row is None:
        raise NotFoundError(f"no route {route_id} (see GET /routes)")
    return _route(routes.from_row(row))


@router.delete("/routes/{route_id}", response_model=Deleted, tags=["routes"], responses=responses(404))
def remove_route(route_id: str = RouteId, ctx: Ctx = require("infra:write")) -> Deleted:
    """Remove a route."""
    routes.remove_route(ctx.store, route_id)
    return Deleted()


@router.post("/routes/secret/rotate", response_model=RouteSecret, tags=["routes"], responses=responses())
def rotate_route_secret(request: Request, ctx: Ctx = require("infra:write")) -> RouteSecret:
    """Replace the secret the tenant's http routes sign their POSTs with (Standard Webhooks'
    webhook-signature) - `mailflow routes secret --rotate`. The new secret is in this response
    only; the old one stops working at once. There is no way to read a secret back."""
    with ctx.reading() as conn:
        secret = actions.webhook_secret(conn, ctx.gate.vault, ctx.tenant, rotate=True)
    return RouteSecret(secret=secret)
