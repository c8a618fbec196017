"""Infra room: the one registry of PostgreSQL advisory-lock keys.

Every advisory lock mailflow takes has its key here, so two rooms can never pick the same
number by accident. Keys are constant across versions: a process of the previous release
must contend for the same lock as one of this release during a rolling upgrade.
"""

from __future__ import annotations

from typing import Final


class Lock:
    """Plain ints (not an enum: psycopg would send an enum member's name)."""

    MIGRATIONS: Final = 7_300_001  # session lock around `mailflow migrate`
    SEQUENCER: Final = 7_300_002  # one sequencer assigns positions at a time
    RELAY: Final = 7_300_003  # relay leader
    QUEUER: Final = 7_300_010  # queuer leader
    INLINE: Final = 7_300_020  # inline read-model writers (shared) against their rebuild (exclusive)
    ADDRESS: Final = 7_300_030  # class of per-address locks (second key: hashtext(address))
    CAMPAIGN_NAME: Final = 7_300_031  # class of per-name locks for creating campaigns (second key: hashtext(name))
    THREADS: Final = 7_300_040  # class of per-tenant locks of the threads projection (second key: hashtext(tenant))
