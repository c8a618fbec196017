"""Commands room: `mailflow suppressions` - suppressed addresses: never sent to."""

from __future__ import annotations

import typer

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    new_app,
    out,
    quiet_logs,
    runtime,
)

app = new_app("Suppressed addresses: never sent to.")


@app.command("list")
def suppressions_list(limit: int = typer.Option(1000, "--limit", min=1), as_json: bool = JsonOpt) -> None:
    """Suppressed addresses, newest first."""
    from mailflow.outbound import suppressions

    quiet_logs()
    with runtime().connect() as conn:
        rows = suppressions.listing(conn, limit)
    if as_json:
        emit_json([{**r.__dict__, "created_at": r.created_at.isoformat()} for r in rows])
    else:
        for r in rows:
            who = r.email or f"(erased {r.subject[:12]})"
            out.print(f"{who:<40} {r.reason:<12} {r.detail}", markup=False)


@app.command("add")
def suppressions_add(
    email: str = typer.Argument(...),
    reason: str = typer.Option("manual", "--reason"),
    detail: str = typer.Option("", "--detail"),
    as_json: bool = JsonOpt,
) -> None:
    """Never send to EMAIL again (until removed)."""
    from mailflow.outbound import suppressions

    quiet_logs()
    email = suppressions.add(runtime().store, email, reason, detail)
    emit_json({"suppressed": email, "reason": reason}) if as_json else out.print(f"suppressed {email}")


@app.command("remove")
def suppressions_remove(email: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Lift a suppression. A bounced, complained or unsubscribed contact stays so: nothing is
    sent to it until `mailflow contacts reactivate`."""
    from mailflow.outbound import suppressions

    quiet_logs()
    r = suppressions.remove(runtime().store, email)
    if as_json:
        emit_json({"unsuppressed": r.email, "contact_status": r.contact_status, "still_stopped": r.still_stopped})
        return
    out.print(f"no longer suppressed: {r.email}", markup=False)
    if r.still_stopped:
        out.print(
            f"the contact is still {r.contact_status}, so nothing is sent to it; to mail it again run "
            f"`mailflow contacts reactivate {r.email} --reason ...`",
            markup=False,
        )
