"""Commands room: `mailflow stats` - delivery numbers over time, from the hourly aggregates.

The same numbers as the dashboard's (projectors/analytics.summary and headline): a message
is sent once however many attempts it took; opens and clicks are unique human ones.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import typer
from rich.table import Table

from mailflow.commands.base import JsonOpt, emit_json, new_app, out, parse_since, parse_until, quiet_logs, runtime
from mailflow.errors import UsageError
from mailflow.outbound import campaigns
from mailflow.projectors import analytics

app = new_app()

SPARKS = "▁▂▃▄▅▆▇█"
DEFAULT_SINCE = {"hour": timedelta(hours=24), "day": timedelta(days=30), "month": timedelta(days=365)}
COLUMNS = (
    ("sent", "sent"),
    ("delivered", "deliv"),
    ("deferred", "defer"),
    ("bounced", "bounce"),
    ("complained", "compl"),
    ("replied", "reply"),
    ("opened", "opens"),
    ("clicked", "clicks"),
)


def sparkline(values: list[int]) -> str:
    """One block character per value, scaled to the largest; a space for zero."""
    top = max(values, default=0)
    if top <= 0:
        return " " * len(values)
    return "".join(" " if v <= 0 else SPARKS[min(len(SPARKS) - 1, (v * len(SPARKS) - 1) // top)] for v in values)


def _label(b: datetime, by: str) -> str:
    b = b.astimezone(UTC)
    return {"hour": f"{b:%m-%d %H}:00", "day": f"{b:%Y-%m-%d}", "month": f"{b:%Y-%m}"}[by]


@app.command("stats")
def stats(
    campaign: str | None = typer.Option(None, "--campaign", help="A campaign's id or name."),
    sender: str | None = typer.Option(None, "--sender", help="A sender's name."),
    domain: str | None = typer.Option(None, "--domain", help="A recipient domain (example.com)."),
    since: str | None = typer.Option(
        None, "--since", help="From (2026-11-30, 24h, 7d); default 24h, 30d or 365d by --by."
    ),
    until: str | None = typer.Option(None, "--until", help="Up to (default: now)."),
    by: str = typer.Option("hour", "--by", help="Bucket: hour, day or month."),
    all_tenants: bool = typer.Option(False, "--all-tenants", help="Every tenant's numbers together (operator)."),
    as_json: bool = JsonOpt,
) -> None:
    """Sent, delivered, deferred, bounced, complaints, replies, opens and clicks per bucket, with
    totals and a sparkline of deliveries. Buckets are whole UTC hours, days or months."""
    quiet_logs()
    if by not in DEFAULT_SINCE:
        raise UsageError(f"--by {by!r}: use hour, day or month")
    now = datetime.now(UTC)
    start = parse_since(since) if since else now - DEFAULT_SINCE[by]
    end = parse_until(until) if until else now
    rt = runtime(operator=all_tenants)
    with rt.connect() as conn:
        campaign_id = campaigns.find(conn, campaign) if campaign else None
        got = analytics.summary(
            conn,
            analytics.Filter(
                start, end, campaign=campaign_id, sender=sender, domain=domain.lower() if domain else None
            ),
            by,  # type: ignore[arg-type]
        )
    if as_json:
        emit_json({**got.to_dict(), "filter": {"campaign": campaign_id, "sender": sender, "domain": domain}})
        return
    render_dict(got.to_dict())


def render_dict(got: dict[str, Any]) -> None:
    """The table of a summary's JSON form (analytics.Summary.to_dict(): this command's --json,
    the demo's `stats`), in 80 columns: the busiest buckets when there are more than fit."""
    by = got["by"]
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 0, 0, 1))
    table.add_column(by, no_wrap=True)
    for _, title in COLUMNS:
        table.add_column(title, justify="right", no_wrap=True)
    rows = [(datetime.fromisoformat(b["start"]), b) for b in got["buckets"]]
    shown = [r for r in rows if any(r[1][k] for k, _ in COLUMNS)] or rows[-1:]
    for b, h in shown[-48:]:
        table.add_row(_label(b, by), *(f"{h[k]:,}" for k, _ in COLUMNS))
    totals = got["totals"]
    table.add_row("total", *(f"{totals[k]:,}" for k, _ in COLUMNS), style="bold")
    out.print(table)
    delivered = [h["delivered"] for _, h in rows]
    room = 80 - len(f"delivered per {by}, last {len(delivered)}: ")
    spark = delivered[-room:]
    if any(spark):
        out.print(f"\ndelivered per {by}, last {len(spark)}: {sparkline(spark)}", markup=False)
    else:
        out.print(f"\nnothing delivered in these {len(delivered)} {by}s", markup=False)
    sent = totals["sent"]
    if sent:
        rates = (
            f"bounce rate {100 * totals['bounced'] / sent:.1f}%, "
            f"complaint rate {100 * totals['complained'] / max(totals['delivered'], 1):.2f}%"
        )
        latency = got.get("delivered_latency_ms_avg")
        lat = f", time to deliver {latency / 1000:.1f}s on average" if latency is not None else ""
        out.print(rates + lat, markup=False)
    if len(shown) > 48:
        out.print(f"({len(shown) - 48} earlier {by}s with activity not shown; --json has them all)", markup=False)
