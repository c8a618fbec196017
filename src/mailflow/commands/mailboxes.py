"""Commands room: `mailflow mailboxes` - addresses that keep the mail they receive."""

from __future__ import annotations

import typer

from mailflow.commands.base import JsonOpt, emit_json, iso, new_app, out, quiet_logs, runtime

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


@app.command("show")
def mailboxes_show(
    address: str = typer.Argument(...),
    latest: int = typer.Option(5, "--latest", "-n", min=0, max=1000, help="How many of the latest messages."),
    as_json: bool = JsonOpt,
) -> None:
    """One mailbox: its name, how many messages it has (and unread), the routes that deliver
    to it, and its latest messages."""
    from mailflow.inbound import directory

    quiet_logs()
    with runtime().connect() as conn:
        row = directory.mailbox_details(conn, address, latest=latest)
    if as_json:
        emit_json(
            {
                "address": row["address"],
                "name": row["name"],
                "created_at": iso(row["created_at"]),
                "messages": row["messages"],
                "unread": row["unread"],
                "routes": [r.to_dict() for r in row["routes"]],
                "latest": [
                    {**m, "id": str(m["id"]), "received_at": iso(m["received_at"]), "read_at": iso(m["read_at"])}
                    for m in row["latest"]
                ],
            }
        )
        return
    out.print(f"mailbox   {row['address']}", markup=False)
    if row["name"]:
        out.print(f"name      {row['name']}", markup=False)
    out.print(f"created   {row['created_at']:%Y-%m-%d %H:%M}", markup=False)
    out.print(f"messages  {row['messages']} ({row['unread']} unread)", markup=False)
    for r in row["routes"]:
        out.print(f"route     {r.id}  {r.pattern} (priority {r.priority})", markup=False)
    for m in row["latest"]:
        read = "read  " if m["read_at"] else "unread"
        out.print(
            f"message   {str(m['id'])[:8]}  {m['received_at']:%Y-%m-%d %H:%M}  {read}  {m['recipient']}", markup=False
        )
