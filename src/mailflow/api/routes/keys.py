"""API room, auth service: the tenant's own API keys (scope `admin`). A new key is in the
response once; it is stored only as a hash."""

from __future__ import annotations

from datetime import datetime

from pydantic import AwareDatetime, BaseModel, Field

from mailflow.api.auth import Ctx, require
from mailflow.api.models import Body
from mailflow.api.problems import responses
from mailflow.api.routing import service_router
from mailflow.errors import ConflictError
from mailflow.tenants import keys

router = service_router(tags=["keys"])


class KeyRequest(Body):
    name: str = Field(min_length=1, max_length=100)
    scopes: list[str] = Field(min_length=1, description=f"Any of: {', '.join(keys.SCOPES)}.")
    expires_at: AwareDatetime | None = None
    networks: list[str] = Field(default_factory=list, description="Allowed source networks (CIDR); empty: any.")


class KeyOut(BaseModel):
    id: str
    name: str
    scopes: list[str]
    networks: list[str]
    expires_at: datetime | None
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    state: str


class NewKey(KeyOut):
    key: str = Field(description="The key itself: shown this once, kept nowhere.")


class Revoked(BaseModel):
    id: str
    revoked: bool = Field(description="False if it already was.")


@router.get("/keys", response_model=list[KeyOut], responses=responses())
def list_keys(ctx: Ctx = require("admin")) -> list[KeyOut]:
    """The tenant's API keys (never the keys themselves)."""
    with ctx.reading() as conn:
        return [KeyOut.model_validate(k.to_dict()) for k in keys.listing(conn)]


@router.post("/keys", status_code=201, response_model=NewKey, responses=responses())
def create_key(body: KeyRequest, ctx: Ctx = require("admin")) -> NewKey:
    """A new key with the given scopes."""
    key, token = keys.create(
        ctx.store,
        body.name,
        body.scopes,
        expires_at=body.expires_at,
        networks=body.networks,
        created_by=ctx.principal.actor,
    )
    return NewKey.model_validate({**key.to_dict(), "key": token})


@router.delete("/keys/{key_id}", response_model=Revoked, responses=responses(404, 409))
def revoke_key(key_id: str, ctx: Ctx = require("admin")) -> Revoked:
    """Revoke a key; it is refused from the next request on. A key cannot revoke itself (that
    would lock the caller out): use another admin key, or `mailflow keys revoke`."""
    if key_id == ctx.principal.key_id:
        raise ConflictError("a key cannot revoke itself; use another admin key or `mailflow keys revoke`")
    revoked = keys.revoke(ctx.store, key_id, reason=f"revoked by {ctx.principal.actor}")
    ctx.gate.cache.forget(key_id)  # this process at once; the others when PostgreSQL's NOTIFY reaches them
    return Revoked(id=key_id, revoked=revoked)
