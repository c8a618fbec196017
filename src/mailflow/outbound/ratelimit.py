"""Outbound room: token buckets per (sender, recipient domain).

Pure bookkeeping: the queuer asks how many messages it may release now for a key and
takes that many tokens. Limits come from configuration, with stricter defaults for the
big mailbox providers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_LIMITS_PER_S: dict[str, float] = {
    "*": 50.0,
    "gmail.com": 20.0,
    "googlemail.com": 20.0,
    "outlook.com": 20.0,
    "hotmail.com": 20.0,
    "yahoo.com": 20.0,
}


@dataclass
class Bucket:
    rate: float  # tokens per second
    burst: float  # bucket size
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now


@dataclass
class RateLimiter:
    limits: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LIMITS_PER_S))
    burst_seconds: float = 1.0
    _buckets: dict[tuple[str, str], Bucket] = field(default_factory=dict)

    def rate_for(self, domain: str) -> float:
        return self.limits.get(domain.lower(), self.limits.get("*", 50.0))

    def _bucket(self, sender: str, domain: str, now: float) -> Bucket:
        key = (sender, domain.lower())
        b = self._buckets.get(key)
        if b is None:
            rate = self.rate_for(domain)
            burst = max(1.0, rate * self.burst_seconds)
            b = self._buckets[key] = Bucket(rate, burst, burst, now)
        b.refill(now)
        return b

    def available(self, sender: str, domain: str, now: float) -> int:
        return int(self._bucket(sender, domain, now).tokens)

    def take(self, sender: str, domain: str, n: int, now: float) -> int:
        """Take up to n tokens; returns how many were granted."""
        b = self._bucket(sender, domain, now)
        granted = min(n, int(b.tokens))
        b.tokens -= granted
        return granted
