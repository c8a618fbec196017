"""Commands room: `mailflow web` - serve the HTTP API (/api/v1), the unsubscribe and preferences pages and /healthz."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from mailflow.commands.base import (
    new_app,
    run_process,
)

if TYPE_CHECKING:
    from mailflow.runtime.wiring import Runtime

app = new_app()


@app.command("web")
def web_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (put a TLS reverse proxy in front)."),
    port: int = typer.Option(8025, "--port", min=1, max=65535, help="TCP port to listen on."),
    processes: int = typer.Option(
        1, "--processes", min=1, max=64, help="Server processes sharing the port (each uses a core of its own)."
    ),
    shared_port: bool = typer.Option(False, "--shared-port", hidden=True),
) -> None:
    """Serve the HTTP API under /api/v1, the unsubscribe links (RFC 8058 one-click), the
    preferences pages and /healthz. SIGTERM stops it, after the requests in flight.

    With --processes N, N server processes share the port (SO_REUSEPORT: the kernel spreads
    the connections between them), supervised as `mailflow up` supervises its children."""
    if processes > 1 and not shared_port:
        _supervise(host, port, processes)
        return
    from mailflow.web.app import serve

    run_process(
        "web",
        f"{host}:{port}",
        lambda rt, stop, health: serve(rt, host, port, health=health, shared=shared_port, stop=stop),
        pool_size=8,
    )


def _supervise(host: str, port: int, count: int) -> None:
    from mailflow.infra.net import listen
    from mailflow.runtime.supervisor import Supervisor

    # Fail here, with one line, if the port is taken, rather than in every child in turn.
    listen(host, port, shared=True).close()
    where = ["--host", host, "--port", str(port), "--processes", "1", "--shared-port"]
    parts = [(f"web-{i}", ["web", *where]) for i in range(1, count + 1)]

    def body(rt: Runtime, stop: Any, health: Any) -> None:
        s = rt.settings.model_copy(
            update={"database_url": rt.services.database_url, "redis_url": rt.services.redis_url}
        )
        code = Supervisor(s, parts, health=health, progress_every_s=None).run(stop)
        if code:
            raise typer.Exit(code)

    run_process("web-supervisor", f"{host}:{port}", body, pool_size=1)
