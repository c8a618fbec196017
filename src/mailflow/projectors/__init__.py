"""Projectors room: read models rebuilt from events, and the list of known projections.

Projections are found by name: the built-in ones below, plus any installed package that
declares an entry point in the `mailflow.projections` group (a Projection subclass).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from mailflow.consumers.projection import Projection
from mailflow.errors import NotFoundError
from mailflow.projectors.event_counts import EventCounts
from mailflow.projectors.facts import Facts

BUILTIN: dict[str, type[Projection]] = {EventCounts.name: EventCounts, Facts.name: Facts}


def available() -> dict[str, type[Projection]]:
    found = dict(BUILTIN)
    for ep in entry_points(group="mailflow.projections"):
        found.setdefault(ep.name, ep.load())
    return found


def get(name: str) -> Projection:
    known = available()
    if name not in known:
        raise NotFoundError(f"unknown projection {name!r}; known: {', '.join(sorted(known))}")
    return known[name]()
