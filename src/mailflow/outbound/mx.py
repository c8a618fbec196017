"""Outbound room: direct delivery - which SMTP servers take mail for a recipient's domain.

A sender whose relay is direct:// hands each message to the recipient domain's mail
exchangers (RFC 5321 section 5.1): MX hosts by preference, equal preferences in random order,
the domain itself when it has an address but no MX, and no delivery at all for a null MX
(RFC 7505) or a domain that does not exist. Answers are cached for their TTL, and one lookup
serves every message waiting for the same domain. MAILFLOW_DNS_SERVERS replaces the system's
resolvers; MAILFLOW_MX_OVERRIDES maps domains (or "*") to host:port, like a transport
table: for staging, split routing and tests.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mailflow.errors import ConfigurationError
from mailflow.mail.dns import nameserver_address, split_host_port

MIN_TTL_S = 60.0
MAX_TTL_S = 3600.0
FAILED_LOOKUP_TTL_S = 30.0  # a temporary DNS failure is asked again after this long


class NoRoute(Exception):
    """The domain takes no mail: no such domain, no address, or a null MX. Permanent."""


class LookupFailed(Exception):
    """DNS did not answer (timeout, SERVFAIL): try the message again later."""


@dataclass(frozen=True)
class MxRecord:
    preference: int
    host: str


def delivery_hosts(
    domain: str, records: list[MxRecord] | None, has_address: bool, rnd: random.Random | None = None
) -> list[str]:
    """The hosts to try, in order, from a domain's MX answer (None: the domain has no MX)."""
    if records is None:
        if has_address:
            return [domain]  # the implicit MX
        raise NoRoute(f"{domain} has no MX and no address records")
    hosts = [r for r in records if r.host not in ("", ".")]
    if not hosts:
        raise NoRoute(f"{domain} does not accept mail (null MX)")
    shuffled = list(hosts)
    (rnd or random).shuffle(shuffled)  # spread load over equal preferences
    return list(dict.fromkeys(r.host for r in sorted(shuffled, key=lambda r: r.preference)))


Route = list[tuple[str, "int | None"]]  # (host, port); None: the relay's port


def parse_overrides(overrides: dict[str, str]) -> dict[str, Route]:
    """{"example.net": "127.0.0.1:2525", "*": "smtp.internal"} -> hosts and ports to use."""
    out: dict[str, Route] = {}
    for domain, target in overrides.items():
        try:
            out[domain.lower()] = [split_host_port(item) for item in str(target).split(",")]
        except ValueError as exc:
            raise ConfigurationError(
                f"bad setting MAILFLOW_MX_OVERRIDES: {domain!r}: {target!r} is not host[:port][,host[:port]...]"
            ) from exc
    return out


class MxResolver:
    """Cached, single-flight MX lookups for the worker's event loop."""

    def __init__(
        self, overrides: dict[str, str] | None = None, timeout_s: float = 10.0, nameservers: list[str] | None = None
    ) -> None:
        self.timeout_s = timeout_s
        # bad ones fail at start
        self.nameservers = [dns.nameserver.Do53Nameserver(*nameserver_address(ns)) for ns in nameservers or []]
        self.overrides = parse_overrides(overrides or {})
        self._cache: dict[str, tuple[float, Route | Exception]] = {}
        self._pending: dict[str, asyncio.Future] = {}
        self._resolver: dns.asyncresolver.Resolver | None = None

    async def hosts(self, domain: str) -> Route:
        """(host, port) pairs to try in order (port None: the relay's); NoRoute or LookupFailed otherwise."""
        domain = domain.lower().rstrip(".")
        fixed = self.overrides.get(domain) or self.overrides.get("*")
        if fixed:
            return fixed
        hit = self._cache.get(domain)
        if hit is not None and hit[0] > time.monotonic():
            if isinstance(hit[1], Exception):
                raise hit[1]
            return hit[1]
        pending = self._pending.get(domain)
        if pending is None:
            pending = self._pending[domain] = asyncio.ensure_future(self._lookup(domain))
            pending.add_done_callback(lambda _f: self._pending.pop(domain, None))
        return await asyncio.shield(pending)

    async def _lookup(self, domain: str) -> Route:
        try:
            records, ttl = await self._mx(domain)
            has_address = records is not None or await self._has_address(domain)
            hosts: Route = [(h, None) for h in delivery_hosts(domain, records, has_address)]
        except NoRoute as exc:
            self._cache[domain] = (time.monotonic() + MIN_TTL_S, exc)
            raise
        except LookupFailed as exc:
            self._cache[domain] = (time.monotonic() + FAILED_LOOKUP_TTL_S, exc)
            raise
        self._cache[domain] = (time.monotonic() + min(max(ttl, MIN_TTL_S), MAX_TTL_S), hosts)
        return hosts

    def _dns(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            resolver = dns.asyncresolver.Resolver(configure=not self.nameservers)
            if self.nameservers:
                resolver.nameservers = self.nameservers
            self._resolver = resolver
        return self._resolver

    async def _mx(self, domain: str) -> tuple[list[MxRecord] | None, float]:
        try:
            answer = await self._dns().resolve(domain, "MX", lifetime=self.timeout_s)
        except dns.resolver.NXDOMAIN as exc:
            raise NoRoute(f"domain {domain} does not exist") from exc
        except dns.resolver.NoAnswer:
            return None, MIN_TTL_S
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.NoResolverConfiguration) as exc:
            raise LookupFailed(f"MX lookup for {domain} failed: {exc}") from exc
        records = [MxRecord(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        return records, float(answer.rrset.ttl if answer.rrset is not None else MIN_TTL_S)

    async def _has_address(self, domain: str) -> bool:
        for rdtype in ("A", "AAAA"):
            try:
                await self._dns().resolve(domain, rdtype, lifetime=self.timeout_s)
                return True
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.NoResolverConfiguration) as exc:
                raise LookupFailed(f"address lookup for {domain} failed: {exc}") from exc
        return False
