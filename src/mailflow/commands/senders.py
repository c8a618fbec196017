"""Commands room: `mailflow senders` - senders: From identity, SMTP relay, DKIM key (and its DNS record)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    new_app,
    out,
    quiet_logs,
    runtime,
)
from mailflow.commands.templates import read_text_file
from mailflow.outbound import sending
from mailflow.outbound.senders import Sender

app = new_app("Senders: From identity, SMTP relay, DKIM key.")


@app.command("add")
def senders_add(
    name: str = typer.Argument(...),
    from_email: str = typer.Option(..., "--from", help="From address, e.g. news@example.org."),
    from_name: str = typer.Option("", "--from-name"),
    relay: str = typer.Option(
        ...,
        "--relay",
        help="smtp://user:pass@host:587, smtps://host:465 (?tls=none for plain), or direct:// to deliver to the recipients' MX hosts.",
    ),
    dkim_selector: str | None = typer.Option(None, "--dkim-selector"),
    dkim_key: Path | None = typer.Option(None, "--dkim-key", help="PEM private key file (- for stdin)."),
    as_json: bool = JsonOpt,
) -> None:
    """Add or replace a sender."""
    quiet_logs()
    key = read_text_file(dkim_key, "--dkim-key") if dkim_key is not None else None
    rt = runtime()
    s = sending.save_sender(rt.store, Sender(name, from_email, from_name, relay, dkim_selector, key), rt.vault)
    if as_json:
        emit_json({"name": s.name, "from": s.from_email, "dkim": key is not None})
    else:
        out.print(f"sender {s.name} saved ({s.from_email} via {s.relay.describe()}, tls {s.relay.tls})")


@app.command("list")
def senders_list(as_json: bool = JsonOpt) -> None:
    """Senders (relay passwords are not shown)."""
    from mailflow.outbound import views

    quiet_logs()
    with runtime().connect() as conn:
        rows = views.list_senders(conn)
    if as_json:
        emit_json(
            [
                {"name": r.name, "from": r.from_email, "from_name": r.from_name, "relay": r.relay, "dkim": r.dkim}
                for r in rows
            ]
        )
    else:
        for r in rows:
            out.print(f"{r.name:<16} {r.from_email:<32} {r.relay}{'  dkim' if r.dkim else ''}", markup=False)


@app.command("test")
def senders_test(
    name: str = typer.Argument(...),
    domain: str = typer.Option(None, "--domain", help="Direct delivery: the recipient domain whose MX to try"),
    as_json: bool = JsonOpt,
) -> None:
    """Connect to the sender's relay (or, for direct delivery, a domain's MX host) and EHLO."""
    from mailflow.outbound import views

    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        s = sending.load_sender(conn, name)
    res = asyncio.run(views.probe_sender(s, rt.settings, domain))
    if as_json:
        emit_json(res.to_dict())
    else:
        out.print(
            f"{res.host}:{res.port} answered EHLO with {res.ehlo_code} in {res.ms} ms; "
            f"extensions: {', '.join(res.extensions)}"
        )


@app.command("dkim-record")
def senders_dkim_record(name: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """The DNS TXT record that publishes the sender's DKIM public key (derived from its private key)."""
    from mailflow.outbound.senders import dkim_record

    quiet_logs()
    with runtime().connect() as conn:
        rec = dkim_record(sending.load_sender(conn, name))
    if as_json:
        emit_json({"sender": name, "name": rec.name, "type": "TXT", "value": rec.value, "strings": rec.strings()})
    else:
        out.print(rec.zone_line(), markup=False)


@app.command("delete")
def senders_delete(name: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Delete a sender; refused while an unfinished campaign or an unsent job uses it."""
    quiet_logs()
    sending.delete_sender(runtime().store, name)
    emit_json({"deleted": name}) if as_json else out.print(f"sender {name} deleted", markup=False)
