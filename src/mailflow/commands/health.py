"""Commands room: `mailflow health` - long-running processes on this host and their servers."""

from __future__ import annotations

import typer
from rich.table import Table

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    new_app,
    out,
    settings,
)
from mailflow.infra.health import read_statuses, status_dir

app = new_app()


@app.command()
def health(as_json: bool = JsonOpt) -> None:
    """Long-running mailflow processes on this host, and whether each has PostgreSQL and Redis.

    Read from the status files they keep under MAILFLOW_HOME/run, so it answers while the
    servers are down. Exit code 0 when every process runs with both servers, 1 otherwise.
    """
    s = settings()
    rows = read_statuses(s.home)
    if as_json:
        emit_json(rows)
    elif not rows:
        out.print(f"no mailflow process has published a status under {status_dir(s.home)}", markup=False)
    else:
        table = Table(box=None, pad_edge=False)
        for col in ("process", "state", "pid", "postgres", "redis", "since"):
            table.add_column(col, no_wrap=col != "since")
        for st in rows:
            services = st.get("services", {})

            def cell(svc: str) -> str:
                info = services.get(svc) or {}
                if not st["alive"]:
                    return "-"
                return "ok" if info.get("ok") else f"down {info.get('down_s', '?')} s"

            table.add_row(
                f"{st['role']}-{st['name']}"[:32],
                st["state"],
                str(st.get("pid", "")),
                cell("postgres"),
                cell("redis"),
                str(st.get("started_at", ""))[:19],
            )
        out.print(table)
    if not rows or any(not st["alive"] or st["state"] != "running" for st in rows):
        raise typer.Exit(1)
