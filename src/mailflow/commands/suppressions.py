"""Commands room: `mailflow suppressions` - suppressed addresses: never sent to."""

from __future__ import annotations


import typer

from mailflow.commands.base import (
    new_app,
    JsonOpt, emit_json, out, quiet_logs, runtime,
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
            out.print(f"{r.email:<40} {r.reason:<12} {r.detail}", markup=False)


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
    """Lift a suppression."""
    from mailflow.outbound import suppressions

    quiet_logs()
    email = suppressions.remove(runtime().store, email)
    emit_json({"unsuppressed": email}) if as_json else out.print(f"no longer suppressed: {email}")
