"""Commands room: `mailflow quarantine` - messages held for their spam score, and the thresholds."""

from __future__ import annotations

import typer

from mailflow.commands.base import JsonOpt, emit_json, new_app, out, quiet_logs, runtime
from mailflow.commands.messages import Ref, verdict_line

app = new_app("Quarantine: messages held for their spam score; release, drop, thresholds.")


@app.command("list")
def quarantine_list(limit: int = typer.Option(50, "--limit", "-n", min=1), as_json: bool = JsonOpt) -> None:
    """Held messages, newest first, with why."""
    from mailflow.inbound import mailbox as boxes

    quiet_logs()
    with runtime().connect() as conn:
        rows = boxes.messages(conn, state="quarantined", limit=limit)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        out.print(f"{str(r['id'])[:8]}  {r['received_at']:%m-%d %H:%M}  {', '.join(r['recipients'])}", markup=False)
        out.print(f"          {r['reason']}; {verdict_line(r)}", markup=False)
    if not rows:
        out.print("nothing in quarantine", markup=False)


@app.command("release")
def quarantine_release(ref: str = Ref, as_json: bool = JsonOpt) -> None:
    """Deliver a held message where the routes send it now."""
    from mailflow.inbound import mailbox as boxes

    quiet_logs()
    rt = runtime()
    message_id = boxes.release(rt.store, ref, boxes.route_again(rt.keyring.verifying_keys))
    if as_json:
        emit_json({"released": message_id})
    else:
        out.print(f"released {message_id[:8]}", markup=False)


@app.command("drop")
def quarantine_drop(ref: str = Ref, as_json: bool = JsonOpt) -> None:
    """Refuse a held message for good (recorded; its raw copy is deleted)."""
    from mailflow.inbound import mailbox as boxes

    quiet_logs()
    message_id = boxes.drop(runtime().store, ref)
    emit_json({"dropped": message_id}) if as_json else out.print(f"dropped {message_id[:8]}", markup=False)


@app.command("thresholds")
def quarantine_thresholds(
    quarantine: float | None = typer.Option(None, "--quarantine", help="Hold mail scoring at least this."),
    reject: float | None = typer.Option(None, "--reject", help="Refuse mail scoring at least this (550 at DATA)."),
    as_json: bool = JsonOpt,
) -> None:
    """Show the tenant's spam thresholds, or set them (SpamAssassin's scale; defaults 5 and 15)."""
    from mailflow.inbound import mailbox as boxes

    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        now = boxes.thresholds(conn)
    if quarantine is not None or reject is not None:
        q = now.quarantine if quarantine is None else quarantine
        now = boxes.set_thresholds(rt.store, quarantine=q, reject=now.reject if reject is None else reject)
    if as_json:
        emit_json({"quarantine": now.quarantine, "reject": now.reject})
    else:
        out.print(f"quarantine at {now.quarantine:g}, reject at {now.reject:g}", markup=False)
