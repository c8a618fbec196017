"""Commands room: `mailflow services` - the embedded PostgreSQL and Redis."""

from __future__ import annotations

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    new_app,
    out,
    settings,
)
from mailflow.config import mask_url
from mailflow.infra import embedded

app = new_app("The embedded PostgreSQL and Redis.")


@app.command("status")
def services_status(as_json: bool = JsonOpt) -> None:
    """Show the embedded PostgreSQL and Redis (or the configured URLs)."""
    s = settings()
    rows = []
    for svc in embedded.status(s.home):
        configured = s.database_url if svc.name == "postgres" else s.redis_url
        rows.append(
            {
                "name": svc.name,
                "mode": "configured" if configured else "embedded",
                "running": svc.running,
                "pid": svc.pid,
                "url": mask_url(configured) if configured else svc.url,
                "detail": svc.detail,
            }
        )
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        if r["mode"] == "configured":
            out.print(f"{r['name']:<9} configured  {r['url']}")
        else:
            state = f"running (pid {r['pid']})" if r["running"] else "stopped"
            out.print(f"{r['name']:<9} embedded    {state}  {r['url'] or r['detail']}")


@app.command("stop")
def services_stop(as_json: bool = JsonOpt) -> None:
    """Stop the embedded PostgreSQL and Redis under MAILFLOW_HOME."""
    s = settings()
    after = embedded.stop(s.home)
    if as_json:
        emit_json([{"name": x.name, "running": x.running} for x in after])
    else:
        for x in after:
            out.print(f"{x.name:<9} {'still running' if x.running else 'stopped'}")
