"""Commands room: `mailflow webhooks` - a tenant's webhook endpoints for classified inbound mail:
add (the secret is shown once), list, test, deliveries, disable, enable, remove, and `deliver`,
the long-running deliverer (which `mailflow inbound` also runs beside its SMTP server)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import typer

from mailflow.commands.base import JsonOpt, emit_json, iso, new_app, out, quiet_logs, run_process, runtime, settings

if TYPE_CHECKING:
    from mailflow.inbound.webhooks import Endpoint

app = new_app("Webhook endpoints: classified inbound mail POSTed to URLs, signed per Standard Webhooks.")


@app.command("add")
def webhooks_add(
    url: str = typer.Argument(..., help="An http:// or https:// URL (not a loopback, private or link-local one)."),
    events: str = typer.Option(
        ...,
        "--events",
        metavar="KINDS",
        help="Comma-separated: bounce, delayed, complaint, auto_reply, unsubscribe, reply, other; or all.",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Add an endpoint. Its signing secret (whsec_...) is printed this once: give it to the
    receiver, which verifies the webhook-signature header with it. mailflow shows it never again."""
    from mailflow.inbound import webhooks

    quiet_logs()
    rt = runtime()
    kinds = webhooks.parse_kinds(events)
    found, secret = webhooks.add_endpoint(rt.store, rt.vault, webhooks.guard_for(settings()), url, kinds)
    if as_json:
        emit_json({**found.to_dict(), "secret": secret})
        return
    out.print(f"webhook {found.id}: {found.url} <- {', '.join(found.events)}", markup=False)
    out.print(f"secret (shown once, keep it): {secret}", markup=False)


@app.command("list")
def webhooks_list(as_json: bool = JsonOpt) -> None:
    """The tenant's endpoints: URL, events, status (and why disabled), failure streak."""
    from mailflow.inbound import webhooks

    quiet_logs()
    with runtime().connect() as conn:
        found = webhooks.endpoints(conn)
    if as_json:
        emit_json([e.to_dict() for e in found])
        return
    for e in found:
        out.print(_line(e), markup=False)


def _line(e: Endpoint) -> str:
    state = e.status if e.status == "active" else f"disabled ({e.disabled_reason})"
    streak = f", {e.failure_streak} failed in a row" if e.failure_streak else ""
    return f"{e.id:<8}  {state}{streak}  {e.url}  <- {','.join(e.events)}"


@app.command("test")
def webhooks_test(endpoint_id: str = typer.Argument(..., metavar="ID"), as_json: bool = JsonOpt) -> None:
    """POST a signed `webhook.test` to the endpoint now and print the answer (recorded as an
    attempt; it changes neither the endpoint's status nor its failure streak). Exit code 1
    when it was not answered 2xx."""
    from mailflow.inbound import webhooks

    quiet_logs()
    rt = runtime()
    answer = webhooks.send_test(rt.store, rt.vault, webhooks.http_for(settings(), max_connections=1), endpoint_id)
    if as_json:
        emit_json(answer.to_dict())
    else:
        took = f" in {answer.duration_ms} ms" if answer.duration_ms is not None else ""
        what = answer.error or f"HTTP {answer.status}"
        out.print(f"webhook {answer.endpoint_id}: {answer.outcome}: {what}{took}", markup=False)
    if answer.outcome != "done":
        raise typer.Exit(1)


@app.command("deliveries")
def webhooks_deliveries(
    endpoint_id: str | None = typer.Argument(None, metavar="[ID]", help="Only this endpoint's."),
    limit: int = typer.Option(50, "--limit", "-n", min=1, max=10_000, help="At most this many, newest first."),
    as_json: bool = JsonOpt,
) -> None:
    """Every attempt, newest first: when, the endpoint, the delivery, the status or error."""
    from mailflow.inbound import webhooks

    quiet_logs()
    with runtime().connect() as conn:
        rows = webhooks.attempts(conn, endpoint_id, limit)
    if as_json:
        emit_json([{k: iso(v) for k, v in r.items()} for r in rows])
        return
    for r in rows:
        answer = r["error"] or f"HTTP {r['status']}"
        took = f" {r['duration_ms']} ms" if r["duration_ms"] is not None else ""
        out.print(
            f"{r['at']:%Y-%m-%d %H:%M:%S}  {r['endpoint_id']:<8}  {r['delivery_id'][:8]}  #{r['attempt']:<2}  "
            f"{r['type']:<20}  {r['outcome']:<5}  {answer}{took}",
            markup=False,
        )


@app.command("disable")
def webhooks_disable(endpoint_id: str = typer.Argument(..., metavar="ID"), as_json: bool = JsonOpt) -> None:
    """Stop delivering to the endpoint; its pending deliveries are cancelled."""
    from mailflow.inbound import webhooks

    quiet_logs()
    found = webhooks.disable_endpoint(runtime().store, endpoint_id)
    emit_json(found.to_dict()) if as_json else out.print(_line(found), markup=False)


@app.command("enable")
def webhooks_enable(endpoint_id: str = typer.Argument(..., metavar="ID"), as_json: bool = JsonOpt) -> None:
    """Deliver to the endpoint again: the events classified from now on."""
    from mailflow.inbound import webhooks

    quiet_logs()
    found = webhooks.enable_endpoint(runtime().store, endpoint_id)
    emit_json(found.to_dict()) if as_json else out.print(_line(found), markup=False)


@app.command("remove")
def webhooks_remove(endpoint_id: str = typer.Argument(..., metavar="ID"), as_json: bool = JsonOpt) -> None:
    """Remove the endpoint, its deliveries and its secret."""
    from mailflow.inbound import webhooks

    quiet_logs()
    rt = runtime()
    webhooks.remove_endpoint(rt.store, rt.vault, endpoint_id)
    ref = endpoint_id.strip().lower()
    emit_json({"removed": ref}) if as_json else out.print(f"removed webhook {ref}", markup=False)


@app.command("deliver")
def webhooks_deliver() -> None:
    """Long-running: deliver due webhooks of every tenant (what `mailflow inbound` does beside
    its SMTP server), until SIGTERM."""
    from mailflow.inbound import webhooks

    s = settings()

    def body(rt, stop, health) -> None:
        async def deliver() -> None:
            halt = asyncio.Event()
            task = asyncio.create_task(webhooks.run(rt.store, halt, vault=rt.vault, http=webhooks.http_for(s)))
            while not stop.is_set() and not task.done():
                health.beat()
                await asyncio.sleep(0.2)
            halt.set()
            await task

        asyncio.run(deliver())

    run_process("webhooks", None, body, pool_size=3)
