"""Runtime room: every projection mailflow knows, by name - the inline ones each room registers
on the write path, and the consumer-group ones (built in, or from installed packages)."""

from __future__ import annotations

import mailflow.outbound  # noqa: F401 - registers the outbound inline projections
from mailflow.consumers.inline import InlineProjection, registered
from mailflow.projectors import available, get

__all__ = ["available", "get", "inline_projections"]


def inline_projections() -> dict[str, InlineProjection]:
    return registered()
