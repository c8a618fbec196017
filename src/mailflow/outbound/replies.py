"""Outbound room: what an SMTP reply means for a job, and when to try again.

Pure decisions, no I/O: classify a reply (2xx delivered, 4xx retry, 5xx failed, with the
enhanced status code deciding whether the address is suppressed), and compute the next
retry delay (exponential backoff with full jitter, honouring "try again in N seconds").
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from enum import StrEnum

from mailflow.mail.status import enhanced_code


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"


class FailureKind(StrEnum):
    NONE = ""
    BAD_MAILBOX = "bad_mailbox"  # 5.1.x: the address does not exist -> bounced, suppressed
    MAILBOX_FULL = "mailbox_full"  # 5.2.2 (permanent full mailbox): failed, not suppressed
    POLICY = "policy"  # 5.7.x: rejected for policy/reputation -> failed, not suppressed
    MESSAGE = "message"  # 5.3.x/5.6.x: the message itself (size, content) -> failed
    PERMANENT = "permanent"  # other 5xx
    TRANSIENT = "transient"  # 4xx, timeouts, dropped connections


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    kind: FailureKind
    suppress: bool
    retry_after_s: float | None = None
    enhanced: str | None = None


_HINT = re.compile(
    r"(?:try again|retry|wait)\D{0,20}?(?:in|after)?\s*(\d{1,6})\s*(s|sec|secs|seconds?|m|min|mins|minutes?)\b",
    re.IGNORECASE,
)


def retry_hint_seconds(message: str) -> float | None:
    """'try again in 120 seconds', 'retry after 5 minutes' -> seconds; None if no hint."""
    m = _HINT.search(message or "")
    if not m:
        return None
    n = float(m.group(1))
    return n * 60 if m.group(2).lower().startswith("m") else n


def classify(code: int, message: str = "") -> Verdict:
    """Decide a job's fate from one SMTP reply (the final one of the transaction)."""
    enhanced = enhanced_code(message)
    if 200 <= code < 300:
        return Verdict(Outcome.DELIVERED, FailureKind.NONE, False, enhanced=enhanced)
    if 400 <= code < 500:
        return Verdict(Outcome.RETRY, FailureKind.TRANSIENT, False, retry_hint_seconds(message), enhanced)
    if 500 <= code < 600:
        kind = FailureKind.PERMANENT
        if enhanced:
            _, subject, detail = enhanced.split(".")
            if subject == "1":
                kind = FailureKind.BAD_MAILBOX
            elif subject == "2" and detail == "2":
                kind = FailureKind.MAILBOX_FULL
            elif subject == "7":
                kind = FailureKind.POLICY
            elif subject in ("3", "6"):
                kind = FailureKind.MESSAGE
        elif code in (550, 551, 553) and re.search(
            r"(no such|unknown|does not exist|user unknown|invalid recipient|mailbox unavailable)", message, re.I
        ):
            kind = FailureKind.BAD_MAILBOX
        return Verdict(Outcome.FAILED, kind, kind is FailureKind.BAD_MAILBOX, enhanced=enhanced)
    # Anything else (1xx/3xx at the end of a transaction, garbage): treat as transient.
    return Verdict(Outcome.RETRY, FailureKind.TRANSIENT, False, enhanced=enhanced)


def transient(reason: str) -> Verdict:
    """Timeouts, refused or dropped connections: try again later."""
    return Verdict(Outcome.RETRY, FailureKind.TRANSIENT, False, retry_hint_seconds(reason))


@dataclass(frozen=True)
class RetrySchedule:
    """Delay before attempt n+1 = U(0, min(cap, base * factor**n)) ("full jitter").

    The default follows Postal: 5 minutes growing by 1.3 per attempt, 18 attempts in all.
    """

    base_s: float = 300.0
    factor: float = 1.3
    max_attempts: int = 18
    cap_s: float = 6 * 3600.0
    jitter: bool = True

    def delay(self, attempts_made: int, hint_s: float | None = None, rnd: random.Random | None = None) -> float | None:
        """Seconds until the next attempt after `attempts_made` attempts; None = give up."""
        if attempts_made >= self.max_attempts:
            return None
        ceiling = min(self.cap_s, self.base_s * self.factor ** max(attempts_made - 1, 0))
        delay = (rnd or random).uniform(0, ceiling) if self.jitter else ceiling
        if hint_s is not None:
            delay = max(delay, min(hint_s, self.cap_s))
        return delay
