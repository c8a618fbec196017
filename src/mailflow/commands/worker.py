"""Commands room: `mailflow worker` - send jobs over SMTP, and run the duties (aggregation, cleanup, DNS checks)."""

from __future__ import annotations

import asyncio
import threading

import typer

from mailflow.commands.base import (
    new_app,
    run_process,
)
from mailflow.outbound.worker import Worker
from mailflow.runtime.duties import duties

app = new_app()


@app.command("worker")
def worker_cmd(name: str | None = typer.Option(None, "--name", help="Consumer name (default host-pid).")) -> None:
    """Send jobs over SMTP (asyncio; MAILFLOW_WORKER_CONCURRENCY at once). SIGTERM finishes in-flight sends."""

    def body(rt, stop: threading.Event, health) -> None:
        s = rt.settings
        worker = Worker(
            rt.store,
            rt.services.redis_url,
            s,
            rt.keyring.signing_key,
            vault=rt.vault,
            name=health.name,
            health=health,
            duties=duties(rt.store, s),
        )

        async def main() -> None:
            astop = asyncio.Event()
            loop = asyncio.get_running_loop()
            threading.Thread(target=lambda: (stop.wait(), loop.call_soon_threadsafe(astop.set)), daemon=True).start()
            await worker.run(astop)

        asyncio.run(main())

    run_process("worker", name, body, pool_size=8)
