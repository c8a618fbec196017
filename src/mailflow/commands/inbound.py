"""Commands room: `mailflow inbound` - the SMTP server for the domains and mailboxes mailflow manages."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer

from mailflow.commands.base import new_app, run_process, settings

if TYPE_CHECKING:
    from mailflow.config import Settings
    from mailflow.outbound.senders import SmtpRelay
    from mailflow.runtime.wiring import Runtime

app = new_app()


@app.command("inbound")
def inbound_cmd(
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default MAILFLOW_INBOUND_HOST)."),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="TCP port (default MAILFLOW_INBOUND_PORT, 2525; 25 under systemd)."
    ),
    processes: int | None = typer.Option(
        None,
        "--processes",
        min=1,
        max=64,
        help="Server processes sharing the port (default MAILFLOW_INBOUND_PROCESSES, 1).",
    ),
    shared_port: bool = typer.Option(False, "--shared-port", hidden=True),
) -> None:
    """Receive mail over SMTP for the tenants' domains and mailboxes, and for the bounces and
    replies of mailflow's own mail; refuse everything else (never an open relay). A 250 means
    the message is committed. SIGTERM stops it.

    With --processes N, N server processes share the port (the kernel spreads the sessions
    between them: each has its own committer and uses a core of its own), supervised as
    `mailflow up` supervises its children."""
    from mailflow.inbound import tls
    from mailflow.inbound.authn import Authenticator
    from mailflow.inbound.server import Limits, serve
    from mailflow.inbound.spam import Checker, Rspamd, Scorer, Spamd
    from mailflow.infra.net import listen

    s = settings()
    where_host = host or s.inbound_host
    where_port = port or s.inbound_port
    count = processes or s.inbound_processes
    if count > 1 and not shared_port:
        _supervise(where_host, where_port, count)
        return
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
    authenticator = (
        Authenticator(nameservers=s.dns_servers, timeout_s=s.inbound_dns_timeout_s)
        if s.inbound_authentication
        else None
    )
    external: Scorer | None = None
    if s.inbound_spamd:
        spamd_host, _, spamd_port = s.inbound_spamd.rpartition(":")
        external = Spamd(spamd_host, int(spamd_port), timeout_s=s.inbound_spam_timeout_s)
    elif s.inbound_rspamd_url:
        external = Rspamd(s.inbound_rspamd_url, timeout_s=s.inbound_spam_timeout_s)
    checker = Checker(external, timeout_s=s.inbound_spam_timeout_s)
    forward_relay = _forward_relay(s.inbound_forward_relay)
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
            listen=lambda h, p: listen(h, p, shared=shared_port),
            authenticator=authenticator,
            checker=checker,
            actions=_actions(rt, s, hostname, forward_relay),
        ),
        pool_size=5,  # the committer, the directory reload, RCPT lookups, the actions' two
    )


def _supervise(host: str, port: int, count: int) -> None:
    from mailflow.runtime.supervisor import Supervisor, inbound_parts

    def body(rt: Runtime, stop: Any, health: Any) -> None:
        s = rt.settings.model_copy(
            update={"database_url": rt.services.database_url, "redis_url": rt.services.redis_url}
        )
        code = Supervisor(
            s, inbound_parts(count, ["--host", host, "--port", str(port)]), health=health, progress_every_s=None
        ).run(stop)
        if code:
            raise typer.Exit(code)

    run_process("inbound-supervisor", f"{host}:{port}", body, pool_size=1)


def _forward_relay(url: str | None) -> SmtpRelay | None:
    """MAILFLOW_INBOUND_FORWARD_RELAY parsed as senders' relay URLs are; a smart host only."""
    from mailflow.errors import ConfigurationError, UsageError
    from mailflow.outbound.senders import parse_relay_url

    if not url:
        return None
    try:
        relay = parse_relay_url(url)
    except UsageError as exc:
        raise ConfigurationError(f"bad setting MAILFLOW_INBOUND_FORWARD_RELAY: {exc}") from exc
    if relay.direct:
        raise ConfigurationError(
            "bad setting MAILFLOW_INBOUND_FORWARD_RELAY: forwards go through a smart host (smtp://host:port or "
            "smtps://host:465), not direct://"
        )
    return relay


def _actions(rt: Runtime, s: Settings, hostname: str, relay: SmtpRelay | None) -> Callable[[asyncio.Event], Any]:
    """The routes' actions (inbound/actions.py), run beside the server: POSTs and forwards."""
    from mailflow.inbound import actions
    from mailflow.outbound.senders import smtp_client

    options = actions.Options(
        retry=actions.RetryPolicy(
            base_s=s.inbound_action_retry_base_s,
            factor=s.inbound_action_retry_factor,
            max_attempts=s.inbound_action_max_attempts,
            max_delay_s=s.inbound_action_retry_max_s,
        ),
        lease_s=s.inbound_action_lease_s,
        concurrency=s.inbound_action_concurrency,
        poll_s=s.inbound_action_poll_s,
        max_raw_bytes=s.inbound_action_max_raw_bytes,
    )
    http = actions.HttpPoster(timeout_s=s.inbound_action_timeout_s, max_connections=s.inbound_action_concurrency)
    forwarder = (
        None
        if relay is None
        else actions.Forwarder(
            lambda: smtp_client(relay, local_hostname=hostname), srs_key=rt.keyring.signing_key, hostname=hostname
        )
    )
    return lambda halt: actions.run(rt.store, halt, http=http, forwarder=forwarder, vault=rt.vault, options=options)
