"""Commands room: `mailflow domains` - the domains a tenant receives mail for, the MX record
each needs, and whether DNS has it (`check`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from mailflow.commands.base import JsonOpt, emit_json, iso, new_app, out, quiet_logs, runtime, settings

if TYPE_CHECKING:
    from mailflow.inbound.dnscheck import Verdict

app = new_app("Inbound domains: the domains mailflow receives mail for.")

WIDTH = 80  # a `check` line's most columns
DOMAIN_COLUMNS = 32  # of which a domain name's, at most (the rest is its verdict)


def _hostname() -> str:
    """The host MX records should name (MAILFLOW_INBOUND_HOSTNAME, else the FQDN), as `mailflow inbound` greets."""
    from mailflow.inbound import dnscheck

    return dnscheck.hostname(settings().inbound_hostname)


@app.command("add")
def domains_add(domain: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Receive mail for DOMAIN, and print the MX record to publish for it (pointing at
    MAILFLOW_INBOUND_HOSTNAME, else this machine's FQDN)."""
    from mailflow.inbound import directory, dnscheck

    quiet_logs()
    name, created = directory.add_domain(runtime().store, domain)
    record = dnscheck.mx_record(name, _hostname())
    if as_json:
        emit_json({"domain": name, "created": created, "mx": record})
    else:
        out.print(f"receiving mail for {name}" if created else f"{name} was added already", markup=False)
        out.print(f"publish: {record}", markup=False)


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


@app.command("show")
def domains_show(domain: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """One inbound domain: the MX record to publish, its mailboxes, the routes that may take
    its mail, and how many messages it received."""
    from mailflow.inbound import directory, dnscheck

    quiet_logs()
    with runtime().connect() as conn:
        row = directory.domain_details(conn, domain)
    record = dnscheck.mx_record(row["domain"], _hostname())
    if as_json:
        emit_json(
            {
                "domain": row["domain"],
                "created_at": iso(row["created_at"]),
                "mx": record,
                "mailboxes": [{**b, "created_at": iso(b["created_at"])} for b in row["mailboxes"]],
                "routes": [r.to_dict() for r in row["routes"]],
                "messages": row["messages"],
            }
        )
        return
    counts = row["messages"]
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts["by_state"].items()))
    out.print(f"domain    {row['domain']}  (added {row['created_at']:%Y-%m-%d %H:%M})", markup=False)
    out.print(f"publish   {record}", markup=False)
    out.print(f"messages  {counts['received']} received{f' ({states})' if states else ''}", markup=False)
    out.print(f"          {counts['in_mailboxes']} in mailboxes, {counts['unread']} unread", markup=False)
    for b in row["mailboxes"]:
        name = f"  {b['name']}" if b["name"] else ""
        out.print(f"mailbox   {b['address']}  {b['messages']} message(s), {b['unread']} unread{name}", markup=False)
    for r in row["routes"]:
        maybe = "  (a regex: may match here)" if r.recipient.domain is None else ""
        out.print(f"route     {r.id}  {r.pattern} -> {r.describe()}{maybe}", markup=False)


def _cut(text: str, room: int) -> str:
    return text if len(text) <= room else text[: max(room - 3, 0)] + "..."


def check_line(v: Verdict, width: int = WIDTH) -> str:
    """One domain's verdict in at most `width` columns: a name longer than DOMAIN_COLUMNS is
    cut, then the detail (`--json` has both whole); the status and SPF/DMARC always show."""
    yes = {"present": "yes", "absent": "no"}
    tail = f"  spf:{yes.get(v.spf, '?')} dmarc:{yes.get(v.dmarc, '?')}"
    head = f"{v.status:<9} {_cut(v.domain, DOMAIN_COLUMNS)}  "
    return head + _cut(v.detail, width - len(head) - len(tail)) + tail


@app.command("check")
def domains_check(
    domain: str | None = typer.Argument(None, help="One domain (default: every one of the tenant's)."),
    as_json: bool = JsonOpt,
) -> None:
    """Look up each domain's MX records and say whether its mail comes here: ok (an MX names
    this host, or one of its addresses), wrong (the MX records name other hosts), missing (no
    such domain, no MX record, or a null MX) or temperror (DNS did not answer: try again).
    Whether the domain publishes SPF and DMARC records is shown too, as information (yes, no,
    or ? when DNS did not answer). DNS is
    asked through MAILFLOW_DNS_SERVERS when set; each question waits at most
    MAILFLOW_INBOUND_DNS_TIMEOUT_S. Exit code 0 when every domain checked is ok, 1 otherwise."""
    import asyncio

    from mailflow.inbound import directory, dnscheck

    quiet_logs()
    s = settings()
    with runtime().connect() as conn:
        names = [directory.domain(conn, domain)["domain"]] if domain else [r["domain"] for r in directory.domains(conn)]
    host = _hostname()
    me, verdicts = asyncio.run(
        dnscheck.check(
            names, host, nameservers=s.dns_servers, timeout_s=s.inbound_dns_timeout_s, listen_address=s.inbound_host
        )
    )
    if as_json:
        emit_json(
            {
                "ok": all(v.ok for v in verdicts),
                "host": me.name,
                "addresses": sorted(me.addresses),
                "domains": [{**v.to_dict(), "publish": dnscheck.mx_record(v.domain, host)} for v in verdicts],
            }
        )
    elif not verdicts:
        out.print("no inbound domains to check (`mailflow domains add DOMAIN`)", markup=False)
    else:
        for v in verdicts:
            out.print(check_line(v), markup=False)
    if not all(v.ok for v in verdicts):
        raise typer.Exit(1)
