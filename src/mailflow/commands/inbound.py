"""Commands room: `mailflow inbound` - the SMTP server for the domains and mailboxes mailflow manages."""

from __future__ import annotations

import socket

import typer

from mailflow.commands.base import new_app, run_process, settings

app = new_app()


@app.command("inbound")
def inbound_cmd(
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default MAILFLOW_INBOUND_HOST)."),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="TCP port (default MAILFLOW_INBOUND_PORT, 2525; 25 under systemd)."
    ),
) -> None:
    """Receive mail over SMTP for the tenants' domains and mailboxes, and for the bounces and
    replies of mailflow's own mail; refuse everything else (never an open relay). A 250 means
    the message is committed. SIGTERM stops it."""
    from mailflow.inbound import tls
    from mailflow.inbound.server import Limits, serve
    from mailflow.infra.net import listen

    s = settings()
    where_host = host or s.inbound_host
    where_port = port or s.inbound_port
    hostname = s.inbound_hostname or socket.getfqdn()
    if s.inbound_tls_cert and s.inbound_tls_key:
        cert, key = s.inbound_tls_cert, s.inbound_tls_key
    else:
        cert, key = tls.self_signed(s.home.expanduser(), hostname)
    context = tls.context(cert, key)
    limits = Limits(
        max_message_bytes=s.inbound_max_message_bytes,
        max_recipients=s.inbound_max_recipients,
        max_connections=s.inbound_max_connections,
        max_connections_per_ip=s.inbound_max_connections_per_ip,
        timeout_s=s.inbound_timeout_s,
        data_timeout_s=s.inbound_data_timeout_s,
    )
    run_process(
        "inbound",
        f"{where_host}:{where_port}",
        lambda rt, stop, health: serve(
            rt.store,
            where_host,
            where_port,
            stop,
            limits=limits,
            secret=rt.keyring.verifying_keys,
            hostname=hostname,
            tls=context,
            health=health,
            listen=listen,
        ),
        pool_size=4,
    )
