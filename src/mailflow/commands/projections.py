"""Commands room: `mailflow projections` - inspect and rebuild projections."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mailflow.commands.base import (
    JsonOpt,
    emit_json,
    err,
    new_app,
    out,
    quiet_logs,
    runtime,
)
from mailflow.consumers.runtime import ConsumerRunner
from mailflow.errors import UsageError
from mailflow.infra.lifecycle import stop_on_signals
from mailflow.runtime.projections import get as get_projection
from mailflow.runtime.wiring import Runtime

app = new_app("Inspect and rebuild projections.")


@app.command("list")
def projections_list(as_json: bool = JsonOpt) -> None:
    """Name, checkpoint, head position and lag (in events) of every projection."""
    from mailflow.runtime.projections import lag

    quiet_logs()
    rows = [r.to_dict() for r in lag(runtime(operator=True))]
    if as_json:
        emit_json(rows)
        return
    table = Table()
    for col in ("name", "checkpoint", "head", "lag", "dead letters", "description"):
        table.add_column(col, justify="right" if col in ("checkpoint", "head", "lag", "dead letters") else "left")
    for r in rows:
        table.add_row(
            str(r["name"]),
            str(r["checkpoint"]),
            str(r["head"]),
            str(r["lag"]),
            str(r["dead_letters"]),
            str(r["description"] or ""),
        )
    out.print(table)


@app.command("rebuild")
def projections_rebuild(
    name: str = typer.Argument(..., help="Projection name (see `mailflow projections list`)."),
    from_position: int = typer.Option(1, "--from", min=1, help="Rewind to this position (default: from scratch)."),
    as_json: bool = JsonOpt,
) -> None:
    """Undo and re-apply events from PostgreSQL, with a progress bar."""
    from mailflow.runtime.projections import inline_projections

    quiet_logs()
    rt = runtime(operator=True)  # a projection holds every tenant's rows
    if name in inline_projections():
        _rebuild_inline(rt, name, from_position, as_json)
        return
    runner = ConsumerRunner(get_projection(name), rt.store, rt.services.redis_url, rt.settings)
    stop_on_signals(runner.stop)
    started = datetime.now(UTC)
    try:
        if as_json:
            applied = runner.rebuild(from_position)
        else:
            with Progress(
                TextColumn(f"rebuilding {name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            ) as bar:
                task = bar.add_task("rebuild", total=None)
                first: list[int] = []

                def progress(pos: int, upto: int) -> None:
                    if not first:
                        first.append(pos)
                    bar.update(task, total=max(upto - from_position + 1, 1), completed=pos - from_position + 1)

                applied = runner.rebuild(from_position, progress)
        checkpoint = runner.checkpoint()
    finally:
        runner.close()
    seconds = (datetime.now(UTC) - started).total_seconds()
    result = {
        "projection": name,
        "from": from_position,
        "applied": applied,
        "checkpoint": checkpoint,
        "dead_lettered": runner.dead_lettered,
        "seconds": round(seconds, 3),
        "interrupted": runner.stop.is_set(),
    }
    if as_json:
        emit_json(result)
    else:
        out.print(
            f"rebuilt {name}: {applied} event(s) applied, checkpoint {checkpoint}, "
            f"{runner.dead_lettered} dead-lettered, {seconds:.1f} s"
            + (" (interrupted)" if runner.stop.is_set() else "")
        )
    if runner.stop.is_set():
        raise typer.Exit(130)


def _rebuild_inline(rt: Runtime, name: str, from_position: int, as_json: bool) -> None:
    from mailflow.runtime.projections import inline_projections

    if from_position > 1:
        raise UsageError(f"{name} is an inline projection: it is rebuilt from scratch (drop --from)")
    projection = inline_projections()[name]
    started = datetime.now(UTC)
    if as_json:
        applied = projection.rebuild(rt.store)
    else:
        with Progress(
            TextColumn(f"rebuilding {name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err
        ) as bar:
            task = bar.add_task("rebuild", total=None)
            applied = projection.rebuild(rt.store, lambda pos, upto: bar.update(task, completed=pos, total=upto))
    seconds = (datetime.now(UTC) - started).total_seconds()
    if as_json:
        emit_json({"projection": name, "from": 1, "applied": applied, "seconds": round(seconds, 3), "inline": True})
    else:
        out.print(f"rebuilt {name}: {applied} event(s) replayed into {', '.join(projection.tables)}, {seconds:.1f} s")
