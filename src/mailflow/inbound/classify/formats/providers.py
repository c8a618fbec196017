"""Inbound room, classification: what some providers' bounces mean beyond their words - a
report whose text names the service decides the reason the generic patterns cannot."""

from __future__ import annotations

import re

# (the service's signature in the report's text, the reasons it overrides, the reason it means)
_SERVICES: tuple[tuple[re.Pattern[str], frozenset[str], str], ...] = (
    # A mailing list refusing a post: the group is missing or the sender may not post to it.
    (
        re.compile(r"^\s*Google Groups\s*$|groups\.google\.com|googlegroups\.com/", re.MULTILINE),
        frozenset({"undefined", "userunknown"}),
        "rejected",
    ),
)


def reason(notes: str, found: str) -> str:
    for signature, overrides, meant in _SERVICES:
        if found in overrides and signature.search(notes):
            return meant
    return found
