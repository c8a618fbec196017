"""API room, infra service: sending domains (`mailflow sending-domains`) - mailflow generates the
DKIM key and says exactly which DNS records to publish (SPF, DKIM, DMARC, the return path's
MX), then checks them with real DNS lookups. Each check is an event; the queuer re-checks
every domain hourly and records SendingDomainRecordBroken when a record that passed fails.
The DKIM private key never leaves the vault: responses carry the public key and fingerprint."""

from __future__ import annotations

from datetime import datetime

from fastapi import Path
from pydantic import BaseModel, Field

from mailflow.api.auth import Ctx, require
from mailflow.api.models import Body, Deleted
from mailflow.api.problems import responses
from mailflow.api.routing import service_router
from mailflow.outbound import domains

router = service_router(tags=["sending-domains"])

DomainPath = Path(min_length=1, max_length=253, description="The domain (Unicode or IDNA).")


class DomainRequest(Body):
    domain: str = Field(min_length=1, max_length=253, examples=["mail.example.org"])
    selector: str | None = Field(None, min_length=1, max_length=63, description="DKIM selector (default mailflow).")


class Record(BaseModel):
    purpose: str = Field(description="spf, dkim, dmarc or return_path")
    type: str
    name: str
    value: str
    strings: list[str] = Field(description="A TXT value as the 255-byte strings DNS keeps it in.")
    zone: str = Field(description="The record as a zone-file line.")
    required: bool
    note: str


class Check(BaseModel):
    purpose: str
    type: str
    name: str
    required: bool
    status: str = Field(description="ok, warning, missing, wrong or error (DNS did not answer)")
    detail: str
    known: str | None


class SendingDomain(BaseModel):
    domain: str
    display: str
    selector: str
    status: str = Field(description="pending, verified or failing")
    dkim_public_key: str
    dkim_fingerprint: str
    created_at: datetime
    records: list[Record]
    last_check: list[Check] | None
    last_checked_at: datetime | None


class Verification(BaseModel):
    domain: str
    status: str
    ok: bool = Field(description="Every required record passed.")
    checks: list[Check]
    broken: list[Check] = Field(description="Records that passed at the last check and fail now.")


@router.get("/domains", response_model=list[SendingDomain], responses=responses())
def list_sending_domains(ctx: Ctx = require("infra:read")) -> list[SendingDomain]:
    """The tenant's sending domains, each with its records and last check."""
    with ctx.reading() as conn:
        found = domains.listing(conn, settings=ctx.gate.settings)
    return [SendingDomain.model_validate(d.to_dict()) for d in found]


@router.post("/domains", status_code=201, response_model=SendingDomain, responses=responses(409))
def add_sending_domain(body: DomainRequest, ctx: Ctx = require("infra:write")) -> SendingDomain:
    """Send from a domain: generates its DKIM key and answers with the records to publish."""
    found = domains.add(ctx.store, ctx.gate.vault, body.domain, settings=ctx.gate.settings, selector=body.selector)
    return SendingDomain.model_validate(found.to_dict())


@router.get("/domains/{domain}", response_model=SendingDomain, responses=responses(404))
def get_sending_domain(domain: str = DomainPath, ctx: Ctx = require("infra:read")) -> SendingDomain:
    """A sending domain: the records to publish and what the last check found of each."""
    with ctx.reading() as conn:
        return SendingDomain.model_validate(domains.get(conn, domain, settings=ctx.gate.settings).to_dict())


@router.post("/domains/{domain}/verify", response_model=Verification, responses=responses(404))
def verify_sending_domain(domain: str = DomainPath, ctx: Ctx = require("infra:write")) -> Verification:
    """Ask DNS now (MAILFLOW_DNS_SERVERS, else the system's resolvers) and record the check."""
    settings = ctx.gate.settings
    check = domains.verify(ctx.store, domain, domains.Resolver.from_settings(settings), settings=settings)
    return Verification.model_validate(check.to_dict())


@router.delete("/domains/{domain}", response_model=Deleted, responses=responses(404, 409))
def remove_sending_domain(domain: str = DomainPath, ctx: Ctx = require("infra:write")) -> Deleted:
    """Stop sending from a domain (refused while a sender without a DKIM key of its own signs with its key)."""
    domains.remove(ctx.store, domain)
    return Deleted()
