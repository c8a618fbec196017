"""Commands room: `mailflow messages` - mail received over SMTP: list, show, raw, headers, read."""

from __future__ import annotations

import sys
from typing import Any

import typer

from mailflow.commands.base import JsonOpt, emit_json, new_app, out, quiet_logs, runtime

app = new_app("Received messages: list, show, raw, headers, read and unread.")

Ref = typer.Argument(..., help="A message id, its first characters (as lists show), or its sha256.")


def verdict_line(row: dict[str, Any]) -> str:
    """SPF, DKIM, DMARC and the spam score in a few words (`-` where there is none)."""
    auth, spam = row.get("auth") or {}, row.get("spam") or {}
    dkim = ",".join(sorted({d.get("result", "?") for d in auth.get("dkim", [])})) or "none"
    score = "unscored" if spam.get("unscored") else f"{spam.get('score', 0):.1f}" if spam else "-"
    parts = [f"spf={auth.get('spf', '-')}", f"dkim={dkim}", f"dmarc={auth.get('dmarc', '-')}", f"spam={score}"]
    if row.get("defects"):
        parts.append("malformed")
    return " ".join(parts)


@app.command("list")
def messages_list(
    mailbox: str | None = typer.Option(None, "--mailbox", help="Only messages in this mailbox."),
    state: str | None = typer.Option(
        None, "--state", help="received, routed, quarantined or rejected.", show_default=False
    ),
    unread: bool = typer.Option(False, "--unread", help="Only messages not read yet."),
    limit: int = typer.Option(50, "--limit", "-n", min=1),
    as_json: bool = JsonOpt,
) -> None:
    """Received messages, newest first, with their verdicts."""
    from mailflow.inbound import mailbox as boxes

    quiet_logs()
    with runtime().connect() as conn:
        rows = boxes.messages(conn, mailbox=mailbox, state=state, unread=unread, limit=limit)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        mark = "*" if r["unread"] else " "
        where = ", ".join(r["mailboxes"]) or r["state"]
        out.print(f"{mark}{str(r['id'])[:8]}  {r['received_at']:%m-%d %H:%M}  {r['size']:>9,} B  {where}", markup=False)
        out.print(f"           {verdict_line(r)}", markup=False)


@app.command("show")
def messages_show(ref: str = Ref, as_json: bool = JsonOpt) -> None:
    """One message: envelope, verdicts, where it went, read or not."""
    from mailflow.inbound import mailbox as boxes

    quiet_logs()
    with runtime().connect() as conn:
        row = boxes.message(conn, ref)
    if as_json:
        emit_json(row)
        return
    out.print(f"message   {row['id']}  ({row['state']})", markup=False)
    out.print(f"received  {row['received_at']:%Y-%m-%d %H:%M:%S %Z}  {row['size']:,} bytes", markup=False)
    out.print(f"from      helo {row['helo'] or '-'}, {'TLS' if row['tls'] else 'no TLS'}", markup=False)
    out.print(f"to        {', '.join(row['recipients'])}", markup=False)
    out.print(f"verdicts  {verdict_line(row)}", markup=False)
    spam = row.get("spam") or {}
    if spam.get("rules"):
        out.print(f"rules     {', '.join(spam['rules'])}", markup=False)
    if row["defects"]:
        out.print(f"defects   {', '.join(row['defects'])}", markup=False)
    if row["reason"]:
        out.print(f"reason    {row['reason']}", markup=False)
    for d in row["routing"]:
        via = f" (route {d['route_id']})" if d.get("route_id") else ""
        out.print(f"routed    {d['recipient']} -> {d['action']} {d.get('target', '')}{via}", markup=False)
    for b in row["mailboxes"]:
        read = f"read {b['read_at']:%Y-%m-%d %H:%M}" if b["read_at"] else "unread"
        out.print(f"mailbox   {b['mailbox']}  {read}", markup=False)
    out.print(f"sha256    {row['sha256']}", markup=False)


@app.command("raw")
def messages_raw(ref: str = Ref) -> None:
    """Write the stored copy to stdout: mailflow's Authentication-Results, then the message as received."""
    from mailflow.inbound import mailbox as boxes

    quiet_logs()
    with runtime().connect() as conn:
        data = boxes.raw(conn, ref)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


@app.command("headers")
def messages_headers(ref: str = Ref, as_json: bool = JsonOpt) -> None:
    """The stored copy's headers (the body is not shown)."""
    from mailflow.inbound import defects
    from mailflow.inbound import mailbox as boxes

    quiet_logs()
    with runtime().connect() as conn:
        data = boxes.raw(conn, ref)
    block = defects.header_block(data)
    if as_json:
        emit_json([[k, str(v)] for k, v in defects.headers(block).items()])
        return
    sys.stdout.write(block.decode("utf-8", "replace").replace("\r\n", "\n"))
    sys.stdout.flush()


def _mark(ref: str, read: bool, mailbox: str | None, as_json: bool) -> None:
    from mailflow.inbound import mailbox as boxes

    quiet_logs()
    message_id = boxes.mark_read(runtime().store, ref, read=read, mailbox=mailbox)
    word = "read" if read else "unread"
    emit_json({"message": message_id, "read": read}) if as_json else out.print(f"{message_id[:8]} {word}", markup=False)


MailboxOpt = typer.Option(None, "--mailbox", help="Only in this mailbox (default: in every one it is in).")


@app.command("read")
def messages_read(ref: str = Ref, mailbox: str | None = MailboxOpt, as_json: bool = JsonOpt) -> None:
    """Mark a message read."""
    _mark(ref, True, mailbox, as_json)


@app.command("unread")
def messages_unread(ref: str = Ref, mailbox: str | None = MailboxOpt, as_json: bool = JsonOpt) -> None:
    """Mark a message unread."""
    _mark(ref, False, mailbox, as_json)
