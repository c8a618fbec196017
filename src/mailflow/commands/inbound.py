"""Commands room: `mailflow inbound` - the SMTP server for the domains and mailboxes mailflow
manages (the group's own callback: `mailflow inbound [--host H --port P ...]` serves), and its
verbs on received mail: `classify` (what the pipeline's classifier makes of .eml files)."""

from __future__ import annotations

import asyncio
import socket
import sys
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer

from mailflow.commands.base import emit_json, err, new_app, out, run_process, settings

if TYPE_CHECKING:
    from mailflow.config import Settings
    from mailflow.inbound.classify import Classification
    from mailflow.outbound.senders import SmtpRelay
    from mailflow.runtime.wiring import Runtime

app = new_app(
    "Receive mail over SMTP for the tenants' domains and mailboxes and for the bounces and replies "
    "of mailflow's own mail (no command: run the server; SIGTERM stops it), and look at received mail."
)


@app.callback(invoke_without_command=True, no_args_is_help=False)  # alone: the server, as always
def inbound_cmd(
    ctx: typer.Context,
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
    the message is committed. SIGTERM stops it. With a command, that command instead.

    With --processes N, N server processes share the port (the kernel spreads the sessions
    between them: each has its own committer and uses a core of its own), supervised as
    `mailflow up` supervises its children."""
    if ctx.invoked_subcommand is not None:
        return
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
        pool_size=7,  # the committer, the directory reload, RCPT lookups, the actions' two, the webhooks' two
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
    """The routes' actions (inbound/actions.py), run beside the server: POSTs and forwards;
    and the webhook endpoints' deliveries (inbound/webhooks.py)."""
    from mailflow.inbound import actions, webhooks
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
    hooks = webhooks.http_for(s, max_connections=s.inbound_action_concurrency)

    async def both(halt: asyncio.Event) -> None:  # and the webhook endpoints' deliveries (inbound/webhooks.py)
        await asyncio.gather(
            actions.run(rt.store, halt, http=http, forwarder=forwarder, vault=rt.vault, options=options),
            webhooks.run(rt.store, halt, vault=rt.vault, http=hooks),
        )

    return both


# ---- verbs on received mail: `classify` (files, nothing stored) and `reprocess` (stored mail) -------

ClassifyJsonOpt = typer.Option(False, "--json", help="One JSON object per file, one line each.")
WIDTH = 80
TEXT_LINES = 5  # of a reply's text, in the human output


@app.command("classify", short_help="What the classifier makes of .eml files.")
def classify_cmd(
    files: list[str] = typer.Argument(..., metavar="FILE", help=".eml files (whole messages); - reads stdin."),
    as_json: bool = ClassifyJsonOpt,
) -> None:
    """What the pipeline's classifier makes of each message: bounce, complaint, auto_reply,
    unsubscribe, reply or other, with the recipients a report is about and a reply's new
    text. Stores nothing and needs no database: the lookups of mailflow's own jobs (VERP
    and reply addresses, Message-IDs) are not made, so job is always empty here. A file that
    cannot be read is one error line; the others are still classified, and the exit code
    is 1."""
    from mailflow.inbound.classify import classify

    failed = False
    for name in files:
        try:
            raw = sys.stdin.buffer.read() if name == "-" else _read_file(name)
        except OSError as exc:
            err.print(f"error: {name}: {exc.strerror or exc}", markup=False)
            failed = True
            continue
        result = classify(raw)
        if as_json:
            emit_json({"file": name, **result.to_dict()})
        else:
            out.print(_describe(name, result), markup=False)
    if failed:
        raise typer.Exit(1)


KINDS = ("bounce", "complaint", "auto_reply", "unsubscribe", "reply", "other")


@app.command("reprocess", short_help="Classify stored mail again (after an upgrade).")
def reprocess_cmd(
    since: str = typer.Option("30d", "--since", help="Received since: a date or time, or 30m, 24h, 7d."),
    kind: str | None = typer.Option(None, "--kind", help=f"Only messages classified as one of: {', '.join(KINDS)}."),
    as_json: bool = typer.Option(False, "--json", help="The counts as one JSON object."),
) -> None:
    """Run the tenant's stored messages through the current classifier again and record an
    event only where the verdict changed (marked reclassified). The outbound_feedback consumer
    applies what changed, once: a message still classified as before changes nothing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mailflow.commands.base import parse_since, quiet_logs, runtime
    from mailflow.errors import UsageError
    from mailflow.inbound.classifier import reclassify

    if kind is not None and kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: one of {', '.join(KINDS)}")
    at = parse_since(since)
    quiet_logs()
    store = runtime().store
    tenant = store.tenant or "default"
    if as_json:
        res = reclassify(store, tenant, since=at, kind=kind)
    else:
        columns = (TextColumn("reprocessing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task("reprocess", total=None)
            res = reclassify(
                store,
                tenant,
                since=at,
                kind=kind,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    if as_json:
        emit_json({"seen": res.seen, "changed": res.changed, "now": res.kinds})
        return
    now = ", ".join(f"{n} {k}" for k, n in sorted(res.kinds.items())) or "nothing"
    out.print(f"{res.seen} message(s) classified again, {res.changed} changed (now: {now})", markup=False)


def _read_file(name: str) -> bytes:
    with open(name, "rb") as f:
        return f.read()


def _describe(name: str, c: Classification) -> str:
    """One block per file, no line over 80 columns."""
    lines = [name]

    def field(label: str, value: str) -> None:
        if value:
            lines.extend(
                textwrap.wrap(
                    value, WIDTH, initial_indent=f"  {label:<10}", subsequent_indent=" " * 12, break_on_hyphens=False
                )
            )

    field("kind", str(c.kind))
    field("job", f"{c.job_id} (found by {c.found_by})" if c.job_id else "-")
    field("from", c.sender)
    field("subject", c.subject)
    field("feedback", c.feedback_type)
    field("auto", c.auto_submitted)
    field("original", c.original.message_id)
    for r in c.recipients:
        field("recipient", r.address or "(not named)")
        codes = [f"status {r.status or '-'}", f"reply {r.reply_code or '-'}", f"reason {r.reason}"]
        codes.append(f"hard {'yes' if r.hard else 'no'}")
        if r.action not in ("failed", "delivered"):
            codes.append(r.action)
        field("", "  ".join(codes))
        field("", f"mta {r.remote_mta}" if r.remote_mta else "")
        field("", r.diagnostic[:300])
    text = [w for line in c.reply_text.splitlines() if line.strip() for w in textwrap.wrap(line, WIDTH - 12)]
    shown = text[:TEXT_LINES] + (["..."] if len(text) > TEXT_LINES else [])
    for i, line in enumerate(shown):
        lines.append(f"  {'text' if i == 0 else '':<10}{line}")
    return "\n".join(lines) + "\n"
