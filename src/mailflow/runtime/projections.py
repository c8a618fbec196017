"""Runtime room: every projection mailflow knows, by name - the inline ones each room registers
on the write path, and the consumer-group ones (built in, or from installed packages)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import mailflow.inbound
import mailflow.outbound
import mailflow.tenants  # noqa: F401 - registers the tenants inline projection
from mailflow.consumers.dlq import DeadLetters
from mailflow.consumers.inline import InlineProjection, registered
from mailflow.consumers.runtime import checkpoints
from mailflow.projectors import available, get

__all__ = ["ProjectionLag", "available", "get", "inline_projections", "lag"]


def inline_projections() -> dict[str, InlineProjection]:
    return registered()


@dataclass(frozen=True)
class ProjectionLag:
    """Where a projection stands against the head of the log."""

    name: str
    description: str
    checkpoint: int
    head: int
    lag: int  # events
    dead_letters: int
    updated_at: datetime | None
    inline: bool  # kept current by the writing transaction itself (never behind)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["updated_at"] = self.updated_at.isoformat() if self.updated_at else None
        return d


def lag(rt: Any) -> list[ProjectionLag]:
    """Every projection (inline ones first), with its checkpoint, lag and open dead letters."""
    rt.store.sequence(wait=False)
    head = rt.store.head()
    with rt.connect() as conn:
        cps = checkpoints(conn)
        dead = DeadLetters(conn, rt.store, rt.redis, rt.keys).open_counts()
    rows = [ProjectionLag(p.name, p.description, head, head, 0, 0, None, True) for p in inline_projections().values()]
    known = available()
    for name in sorted(set(known) | set(cps)):
        cp, updated = cps.get(name, (0, None))
        description = known[name].description if name in known else "(not installed here)"
        rows.append(
            ProjectionLag(
                name,
                description,
                cp,
                head,
                head - cp,
                int(dead.get(name, 0)),
                updated if isinstance(updated, datetime) else None,
                False,
            )
        )
    return rows
