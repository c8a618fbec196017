"""Commands room: `mailflow consume` - run a projection's consumer."""

from __future__ import annotations

import os
import socket

import typer

from mailflow.commands.base import (
    new_app,
    run_process,
)
from mailflow.consumers.runtime import ConsumerRunner
from mailflow.errors import UsageError
from mailflow.runtime.projections import get as get_projection

app = new_app()


@app.command()
def consume(
    name: str = typer.Argument(..., help="Projection to run, e.g. event_counts."),
    consumer_id: str | None = typer.Option(None, help="Name within the consumer group (default host-pid)."),
) -> None:
    """Run a consumer: catch up from PostgreSQL, then follow the live stream. SIGTERM stops it."""
    from mailflow.runtime.projections import inline_projections

    if name in inline_projections():
        raise UsageError(f"{name} is an inline projection, kept current by the commands themselves; nothing to consume")
    projection = get_projection(name)
    cid = consumer_id or f"{socket.gethostname()}-{os.getpid()}"
    run_process(
        "consumer",
        f"{name}.{cid}",
        lambda rt, stop, health: ConsumerRunner(
            projection, rt.store, rt.services.redis_url, rt.settings, consumer_id=cid, health=health
        ).run(stop),
    )
