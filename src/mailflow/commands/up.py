"""Commands room: `mailflow up` - run the whole pipeline, supervised."""

from __future__ import annotations

import threading

import typer

from mailflow.commands.base import (
    new_app,
    run_process,
    settings,
)
from mailflow.errors import ConfigurationError

app = new_app()


@app.command("up")
def up(
    workers: int = typer.Option(1, "--workers", min=1, max=16),
    inbound: bool = typer.Option(True, "--inbound/--no-inbound", help="Run the inbound SMTP server too."),
) -> None:
    """Run the whole pipeline, supervised: relay, event_counts, queuer, worker(s) and the
    inbound SMTP server (MAILFLOW_INBOUND_HOST/PORT) as child processes.

    A child that dies is restarted (and the log says which and why); SIGTERM stops them all.
    """
    from mailflow.outbound.worker import check_settings
    from mailflow.runtime.supervisor import FATAL_EXIT, Supervisor, pipeline_parts

    check_settings(settings())  # before any child starts: one line, exit 2

    def body(rt, stop: threading.Event, health) -> None:
        # Children resolve the same servers: embedded ones are started (once) here first.
        s = rt.settings.model_copy(
            update={"database_url": rt.services.database_url, "redis_url": rt.services.redis_url}
        )
        supervisor = Supervisor(
            s, pipeline_parts(workers, inbound=rt.settings.inbound_processes if inbound else 0), health=health
        )
        code = supervisor.run(stop)
        if code == FATAL_EXIT and supervisor.fatal is not None:
            c = supervisor.fatal
            raise ConfigurationError(f"{c.name} cannot run: {c.last_error or (c.tail[-1] if c.tail else c.last_exit)}")
        if code:
            raise typer.Exit(code)

    run_process("up", None, body)
