"""Commands room: `mailflow tenants` - create, list, show, suspend, resume and erase tenants, set their limits and tracking.

Operator commands: they see every tenant (the cross-tenant role), whatever --tenant says.
"""

from __future__ import annotations

import typer

from mailflow.commands.base import JsonOpt, emit_json, err, new_app, out, quiet_logs, runtime

app = new_app("Tenants: create, list, show, suspend, resume, erase, limits, tracking.")


def _limit(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


@app.command("create")
def tenants_create(
    tenant_id: str = typer.Argument(..., metavar="ID", help="1 to 40 of a-z, 0-9 and '-'."),
    name: str | None = typer.Option(None, "--name", help="Display name (default: the id)."),
    as_json: bool = JsonOpt,
) -> None:
    """Create a tenant; act on it with --tenant ID or MAILFLOW_TENANT=ID."""
    from mailflow.tenants import registry

    quiet_logs()
    registry.create(runtime(operator=True).store, tenant_id, name)
    if as_json:
        emit_json({"created": tenant_id})
    else:
        out.print(f"created tenant {tenant_id}; use it with --tenant {tenant_id} or MAILFLOW_TENANT={tenant_id}")


@app.command("list")
def tenants_list(as_json: bool = JsonOpt) -> None:
    """Every tenant with its status, limits and size."""
    from mailflow.tenants import registry

    quiet_logs()
    with runtime(operator=True).connect() as conn:
        rows = registry.listing(conn)
    if as_json:
        emit_json([t.to_dict() for t in rows])
        return
    out.print(f"{'tenant':<20} {'status':<10} {'per hour':>9} {'per day':>9} {'contacts':>9} {'unsent':>7}")
    for t in rows:
        out.print(
            f"{t.id:<20} {t.status:<10} {_limit(t.hourly_limit):>9} {_limit(t.daily_limit):>9} "
            f"{t.contacts:>9,} {t.unfinished_jobs:>7,}",
            markup=False,
        )


@app.command("show")
def tenants_show(tenant_id: str = typer.Argument(..., metavar="ID"), as_json: bool = JsonOpt) -> None:
    """One tenant."""
    from mailflow.tenants import registry

    quiet_logs()
    with runtime(operator=True).connect() as conn:
        t = registry.show(conn, tenant_id)
    if as_json:
        emit_json(t.to_dict())
        return
    out.print(f"tenant {t.id} ({t.name}): {t.status}", markup=False)
    out.print(f"  limits: {_limit(t.hourly_limit)} per hour, {_limit(t.daily_limit)} per day")
    out.print(f"  tracking: {'on' if t.tracking else 'off'} (campaigns' default)")
    out.print(f"  {t.contacts:,} contacts, {t.campaigns:,} campaigns, {t.unfinished_jobs:,} unsent jobs")
    out.print(f"  created {t.created_at:%Y-%m-%d %H:%M:%S}")


@app.command("suspend")
def tenants_suspend(
    tenant_id: str = typer.Argument(..., metavar="ID"),
    reason: str = typer.Option("", "--reason", help="Why (kept in the event)."),
    as_json: bool = JsonOpt,
) -> None:
    """Refuse the tenant's changes and stop queuing its mail (mail being sent finishes)."""
    from mailflow.tenants import registry

    quiet_logs()
    changed = registry.suspend(runtime(operator=True).store, tenant_id, reason)
    if as_json:
        emit_json({"tenant": tenant_id, "status": "suspended", "changed": changed})
    else:
        out.print(f"suspended {tenant_id}" if changed else f"{tenant_id} was suspended already")


@app.command("resume")
def tenants_resume(tenant_id: str = typer.Argument(..., metavar="ID"), as_json: bool = JsonOpt) -> None:
    """Lift a suspension."""
    from mailflow.tenants import registry

    quiet_logs()
    changed = registry.resume(runtime(operator=True).store, tenant_id)
    if as_json:
        emit_json({"tenant": tenant_id, "status": "active", "changed": changed})
    else:
        out.print(f"resumed {tenant_id}" if changed else f"{tenant_id} was not suspended")


@app.command("erase")
def tenants_erase(
    tenant_id: str = typer.Argument(..., metavar="ID"),
    yes: bool = typer.Option(False, "--yes", help="Do not ask (required when not on a terminal)."),
    as_json: bool = JsonOpt,
) -> None:
    """Erase a suspended tenant's people and secrets for good (its counts stay); interrupted,
    run it again and it goes on."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mailflow.commands.contacts import acting_user, confirm_or_yes
    from mailflow.outbound import contacts
    from mailflow.tenants import registry

    quiet_logs()
    store = runtime(operator=True).store
    registry.refuse_unless_suspended(store, tenant_id)
    confirm_or_yes(f"erase every person and secret of tenant {tenant_id}", yes)
    scoped = store.for_tenant(tenant_id)
    if as_json:
        people = contacts.erase_everyone(scoped, actor=acting_user())
    else:
        with Progress(TextColumn("erasing"), BarColumn(), MofNCompleteColumn(), console=err) as bar:
            task = bar.add_task("erase", total=None)
            people = contacts.erase_everyone(
                scoped, actor=acting_user(), progress=lambda n, total: bar.update(task, completed=n, total=total)
            )
    registry.mark_erased(store, tenant_id, people)
    if as_json:
        emit_json({"tenant": tenant_id, "status": "erased", "people": people})
    else:
        out.print(f"erased tenant {tenant_id}: {people:,} person(s) and every secret; its counts are kept")


@app.command("limits")
def tenants_limits(
    tenant_id: str = typer.Argument(..., metavar="ID"),
    per_hour: int | None = typer.Option(None, "--per-hour", min=1, help="Messages per hour (omit: no limit)."),
    per_day: int | None = typer.Option(None, "--per-day", min=1, help="Messages per day (omit: no limit)."),
    as_json: bool = JsonOpt,
) -> None:
    """Set how many messages the tenant may send; reaching a limit holds its campaign and
    low-priority mail (transactional mail still goes)."""
    from mailflow.tenants import registry

    quiet_logs()
    registry.set_limits(runtime(operator=True).store, tenant_id, hourly=per_hour, daily=per_day)
    if as_json:
        emit_json({"tenant": tenant_id, "hourly_limit": per_hour, "daily_limit": per_day})
    else:
        out.print(f"{tenant_id}: {_limit(per_hour)} per hour, {_limit(per_day)} per day")


@app.command("tracking")
def tenants_tracking(
    tenant_id: str = typer.Argument(..., metavar="ID"),
    state: str = typer.Argument(..., metavar="on|off", help="Whether its campaigns track opens and clicks."),
    as_json: bool = JsonOpt,
) -> None:
    """Set whether the tenant's campaigns track opens and clicks unless a campaign says otherwise
    (`campaigns create --track/--no-track`); transactional mail is never tracked. docs/tracking.md."""
    from mailflow.errors import UsageError
    from mailflow.tenants import registry

    quiet_logs()
    if state not in ("on", "off"):
        raise UsageError(f"tracking is on or off, not {state!r}")
    changed = registry.set_tracking(runtime(operator=True).store, tenant_id, state == "on")
    if as_json:
        emit_json({"tenant": tenant_id, "tracking": state == "on", "changed": changed})
    else:
        out.print(f"{tenant_id}: tracking {state}" + ("" if changed else " (it already was)"))
