"""API room, infra service: senders - a From identity, its SMTP relay and DKIM key (`mailflow senders`).

The writes are outbound/sending.py's, as the CLI's are. Secrets are write-only: a relay
password (in `relay_url`) and a DKIM private key go into the vault and never come back - a
response says whether each is set, with its fingerprint, and the DKIM public key.

Not here, on purpose: `mailflow senders test`. It connects from the server to the relay's
host and port (any host, any port, as the tenant wrote them) and reports what answered,
greeting and timing included: over the API that is a probe of the server's network (a port
scanner and banner grabber for whoever holds a key), so it stays an operator's command.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

from fastapi import Path, Request, Response
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from mailflow.api import queries as q
from mailflow.api.auth import Ctx, require
from mailflow.api.models import Body, Deleted
from mailflow.api.pagination import CursorQuery, LimitQuery, Page, keyset, page
from mailflow.api.problems import responses
from mailflow.api.routing import service_router
from mailflow.config import mask_url
from mailflow.errors import NotFoundError
from mailflow.infra.vault import dkim_fingerprint
from mailflow.outbound import sending
from mailflow.outbound.senders import Sender, dkim_record, parse_relay_url

router = service_router(tags=["senders"])

NAME = r"^[A-Za-z0-9_.\-]{1,100}$"  # outbound/senders.check_sender's rule, for the document
NO_NUL = r"^[^\x00]*$"  # PostgreSQL's text takes no NUL: refused as input, not failed at the write
SELECTOR = r"^[A-Za-z0-9](?:[A-Za-z0-9_\-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9_\-]{0,62}))*$"
ONE_LINE = r"^[^\x00-\x1f\x7f]*$"  # no control characters: it goes into a From header

SenderName = Path(min_length=1, max_length=100, pattern=NAME, description="The sender's name.")


class SenderDkimKey(Body):
    selector: str = Field(max_length=253, pattern=SELECTOR, description="The DKIM selector, e.g. `mf1`.")
    private_key_pem: str = Field(
        min_length=1,
        max_length=20_000,
        pattern=NO_NUL,
        description="An RSA private key, PEM. Write-only: never shown again.",
    )


class SenderRequest(Body):
    from_email: str = Field(
        min_length=3,
        max_length=254,
        pattern=r"^[^@\s]+@[^@\s]+$",
        description="The From address, e.g. news@example.org.",
    )
    from_name: str = Field("", max_length=200, pattern=ONE_LINE, description="The From display name.")
    relay_url: str = Field(
        min_length=1,
        max_length=2000,
        pattern=ONE_LINE,
        description=(
            "smtp://user:password@host:587, smtps://host:465 (`?tls=none|opportunistic|starttls`, `&timeout=S`), "
            "or direct:// to deliver to the recipients' MX hosts. The password is write-only: it goes into the "
            "vault, and the URL is shown without it."
        ),
    )
    dkim: SenderDkimKey | None = Field(
        None, description="A DKIM key to sign with (none: unsigned, or the sending domain's)."
    )


class SenderRelay(BaseModel):
    url: str = Field(description="The relay URL without its password.")
    host: str = Field(description="Empty for direct delivery.")
    port: int
    tls: str = Field(description="none | opportunistic | starttls | tls")
    direct: bool
    username: str | None
    password_set: bool
    password_fingerprint: str | None = Field(description="HMAC fingerprint: equal passwords have equal ones.")


class SenderDkim(BaseModel):
    selector: str
    private_key_set: bool = True
    fingerprint: str = Field(description="sha256 of the public key (SubjectPublicKeyInfo).")
    public_key: str = Field(description="base64 SubjectPublicKeyInfo, as in the DNS record.")
    record_name: str


class SenderOut(BaseModel):
    name: str
    from_email: str
    from_name: str
    relay: SenderRelay
    dkim: SenderDkim | None
    created_at: datetime
    updated_at: datetime


class SenderDkimRecord(BaseModel):
    sender: str
    name: str = Field(description="<selector>._domainkey.<domain>")
    type: str = "TXT"
    value: str = Field(description="v=DKIM1; k=rsa; p=...")
    strings: list[str] = Field(description="The value in character-strings of at most 255 bytes, for a zone file.")
    zone_line: str


def _out(row: dict[str, Any]) -> SenderOut:
    url = mask_url(row["relay_url"])  # stored without its password; masked again all the same
    relay = parse_relay_url(row["relay_url"])
    dkim = None
    if row["dkim_selector"] and row["dkim_public_key"]:
        try:
            der = base64.b64decode(row["dkim_public_key"], validate=True)
        except (binascii.Error, ValueError):
            der = b""
        domain = row["from_email"].rsplit("@", 1)[1]
        dkim = SenderDkim(
            selector=row["dkim_selector"],
            fingerprint=dkim_fingerprint(der),
            public_key=row["dkim_public_key"],
            record_name=f"{row['dkim_selector']}._domainkey.{domain}",
        )
    return SenderOut(
        name=row["name"],
        from_email=row["from_email"],
        from_name=row["from_name"],
        relay=SenderRelay(
            url=url,
            host=relay.host,
            port=relay.port,
            tls=relay.tls,
            direct=relay.direct,
            username=relay.username,
            password_set=bool(row["relay_password_set"]),
            password_fingerprint=row["relay_fingerprint"],
        ),
        dkim=dkim,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _row(ctx: Ctx, name: str) -> dict[str, Any]:
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        sending.load_sender(conn, name)  # NotFoundError, as the CLI's, for a name not the tenant's
        row = cur.execute(q.SENDER, {"name": name}).fetchone()
    if row is None:  # deleted between the two statements
        raise NotFoundError(f"no sender named {name!r}")
    return row


@router.put(
    "/senders/{name}",
    response_model=SenderOut,
    status_code=200,
    responses={**responses(), 201: {"model": SenderOut, "description": "Created"}},
)
def put_sender(
    body: SenderRequest, request: Request, response: Response, name: str = SenderName, ctx: Ctx = require("infra:write")
) -> SenderOut:
    """Create the sender `name` (201), or replace it (200) - as `mailflow senders add`.

    A replacement takes every field again, secrets included: a sender saved without a relay
    password or a DKIM key has none from then on (the old ones leave the vault). The relay
    password and the DKIM private key are never shown again; the response says that they are
    set, with fingerprints. A DKIM key must be RSA (rsa-sha256); mailflow does not generate
    keys for senders (a sending domain's key signs for a sender without its own)."""
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        existed = cur.execute(q.SENDER, {"name": name}).fetchone() is not None
    dkim = body.dkim
    sender = Sender(
        name,
        body.from_email,
        body.from_name,
        body.relay_url,
        dkim.selector if dkim else None,
        dkim.private_key_pem if dkim else None,
    )
    sending.save_sender(ctx.store, sender, ctx.gate.vault)
    if not existed:
        response.status_code = 201
        response.headers["Location"] = f"/api/v1/senders/{name}"
    return _out(_row(ctx, name))


@router.get("/senders", response_model=Page[SenderOut], responses=responses())
def list_senders(
    ctx: Ctx = require("infra:read"), limit: int = LimitQuery, cursor: str | None = CursorQuery
) -> Page[SenderOut]:
    """The tenant's senders, by name (never a relay password or a DKIM private key)."""
    after = keyset(cursor, str)
    with ctx.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.SENDERS_PAGE, {"after": after[0] if after else None, "limit": limit + 1}).fetchall()
    items, next_cursor = page(rows, limit, lambda r: [r["name"]])
    return Page[SenderOut](items=[_out(r) for r in items], next_cursor=next_cursor)


@router.get("/senders/{name}", response_model=SenderOut, responses=responses(404))
def get_sender(name: str = SenderName, ctx: Ctx = require("infra:read")) -> SenderOut:
    """One sender: From identity, relay (without its password), whether secrets are set."""
    return _out(_row(ctx, name))


@router.get("/senders/{name}/dkim-record", response_model=SenderDkimRecord, responses=responses(404))
def get_dkim_record(name: str = SenderName, ctx: Ctx = require("infra:read")) -> SenderDkimRecord:
    """The DNS TXT record that publishes the sender's DKIM public key (422 for a sender
    without a DKIM key of its own) - as `mailflow senders dkim-record`."""
    with ctx.reading() as conn:
        rec = dkim_record(sending.load_sender(conn, name))
    return SenderDkimRecord(
        sender=name, name=rec.name, value=rec.value, strings=rec.strings(), zone_line=rec.zone_line()
    )


@router.delete("/senders/{name}", response_model=Deleted, responses=responses(404, 409))
def delete_sender(name: str = SenderName, ctx: Ctx = require("infra:write")) -> Deleted:
    """Delete a sender and its secrets; 409 while an unfinished campaign or an unsent job uses it."""
    sending.delete_sender(ctx.store, name)
    return Deleted()
