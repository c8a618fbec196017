"""Commands room: `mailflow queuer` - move due jobs from PostgreSQL to Redis."""

from __future__ import annotations

from mailflow.commands.base import (
    new_app,
    run_process,
)
from mailflow.outbound.queuer import Queuer

app = new_app()


@app.command("queuer")
def queuer_cmd() -> None:
    """Move due jobs from PostgreSQL to the Redis priority streams (one leader; others stand by)."""
    run_process(
        "queuer",
        None,
        lambda rt, stop, health: Queuer(rt.store, rt.services.redis_url, rt.settings, health=health).run(stop),
    )
