"""Outbound room: the job state machine - the only transitions a job may make.

pending -> queued -> active -> completed | failed | retry, and retry -> queued when due.
Each transition is recorded as an event; this module decides which ones are legal.
"""

from __future__ import annotations

from enum import StrEnum

from ..errors import MailflowError


class JobState(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    RETRY = "retry"


class Priority(StrEnum):
    """high = transactional (SLA 30 s), normal = campaign (5 min), low = analytics/cleanup (1 h)."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


SLA_SECONDS: dict[Priority, float] = {Priority.HIGH: 30.0, Priority.NORMAL: 300.0, Priority.LOW: 3600.0}

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.QUEUED}),
    JobState.QUEUED: frozenset({JobState.ACTIVE}),
    JobState.ACTIVE: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.RETRY}),
    JobState.RETRY: frozenset({JobState.QUEUED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
}

TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED})


class IllegalTransition(MailflowError):
    def __init__(self, job_id: str, current: JobState, target: JobState) -> None:
        super().__init__(f"job {job_id} cannot go from {current} to {target}")
        self.current = current
        self.target = target


def check_transition(job_id: str, current: JobState, target: JobState) -> None:
    if target not in ALLOWED[current]:
        raise IllegalTransition(job_id, current, target)


def can_transition(current: JobState, target: JobState) -> bool:
    return target in ALLOWED[current]
