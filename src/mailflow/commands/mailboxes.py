"""Commands room: `mailflow mailboxes` - addresses that keep the mail they receive."""

from __future__ import annotations

import typer

from mailflow.commands.base import JsonOpt, emit_json, new_app, out, quiet_logs, runtime

app = new_app("Mailboxes: addresses that keep the mail they receive.")


@app.command("add")
def mailboxes_add(
    address: str = typer.Argument(...),
    name: str = typer.Option("", "--name", help="A display name."),
    as_json: bool = JsonOpt,
) -> None:
    """A mailbox at one of the tenant's inbound domains (mail to ADDRESS+tag lands in it too)."""
    from mailflow.inbound import directory

    quiet_logs()
    added = directory.add_mailbox(runtime().store, address, name)
    emit_json({"mailbox": added}) if as_json else out.print(f"mailbox {added}", markup=False)


@app.command("remove")
def mailboxes_remove(address: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Remove a mailbox (its messages stay)."""
    from mailflow.inbound import directory

    quiet_logs()
    directory.remove_mailbox(runtime().store, address)
    emit_json({"removed": address}) if as_json else out.print(f"removed mailbox {address}", markup=False)


@app.command("list")
def mailboxes_list(as_json: bool = JsonOpt) -> None:
    """The tenant's mailboxes, with how many messages each received."""
    from mailflow.inbound import directory

    quiet_logs()
    with runtime().connect() as conn:
        rows = directory.mailboxes(conn)
    if as_json:
        emit_json([{**r, "created_at": r["created_at"].isoformat()} for r in rows])
        return
    for r in rows:
        out.print(f"{r['address']:<50} {r['messages']:>7} message(s)  {r['name']}", markup=False)
