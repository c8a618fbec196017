"""Commands room: `mailflow migrate` - apply pending database migrations."""

from __future__ import annotations

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    new_app,
    out,
    runtime,
)
from mailflow.config import mask_url

app = new_app()


@app.command()
def migrate(as_json: bool = JsonOpt) -> None:
    """Apply pending database migrations (safe to run twice, or from two processes)."""
    rt = runtime()
    with rt.connect_owner() as conn:
        done = rt.migrate(conn)
    if as_json:
        emit_json({"applied": done, "database": mask_url(rt.services.database_url)})
    elif done:
        out.print(f"applied {len(done)} migration(s): {', '.join(done)}")
    else:
        out.print("database is up to date")
