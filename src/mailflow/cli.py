"""The `mailflow` command: assembles the command groups of mailflow.commands, nothing else.

Each group lives in its own module and is imported only when it runs (or its help is asked
for), so `mailflow --help` loads none of the pipeline. Every failure a user can cause ends
as one `error:` line on stderr and an exit code (docs/operations.md), never a traceback.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

import typer
import typer.core
import typer.main

# name -> (module under mailflow.commands, one line of help). Order is the order of --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "The outbound pipeline end to end against a misbehaving SMTP server."),
    "up": ("up", "Run the whole pipeline, supervised (relay, consumers, queuer, workers)."),
    "health": ("health", "Each long-running process on this host, and its servers."),
    "migrate": ("migrate", "Apply pending database migrations."),
    "tenants": ("tenants", "Tenants: create, list, show, suspend, resume, erase, limits."),
    "users": ("users", "Users of the browser pages: add, list, passwd, role, remove."),
    "keys": ("keys", "API keys: bearer keys for the HTTP API, with scopes."),
    "secrets": ("secrets", "Secrets: encrypted relay passwords and DKIM keys; rotate the master key."),
    "send": ("send", "Send one transactional message (high priority)."),
    "campaigns": ("campaigns", "Campaigns: draft -> running -> completed."),
    "contacts": ("contacts", "Contacts: import from CSV, list, show, update, reactivate, erase."),
    "segments": ("segments", "Segments: saved filters over contacts."),
    "templates": ("templates", "Templates: subject, HTML and text in sandboxed Jinja2."),
    "senders": ("senders", "Senders: From identity, SMTP relay, DKIM key."),
    "suppressions": ("suppressions", "Suppressed addresses: never sent to."),
    "jobs": ("jobs", "Jobs: one per recipient message."),
    "queues": ("queues", "Waiting work, age and SLA per priority, and the periodic duties."),
    "stats": ("stats", "Delivery numbers over time: sent, delivered, bounced, opens, clicks."),
    "analytics": ("analytics", "Analytics: aggregate now, rebuild the aggregates."),
    "events": ("events", "Append, read and follow events."),
    "projections": ("projections", "Inspect and rebuild projections."),
    "dlq": ("dlq", "Dead letters: events a consumer gave up on."),
    "relay": ("relay", "Long-running: publish committed events to Redis."),
    "consume": ("consume", "Long-running: run a projection's consumer."),
    "queuer": ("queuer", "Long-running: move due jobs from PostgreSQL to Redis."),
    "worker": ("worker", "Long-running: send jobs over SMTP."),
    "web": ("web", "Long-running: the HTTP API (/api/v1), unsubscribe pages, /healthz."),
    "inbound": ("inbound", "Long-running: receive mail over SMTP for domains and mailboxes."),
    "sending-domains": ("sending_domains", "Sending domains: DKIM keys, the DNS records to publish, and their checks."),
    "domains": ("domains", "Inbound domains: the domains mailflow receives mail for."),
    "mailboxes": ("mailboxes", "Mailboxes: addresses that keep the mail they receive."),
    "routes": ("routes", "Routes: where mail to addresses without a mailbox goes."),
    "webhooks": ("webhooks", "Webhook endpoints: classified inbound mail POSTed, signed, to URLs."),
    "messages": ("messages", "Received messages: list, show, raw, headers, read."),
    "threads": ("threads", "Conversations: what came back, threaded with what was sent."),
    "quarantine": ("quarantine", "Quarantine: held messages, release, drop, spam thresholds."),
    "services": ("services", "The embedded PostgreSQL and Redis."),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mailflow")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "unknown"


class LazyGroup(typer.core.TyperGroup):
    """The root group: its subcommands (typer apps) are imported when used, and its help lists
    them from COMMANDS without importing any."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module = importlib.import_module(f"mailflow.commands.{entry[0]}")
        command = typer.main.get_command(module.app)
        command.name = cmd_name
        return command

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in COMMANDS.items()])


app = typer.Typer(
    cls=LazyGroup,
    help="mailflow: an event-sourced email pipeline. `mailflow demo` shows it end to end.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["--help", "-h"], "max_content_width": 80},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mailflow {_version()}")
        raise typer.Exit(0)


def _set_tenant(value: str | None) -> str | None:
    """--tenant overrides MAILFLOW_TENANT for this command (and the processes it starts)."""
    if value is not None:
        if not re.match(r"^[a-z0-9][a-z0-9-]{0,39}$", value):
            raise typer.BadParameter("a tenant id is 1 to 40 lowercase letters, digits or '-'", param_hint="--tenant")
        os.environ["MAILFLOW_TENANT"] = value
    return value


@app.callback()
def _root(
    _version_flag: bool = typer.Option(
        False, "--version", is_eager=True, callback=_show_version, help="Print the version and exit."
    ),
    _tenant: str | None = typer.Option(
        None,
        "--tenant",
        metavar="ID",
        callback=_set_tenant,
        help="Act on this tenant's data (default: MAILFLOW_TENANT, else 'default').",
    ),
) -> None:
    """mailflow: an event-sourced email pipeline. `mailflow demo` shows it end to end."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure a user can cause ends as one `error:` line and an exit code."""
    code = 0
    try:
        result = typer.main.get_command(app).main(args=argv, prog_name="mailflow", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.TyperException as exc:  # usage errors: bad option, missing argument
        fmt = getattr(exc, "format_message", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a group called alone: its help, on stdout
            typer.echo(fmt() if fmt else str(exc))
            sys.exit(getattr(exc, "exit_code", 2))
        message = " ".join((fmt() if fmt else str(exc)).split())
        if message:  # empty when a group was called without a command: the help was shown
            typer.echo(f"error: {message} (see --help)", err=True)
        code = getattr(exc, "exit_code", 2)
    except Exception as exc:  # noqa: BLE001
        code = _report(exc)
    finally:
        base = sys.modules.get("mailflow.commands.base")  # loaded by any command that ran
        if base is not None:
            base.close()
    sys.exit(code)


def _report(exc: Exception) -> int:
    import psycopg

    from mailflow.config import debug_enabled
    from mailflow.errors import MailflowError

    if isinstance(exc, MailflowError):
        _err(f"error: {exc}")
        return exc.exit_code
    if isinstance(exc, psycopg.errors.UndefinedTable):
        _err(
            f"error: the database is not migrated ({exc.diag.message_primary}); run `mailflow migrate`",
        )
        return 2
    if debug_enabled():
        raise exc
    _err(
        f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())} (set MAILFLOW_DEBUG=1 for a traceback)",
    )
    return 70


def _err(line: str) -> None:
    typer.echo(line, err=True)


if __name__ == "__main__":
    main()
