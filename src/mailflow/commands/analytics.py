"""Commands room: `mailflow analytics` - aggregate now, or rebuild the aggregates from the raw facts."""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mailflow.commands.base import JsonOpt, emit_json, err, new_app, out, parse_since, quiet_logs, runtime
from mailflow.projectors import analytics

app = new_app("Analytics: the hourly, daily and monthly aggregates of the facts.")


def _with_progress(what: str, as_json: bool, work: Callable[[analytics.ProgressFn | None], analytics.Aggregated]):
    if as_json:
        return work(None)
    with Progress(
        TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("hours"), TimeRemainingColumn(), console=err
    ) as bar:
        task = bar.add_task(what, total=None)
        return work(lambda done, total: bar.update(task, completed=done, total=total))


def _report(done: analytics.Aggregated, as_json: bool) -> None:
    if as_json:
        emit_json(
            {"hours": done.hours, "rows": done.rows, "seconds": round(done.seconds, 3), "left_dirty": done.left_dirty}
        )
        return
    left = f"; {done.left_dirty} got new facts meanwhile (the next run takes them)" if done.left_dirty else ""
    out.print(f"aggregated {done.hours} hour(s) into {done.rows} row(s) in {done.seconds:.1f}s{left}", markup=False)


@app.command("aggregate")
def aggregate_cmd(as_json: bool = JsonOpt) -> None:
    """Aggregate every dirty hour that has ended now (what the hourly `aggregate` job does)."""
    quiet_logs()
    rt = runtime(operator=True)  # the aggregates hold every tenant's numbers
    _report(
        _with_progress("aggregating", as_json, lambda p: analytics.aggregate(rt.store.pool.connection, progress=p)),
        as_json,
    )


@app.command("rebuild")
def rebuild_cmd(
    since: str | None = typer.Option(None, "--since", help="From (2026-11-01, 7d); default: every hour there is."),
    as_json: bool = JsonOpt,
) -> None:
    """Re-aggregate from the raw facts, with a progress bar: the aggregates then equal what the
    hourly jobs made (the facts themselves are rebuilt with `mailflow projections rebuild facts`)."""
    quiet_logs()
    start = parse_since(since) if since else None
    rt = runtime(operator=True)
    done = _with_progress(
        "re-aggregating", as_json, lambda p: analytics.rebuild(rt.store.pool.connection, since=start, progress=p)
    )
    _report(done, as_json)
