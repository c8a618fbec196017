"""Commands room: `mailflow relay` - publish committed events to Redis."""

from __future__ import annotations

import mailflow.inbound  # noqa: F401 - registers the events the relay announces on pub/sub
from mailflow.commands.base import (
    new_app,
    run_process,
)
from mailflow.events.relay import Relay

app = new_app()


@app.command()
def relay() -> None:
    """Publish committed events to Redis (one leader; more instances wait as hot standbys)."""
    from mailflow.consumers.runtime import retention_floor

    run_process(
        "relay",
        None,
        lambda rt, stop, health: Relay(
            rt.store, rt.services.redis_url, rt.settings, health=health, retention_floor=retention_floor
        ).run(stop),
    )
