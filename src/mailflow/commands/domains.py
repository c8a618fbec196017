"""Commands room: `mailflow domains` - the domains a tenant receives mail for."""

from __future__ import annotations

import typer

from mailflow.commands.base import JsonOpt, emit_json, new_app, out, quiet_logs, runtime

app = new_app("Inbound domains: the domains mailflow receives mail for.")


@app.command("add")
def domains_add(domain: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Receive mail for DOMAIN (publish an MX record pointing at this server)."""
    from mailflow.inbound import directory

    quiet_logs()
    name, created = directory.add_domain(runtime().store, domain)
    if as_json:
        emit_json({"domain": name, "created": created})
    else:
        out.print(f"receiving mail for {name}" if created else f"{name} was added already", markup=False)


@app.command("remove")
def domains_remove(domain: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Stop receiving mail for DOMAIN."""
    from mailflow.inbound import directory

    quiet_logs()
    directory.remove_domain(runtime().store, domain)
    emit_json({"removed": domain}) if as_json else out.print(f"no longer receiving mail for {domain}", markup=False)


@app.command("list")
def domains_list(as_json: bool = JsonOpt) -> None:
    """The tenant's inbound domains."""
    from mailflow.inbound import directory

    quiet_logs()
    with runtime().connect() as conn:
        rows = directory.domains(conn)
    if as_json:
        emit_json([{**r, "created_at": r["created_at"].isoformat()} for r in rows])
        return
    for r in rows:
        out.print(f"{r['domain']:<50} {r['mailboxes']:>5} mailbox(es)", markup=False)
