"""Commands room: `mailflow routes` - where mail to a tenant's inbound domains goes when no
mailbox takes it: add, list, remove, and test which route would take an address."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from mailflow.commands.base import JsonOpt, emit_json, new_app, out, quiet_logs, runtime
from mailflow.errors import UsageError

if TYPE_CHECKING:
    from mailflow.inbound.policy import Decision
    from mailflow.inbound.routes import Route, RouteMatch

app = new_app("Routes: where mail to the tenant's domains goes when no mailbox takes it.")

WIDTH = 80
INDENT = " " * 18  # under the pattern column of `routes list`


@app.command("add")
def routes_add(
    pattern: str = typer.Argument(
        ..., help="help@example.org, help+*@example.org, *@example.org or a /regex/ (named groups are captured)."
    ),
    mailbox: str | None = typer.Option(None, "--mailbox", metavar="ADDRESS", help="Deliver to this mailbox."),
    forward: str | None = typer.Option(None, "--forward", metavar="ADDRESS", help="Forward over SMTP."),
    http: str | None = typer.Option(None, "--http", metavar="URL", help="POST it to this URL."),
    reject: bool = typer.Option(False, "--reject", help="Refuse it at RCPT TO when it can: 550 5.7.1 REASON."),
    reason: str | None = typer.Option(None, "--reason", metavar="TEXT", help="The reply text of --reject."),
    drop: bool = typer.Option(False, "--drop", help="Accept it and throw it away."),
    headers: list[str] = typer.Option(
        [], "--header", metavar="'NAME: REGEX'", help="Only when this header matches (repeatable; all must)."
    ),
    priority: int | None = typer.Option(None, "--priority", help="Lower is tried first (default 100)."),
    continue_: bool = typer.Option(False, "--continue", help="Try the routes after this one too."),
    as_json: bool = JsonOpt,
) -> None:
    """Add a route (routes are tried by priority, then in the order they were added)."""
    from mailflow.inbound import routes

    chosen = [
        (a, t)
        for a, t in (
            (routes.Action.MAILBOX, mailbox),
            (routes.Action.FORWARD, forward),
            (routes.Action.HTTP, http),
            (routes.Action.REJECT, (reason or "") if reject else None),
            (routes.Action.DROP, "" if drop else None),
        )
        if t is not None
    ]
    if len(chosen) != 1:
        raise UsageError("give the route one action: --mailbox, --forward, --http, --reject or --drop")
    if reason is not None and not reject:
        raise UsageError("--reason is the reply text of --reject")
    quiet_logs()
    [(action, target)] = chosen
    route = routes.add_route(
        runtime().store, pattern, action, target, headers=headers, priority=priority, continue_matching=continue_
    )
    if as_json:
        emit_json(route.to_dict())
        return
    out.print(f"route {route.id}: {route.pattern} -> {route.describe()}", markup=False)


@app.command("list")
def routes_list(as_json: bool = JsonOpt) -> None:
    """The tenant's routes, in the order they are tried."""
    from mailflow.inbound import routes

    quiet_logs()
    with runtime().connect() as conn:
        found = routes.routes(conn)
    if as_json:
        emit_json([r.to_dict() for r in found])
        return
    for r in found:
        for line in _lines(r):
            out.print(line, markup=False)


def _lines(route: Route) -> list[str]:
    """One route in at most 80 columns where its parts allow: the action goes on a line of
    its own when it does not fit beside the pattern (less indented if it must), each header
    condition below. A value longer than that is printed whole, so that it can be copied."""
    head = f"{route.id:<8}  {route.priority:>6}  {route.pattern}"
    action = f"-> {route.describe()}" + ("  (continue)" if route.continue_matching else "")
    if len(head) + 2 + len(action) <= WIDTH:
        lines = [f"{head}  {action}"]
    else:
        lines = [head, (INDENT if len(INDENT) + len(action) <= WIDTH else "    ") + action]
    lines += [f"{INDENT}if {name}: /{regex}/" for name, regex in route.headers]
    return lines


@app.command("remove")
def routes_remove(route_id: str = typer.Argument(..., metavar="ID"), as_json: bool = JsonOpt) -> None:
    """Remove a route."""
    from mailflow.inbound import routes

    quiet_logs()
    routes.remove_route(runtime().store, route_id)
    emit_json({"removed": route_id}) if as_json else out.print(f"removed route {route_id}", markup=False)


@app.command("test")
def routes_test(
    address: str = typer.Argument(...),
    headers: list[str] = typer.Option(
        [], "--header", metavar="'NAME: VALUE'", help="A header of the message (repeatable)."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """What the server would do with mail to ADDRESS, and which routes would take it.

    Decided as the server decides RCPT TO (refused and with which reply, a mailbox, a bounce,
    a reply, or routes); for routes, the ones that take it given these headers, and what they
    capture."""
    from mailflow.inbound import directory, policy, routes
    from mailflow.inbound.policy import Kind
    from mailflow.mail import tokens

    quiet_logs()
    given = [routes.split_header(h) for h in headers]
    rt = runtime()
    with rt.connect() as conn:
        snapshot = directory.load(conn)  # this tenant's: what the server decides for its addresses

    def verp_job(candidate: str) -> str | None:
        try:
            return tokens.job_from_verp(rt.keyring.verifying_keys, candidate)
        except tokens.BadToken:
            return None

    decision = policy.decide(address, snapshot, verp_job)
    taken = (
        routes.match(snapshot.routes_for(decision.address), decision.address, given)
        if decision.kind is Kind.ROUTE
        else []
    )
    refused = taken[0].route if len(taken) == 1 and taken[0].route.action is routes.Action.REJECT else None
    if as_json:
        emit_json(
            {
                "address": decision.address,
                "accepted": decision.accepted,
                "kind": str(decision.kind),
                "reply": decision.reply,
                "tenants": list(decision.tenants),
                "job_id": decision.job_id,
                "route_id": decision.route_id,
                "routes": [{**m.route.to_dict(), "captures": m.captures} for m in taken],
                "refused_after_data": refused.reply if refused is not None else None,
            }
        )
        return
    for line in _verdict(decision, taken, bool(given)):
        out.print(line, markup=False)


def _verdict(decision: Decision, taken: list[RouteMatch], with_headers: bool) -> list[str]:
    from mailflow.inbound.policy import Kind
    from mailflow.inbound.routes import Action

    if not decision.accepted:
        by = f" (route {decision.route_id})" if decision.route_id else ""
        return [f"{decision.address}: refused at RCPT TO{by}: {decision.reply}"]
    if decision.kind is Kind.MAILBOX:
        return [f"{decision.address}: accepted for a mailbox (mailboxes keep their mail before any route)"]
    if decision.kind is Kind.BOUNCE:
        return [f"{decision.address}: accepted if mailflow has job {decision.job_id} (a bounce of its message)"]
    if decision.kind is Kind.REPLY:
        return [f"{decision.address}: accepted as a reply to the sender {decision.address}"]
    lines = [f"{decision.address}: accepted at RCPT TO (route {decision.route_id})"]
    headers = "these headers" if with_headers else "no headers"
    if not taken:
        return [*lines, f"with {headers}, no route takes it after DATA (their header conditions do not match)"]
    first = taken[0]
    if first.route.action is Action.REJECT:  # a reject is only ever taken alone
        return [*lines, f"with {headers}, refused after DATA (route {first.route.id}): {first.route.reply}"]
    lines.append(f"with {headers}, after DATA:")
    for m in taken:
        captures = " ".join(f"{k}={v}" for k, v in sorted(m.captures.items()))
        lines.append(f"  {m.route.id:<8}  -> {m.route.describe()}" + (f"  [{captures}]" if captures else ""))
    return lines


@app.command("secret")
def routes_secret(
    rotate: bool = typer.Option(False, "--rotate", help="Replace it with a new one (the old one stops working)."),
    as_json: bool = JsonOpt,
) -> None:
    """The secret the tenant's --http routes sign their POSTs with (Standard Webhooks: verify
    the webhook-signature header with it). Made on first use; kept encrypted in the vault."""
    from mailflow.inbound import actions

    quiet_logs()
    rt = runtime()
    assert rt.store.tenant is not None  # a command's runtime acts for one tenant
    with rt.connect() as conn:
        secret = actions.webhook_secret(conn, rt.vault, rt.store.tenant, rotate=rotate)
    emit_json({"secret": secret, "rotated": rotate}) if as_json else out.print(secret, markup=False)
