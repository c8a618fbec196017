"""Commands room: `mailflow web` - serve unsubscribe links and /healthz."""

from __future__ import annotations

import typer

from mailflow.commands.base import (
    new_app,
    run_process,
)

app = new_app()


@app.command("web")
def web_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (put a TLS reverse proxy in front)."),
    port: int = typer.Option(8025, "--port", min=1, max=65535, help="TCP port to listen on."),
) -> None:
    """Serve the unsubscribe links (RFC 8058 one-click) and /healthz over HTTP. SIGTERM stops it."""
    from mailflow.web.app import serve

    run_process("web", f"{host}:{port}", lambda rt, stop, health: serve(rt, host, port, health=health), pool_size=8)
