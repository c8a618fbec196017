"""Projectors room: the one definition of the counters - from facts or aggregate rows to the
numbers every reader shows (`mailflow stats`, the dashboard, the live deltas).

A row has a kind and its measures: n (every fact), human (not flagged as machine), uniq (human
firsts: projectors/facts.py), latency_ms_sum and latency_n.
"""

from __future__ import annotations

from typing import Any


def counters(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The dashboard's and `mailflow stats`'s counters from series rows: one definition.

    A kind's count is its human total; `<kind>_unique` the human firsts; machine opens and
    clicks are counted apart."""
    out: dict[str, int] = {}
    for r in rows:
        kind = r["kind"]
        out[kind] = out.get(kind, 0) + int(r["human"])
        out[f"{kind}_unique"] = out.get(f"{kind}_unique", 0) + int(r["uniq"])
        if kind in ("opened", "clicked"):
            key = "machine_opens" if kind == "opened" else "machine_clicks"
            out[key] = out.get(key, 0) + int(r["n"]) - int(r["human"])
        if kind == "delivered" and r["latency_n"]:
            out["latency_ms_sum"] = out.get("latency_ms_sum", 0) + int(r["latency_ms_sum"])
            out["latency_n"] = out.get("latency_n", 0) + int(r["latency_n"])
    return out


def cards(c: dict[str, int]) -> dict[str, int]:
    """The counters of the page's cards from analytics.counters()."""
    return {
        "sent": c.get("sent_unique", 0),
        "delivered": c.get("delivered", 0),
        "deferred": c.get("deferred_unique", 0),
        "failed": c.get("failed", 0),
        "bounced": c.get("bounced_hard", 0) + c.get("bounced_soft", 0),
        "complained": c.get("complained", 0),
        "replied": c.get("replied", 0),
        "auto_replied": c.get("auto_replied", 0),
        "unsubscribed": c.get("unsubscribed", 0),
        "opened": c.get("opened", 0),
        "opened_unique": c.get("opened_unique", 0),
        "clicked": c.get("clicked", 0),
        "clicked_unique": c.get("clicked_unique", 0),
        "machine_opens": c.get("machine_opens", 0),
        "machine_clicks": c.get("machine_clicks", 0),
    }
