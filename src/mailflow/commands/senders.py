"""Commands room: `mailflow senders` - senders: From identity, SMTP relay, DKIM key (and its DNS record)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import typer
from psycopg.rows import dict_row

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    new_app,
    out,
    quiet_logs,
    runtime,
)
from mailflow.commands.templates import read_text_file
from mailflow.errors import UsageError
from mailflow.outbound import queries as oq
from mailflow.outbound import sending
from mailflow.outbound.senders import Sender, smtp_client

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
    s = sending.save_sender(runtime().store, Sender(name, from_email, from_name, relay, dkim_selector, key))
    if as_json:
        emit_json({"name": s.name, "from": s.from_email, "dkim": key is not None})
    else:
        out.print(f"sender {s.name} saved ({s.from_email} via {s.relay.describe()}, tls {s.relay.tls})")


@app.command("list")
def senders_list(as_json: bool = JsonOpt) -> None:
    """Senders (relay passwords are not shown)."""
    from mailflow.config import mask_url

    quiet_logs()
    with runtime().connect() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = [
            {
                "name": r["name"],
                "from": r["from_email"],
                "from_name": r["from_name"],
                "relay": mask_url(r["relay_url"]),
                "dkim": r["dkim"],
            }
            for r in cur.execute(oq.LIST_SENDERS).fetchall()
        ]
    if as_json:
        emit_json(rows)
    else:
        for r in rows:
            out.print(f"{r['name']:<16} {r['from']:<32} {r['relay']}{'  dkim' if r['dkim'] else ''}", markup=False)


@app.command("test")
def senders_test(
    name: str = typer.Argument(...),
    domain: str = typer.Option(None, "--domain", help="Direct delivery: the recipient domain whose MX to try"),
    as_json: bool = JsonOpt,
) -> None:
    """Connect to the sender's relay (or, for direct delivery, a domain's MX host) and EHLO."""
    import aiosmtplib

    from mailflow.outbound import mx

    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        s = sending.load_sender(conn, name)

    async def probe() -> dict[str, Any]:
        relay = s.relay
        if relay.direct:
            target_domain = domain or s.domain
            try:
                host, port = (
                    await mx.MxResolver(rt.settings.mx_overrides, nameservers=rt.settings.dns_servers).hosts(
                        target_domain
                    )
                )[0]
            except (mx.NoRoute, mx.LookupFailed) as exc:
                raise UsageError(f"direct delivery to {target_domain}: {exc}") from exc
            relay = relay.at(host, port or relay.port)
        client = smtp_client(relay, rt.settings.ehlo_hostname)
        started = time.perf_counter()
        try:
            await client.connect()
            code, message = await client.ehlo()
            exts = sorted(client.esmtp_extensions)
            await client.quit()
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise UsageError(f"relay {relay.host}:{relay.port} failed: {exc}") from exc
        return {
            "sender": name,
            "host": relay.host,
            "port": relay.port,
            "tls": relay.tls,
            "direct": relay.direct,
            "ehlo_code": code,
            "greeting": " ".join(message.split())[:200],
            "extensions": exts,
            "ms": round((time.perf_counter() - started) * 1000, 1),
        }

    res = asyncio.run(probe())
    if as_json:
        emit_json(res)
    else:
        out.print(
            f"{res['host']}:{res['port']} answered EHLO with {res['ehlo_code']} in {res['ms']} ms; "
            f"extensions: {', '.join(res['extensions'])}"
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
