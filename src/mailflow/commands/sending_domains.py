"""Commands room: `mailflow sending-domains` - the domains a tenant sends from: add (generates the
DKIM key and prints the DNS records to publish), list, show, verify (asks DNS; exit 1 while a
required record fails) and remove. The DKIM private key is never printed."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import typer

from mailflow.commands.base import JsonOpt, emit_json, new_app, out, quiet_logs, runtime, settings

if TYPE_CHECKING:
    from mailflow.outbound.domains import DnsRecord, RecordCheck, SendingDomain

app = new_app("Sending domains: DKIM keys, the DNS records to publish, and their checks.")

WIDTH = 80
INDENT = "    "
PURPOSE = {"spf": "SPF", "dkim": "DKIM", "dmarc": "DMARC", "return_path": "Return path"}
WRAPPED = (
    "Values longer than a line are wrapped here: publish each as one value. DNS keeps a long "
    "TXT value as strings of at most 255 bytes (most DNS consoles split it themselves); "
    "--json gives the strings and a zone-file line."
)


def _say(text: str) -> None:
    out.print(text, markup=False)


def _wrapped(text: str, indent: str = "", hanging: str | None = None) -> list[str]:
    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=indent,
        subsequent_indent=indent if hanging is None else hanging,
        break_on_hyphens=False,
    ) or [indent]


def record_lines(record: DnsRecord) -> list[str]:
    """One record to publish, in at most WIDTH columns: what it is for, its type and name, the
    value (cut into lines of the room left, never at a space only), and why."""
    head = f"{PURPOSE.get(str(record.purpose), str(record.purpose))}  {record.type}  {record.name}"
    lines = [head + ("" if record.required else "  (optional)")]
    room = WIDTH - len(INDENT)
    lines += [INDENT + record.value[i : i + room] for i in range(0, len(record.value), room)]
    if record.note:
        lines += _wrapped(record.note, INDENT + "- ", INDENT + "  ")
    return lines


def check_lines(check: RecordCheck) -> list[str]:
    """One record's verdict: `status  purpose  detail`, the detail wrapped under itself."""
    head = f"{check.status!s:<8} {check.purpose!s:<12} "
    return _wrapped(head + check.detail + ("" if check.required else " (optional)"), "", " " * len(head))


def _print_records(domain: SendingDomain) -> None:
    _say("publish these DNS records:")
    for record in domain.records:
        _say("")
        for line in record_lines(record):
            _say(line)
    _say("")
    for line in _wrapped(WRAPPED):
        _say(line)


@app.command("add")
def sending_domains_add(
    domain: str = typer.Argument(..., help="The domain of the senders' From addresses, e.g. example.org."),
    selector: str | None = typer.Option(None, "--selector", help="The DKIM selector (default: mailflow)."),
    as_json: bool = JsonOpt,
) -> None:
    """Send from DOMAIN: generate its DKIM key (RSA 2048, kept encrypted; never shown) and print
    the records to publish - SPF, DKIM, DMARC and the return path's MX. Then run `verify`."""
    from mailflow.outbound import domains

    quiet_logs()
    rt = runtime()
    added = domains.add(rt.store, rt.vault, domain, settings=settings(), selector=selector)
    if as_json:
        emit_json(added.to_dict())
        return
    _say(f"sending from {added.display}")
    _say(f"DKIM selector {added.selector}, key {added.dkim_fingerprint}")
    _print_records(added)
    _say(f"then: mailflow sending-domains verify {added.domain}")


@app.command("list")
def sending_domains_list(as_json: bool = JsonOpt) -> None:
    """The tenant's sending domains, their status and when they were last checked."""
    from mailflow.outbound import domains

    quiet_logs()
    with runtime().connect() as conn:
        found = domains.listing(conn, settings=settings())
    if as_json:
        emit_json([d.to_dict() for d in found])
        return
    if not found:
        _say("no sending domains (`mailflow sending-domains add DOMAIN`)")
    for d in found:
        checked = f"checked {d.last_checked_at:%Y-%m-%d %H:%M}" if d.last_checked_at else "never checked"
        _say(f"{d.display:<40} {d.status!s:<9} {checked}")


@app.command("show")
def sending_domains_show(domain: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """One sending domain: its DKIM key's fingerprint, the records to publish, and what the last
    check found of each."""
    from mailflow.outbound import domains

    quiet_logs()
    with runtime().connect() as conn:
        found = domains.get(conn, domain, settings=settings())
    if as_json:
        emit_json(found.to_dict())
        return
    _say(f"domain    {found.display}  ({found.status}, added {found.created_at:%Y-%m-%d %H:%M})")
    _say(f"dkim      selector {found.selector}, key {found.dkim_fingerprint}")
    if found.last_check is None or found.last_checked_at is None:
        _say("checked   never (`mailflow sending-domains verify`)")
    else:
        _say(f"checked   {found.last_checked_at:%Y-%m-%d %H:%M}")
        for c in found.last_check:
            for line in check_lines(c):
                _say(line)
    _say("")
    _print_records(found)


@app.command("verify")
def sending_domains_verify(domain: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Look the records up in DNS (MAILFLOW_DNS_SERVERS when set; each question waits at most
    MAILFLOW_DOMAIN_DNS_TIMEOUT_S) and say per record: ok, warning, missing, wrong, or error (DNS
    did not answer: not counted as missing). The check is recorded; a record that passed before
    and fails now is reported as broken. Exit code 0 when every required record passed, else 1."""
    from mailflow.outbound import domains

    quiet_logs()
    s = settings()
    check = domains.verify(runtime().store, domain, domains.Resolver.from_settings(s), settings=s)
    if as_json:
        emit_json(check.to_dict())
    else:
        _say(f"{check.domain}: {check.status}")
        for c in check.checks:
            for line in check_lines(c):
                _say(line)
        for c in check.broken:
            _say(f"broken: {c.purpose} passed at the last check and is {c.status} now")
    if not check.ok:
        raise typer.Exit(1)


@app.command("remove")
def sending_domains_remove(domain: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Stop sending from DOMAIN and delete its DKIM key (refused while a sender of the domain
    without a key of its own signs with it)."""
    from mailflow.outbound import domains

    quiet_logs()
    name = domains.domain_name(domain)
    domains.remove(runtime().store, name)
    emit_json({"removed": name}) if as_json else _say(f"no longer sending from {name}; its DKIM key is deleted")
