"""Commands room: `mailflow queues` - queue depth, age and SLA per priority."""

from __future__ import annotations


from rich.table import Table

from mailflow.commands.base import (
    new_app,
    JsonOpt, emit_json, out, quiet_logs, runtime,
)
from mailflow.outbound.queuer import queue_stats

app = new_app()


@app.command("queues")
def queues(as_json: bool = JsonOpt) -> None:
    """Per priority: stream depth, jobs by state, oldest unfinished, p50/p99 latency (pending -> accepted) vs SLA."""
    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        rows = queue_stats(conn, rt.redis, rt.keys)
    if as_json:
        emit_json(rows)
        return
    table = Table()
    for col in ("priority", "depth", "pending", "retry", "queued", "active", "completed", "failed", "oldest", "p50", "p99", "SLA"):
        table.add_column(col, justify="left" if col == "priority" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.2f}s"  # noqa: E731
    for r in rows:
        sla = f"{r['sla_s']:.0f}s " + ("" if r["within_sla"] is None else ("ok" if r["within_sla"] else "MISSED"))
        table.add_row(r["priority"], str(r["stream_depth"]), str(r["pending"]), str(r["retry"]), str(r["queued"]),
                      str(r["active"]), str(r["completed"]), str(r["failed"]), fmt(r["oldest_unfinished_s"]),
                      fmt(r["latency_p50_s"]), fmt(r["latency_p99_s"]), sla)
    out.print(table)
