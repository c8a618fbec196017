"""Commands room: `mailflow keys` - the tenant's API keys: create (the key is shown once),
list, show, revoke, and the use and failure counts the API keeps."""

from __future__ import annotations

import typer

from mailflow.commands.base import JsonOpt, emit_json, iso, new_app, out, parse_until, quiet_logs, runtime

app = new_app("API keys: bearer keys for the HTTP API, with scopes.")


@app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="What the key is for (shown in listings)."),
    scopes: str = typer.Option(
        ..., "--scopes", metavar="SCOPES", help="Comma-separated (`mailflow keys scopes` lists them), or admin."
    ),
    expires: str | None = typer.Option(
        None, "--expires", metavar="WHEN", help="Expiry: a date or time (2027-01-31), or from now (30d, 12h)."
    ),
    networks: str = typer.Option(
        "", "--networks", metavar="CIDRS", help="Comma-separated source networks the key may be used from."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Create a key. It is printed this once; mailflow keeps only its hash."""
    from mailflow.tenants import keys

    quiet_logs()
    key, token = keys.create(
        runtime().store,
        name,
        scopes.split(","),
        expires_at=parse_until(expires, "--expires") if expires else None,
        networks=[n for n in networks.split(",") if n.strip()],
    )
    if as_json:
        emit_json({**key.to_dict(), "key": token})
        return
    out.print(f"key {key.id} ({key.name}): {', '.join(key.scopes)}", markup=False)
    out.print(f"the key (shown once, keep it): {token}", markup=False)


@app.command("list")
def keys_list(as_json: bool = JsonOpt) -> None:
    """The tenant's keys: id, state, scopes, last use (never the keys themselves)."""
    from mailflow.tenants import keys

    quiet_logs()
    with runtime().connect() as conn:
        found = keys.listing(conn)
    if as_json:
        emit_json([k.to_dict() for k in found])
        return
    if not found:
        out.print("no API keys (create one with `mailflow keys create NAME --scopes ...`)")
    for k in found:
        used = iso(k.last_used_at) if k.last_used_at else "never used"
        out.print(f"{k.id}  {k.state:<7}  {k.name[:24]:<24}  {used}", markup=False)
        out.print(f"    {', '.join(k.scopes)}", markup=False)


@app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., metavar="ID"), as_json: bool = JsonOpt) -> None:
    """Revoke a key: it is refused from the next request on."""
    from mailflow.tenants import keys

    quiet_logs()
    revoked = keys.revoke(runtime().store, key_id, reason="revoked with mailflow keys revoke")
    if as_json:
        emit_json({"id": key_id, "revoked": revoked})
    else:
        out.print(f"revoked key {key_id}" if revoked else f"key {key_id} was revoked already", markup=False)


@app.command("scopes")
def keys_scopes(as_json: bool = JsonOpt) -> None:
    """The scopes a key can have."""
    from mailflow.tenants import keys

    if as_json:
        emit_json(keys.SCOPES)
        return
    for scope, what in keys.SCOPES.items():
        out.print(f"{scope:<16} {what}", markup=False)
