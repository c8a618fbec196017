"""Commands room: `mailflow queues` - queue depth, waiting work and latency vs SLA per priority,
and the periodic duties (aggregation, cleanup, DNS checks) against their SLA."""

from __future__ import annotations

from rich.table import Table

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    new_app,
    out,
    quiet_logs,
    runtime,
)
from mailflow.outbound import views

app = new_app()


def duration(seconds: float | None) -> str:
    """A short duration: 0.42s, 12.3s, 4m05s, 2h03m; '-' for none."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds.is_integer() else f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def sla_line(s: views.QueueStats) -> str:
    """One priority's verdict and what it rests on, in 80 columns."""
    verdict = {None: "-", True: "ok", False: "MISSED"}[s.within_sla]
    if s.within_sla is None:
        why = "nothing waiting, nothing sent in the last hour"
    else:
        why = (
            f"oldest waiting {duration(s.oldest_waiting_s)}, "
            f"p99 {duration(s.latency_p99_s)} (p50 {duration(s.latency_p50_s)})"
        )
    return f"{s.priority:<8}  SLA {duration(s.sla_s):<5}  {verdict:<6}  {why}"


@app.command("queues")
def queues(as_json: bool = JsonOpt) -> None:
    """Per priority: stream depth and jobs by state, then the SLA verdict: met when the oldest
    waiting job (pending, queued or retry) and the last hour's p99 latency (created -> accepted)
    are both within the SLA."""
    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        stats = views.queue_stats(conn, rt.redis, rt.keys)
    op = runtime(operator=True)  # the duties belong to no tenant
    with op.connect() as conn:
        duties = views.duty_stats(conn)
    if as_json:
        rows = [s.to_dict() for s in stats]
        for row in rows:  # the duties run from the low queue (a list per priority, as before)
            row["duties"] = [d.to_dict() for d in duties if d.priority == row["priority"]]
        emit_json(rows)
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="", padding=(0, 0, 0, 2))
    columns = ("priority", "stream", "pending", "retry", "queued", "active", "completed", "failed")
    for col in columns:
        table.add_column(col, justify="left" if col == "priority" else "right", no_wrap=True)
    for s in stats:
        table.add_row(s.priority, *(str(getattr(s, c)) for c in ("stream_depth", *columns[2:])))
    out.print(table)
    out.print()
    for s in stats:
        out.print(sla_line(s), markup=False)
    if duties:
        out.print()
        for d in duties:
            out.print(duty_line(d), markup=False)


def duty_line(d: views.DutyStats) -> str:
    """A periodic duty on one line of 80 columns: schedule, next run, last run vs its SLA."""
    verdict = {None: "-", True: "ok", False: "MISSED"}[d.within_sla]
    nxt = f"next {d.next_due:%H:%M}" if d.enabled else "disabled"
    last = "never ran" if d.last_due is None else f"last {d.last_state or 'gone'}"
    return (
        f"{d.name:<10} {d.priority} every {duration(d.every_s):<6} SLA {duration(d.sla_s)} {verdict:<6} {nxt}, {last}"
    )
