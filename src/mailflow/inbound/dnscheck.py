"""Inbound room: whether a domain's mail comes here - the MX lookups of `mailflow domains check`,
the MX record to publish, and, as information, whether the domain publishes SPF and DMARC.

`judge()` is the decision (DNS answers in, a verdict out) and needs no network; `check()` is
the shell that asks DNS (MAILFLOW_DNS_SERVERS when set, else the system's resolvers) about
every domain at once, each question bounded by the timeout, and never raises for what DNS
said. An MX host is this host when its name is the inbound hostname (MAILFLOW_INBOUND_HOSTNAME,
else the FQDN: the name `mailflow inbound` greets with), or when one of its addresses is one
of this host's. This host's addresses are what it can learn cheaply: its hostname's own A and
AAAA records and the listening address when that is a public one. The machine's interfaces
are not enumerated (behind NAT they are not the addresses an MX names anyway).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mailflow.mail.dns import nameserver_address

MX_PREFERENCE = 10  # the preference of the record to publish
CONCURRENCY = 32  # DNS questions in flight at once


def name_of(raw: str) -> str:
    """A host or domain name as compared: lower case, without the final dot."""
    return raw.strip().rstrip(".").lower()


def hostname(configured: str | None) -> str:
    """The name MX records should point at: MAILFLOW_INBOUND_HOSTNAME, else this machine's FQDN."""
    return name_of(configured or socket.getfqdn())


def mx_record(domain: str, host: str) -> str:
    """The record to publish for `domain`, in zone-file form: `example.org. MX 10 mx.example.net.`"""
    return f"{name_of(domain)}. MX {MX_PREFERENCE} {name_of(host)}."


class Status(StrEnum):
    OK = "ok"  # an MX host is this host
    WRONG = "wrong"  # the MX records name other hosts only
    MISSING = "missing"  # no such domain, no MX record, or a null MX
    TEMPERROR = "temperror"  # DNS did not answer (timeout, SERVFAIL): ask again later


class Outcome(StrEnum):
    ANSWER = "answer"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"  # the name exists, without records of the type asked
    TEMPERROR = "temperror"


class Presence(StrEnum):
    PRESENT = "present"
    ABSENT = "absent"
    UNKNOWN = "unknown"  # DNS did not answer


@dataclass(frozen=True)
class Lookup:
    """What one DNS question got: the records as text (an MX as `10 mx.example.net.`, a TXT
    record's strings joined, an address), or why there are none (`error` says it for a temperror)."""

    outcome: Outcome
    records: tuple[str, ...] = ()
    error: str = ""

    @classmethod
    def answer(cls, *records: str) -> Lookup:
        return cls(Outcome.ANSWER, records) if records else cls(Outcome.NODATA)


@dataclass(frozen=True)
class ThisHost:
    """The host an MX should name: its name, and the addresses it is known by."""

    name: str
    addresses: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Verdict:
    domain: str
    status: Status
    detail: str  # one phrase for the operator: what was found
    mx: tuple[tuple[int, str], ...] = ()  # the MX records, by preference
    here: str | None = None  # the MX host that is this host
    spf: Presence = Presence.UNKNOWN
    dmarc: Presence = Presence.UNKNOWN

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "status": str(self.status),
            "detail": self.detail,
            "mx": [{"preference": p, "host": h} for p, h in self.mx],
            "here": self.here,
            "spf": str(self.spf),
            "dmarc": str(self.dmarc),
        }


# -- the decision (pure) ------------------------------------------------------------------------


def mx_records(lookup: Lookup) -> list[tuple[int, str]]:
    """An MX answer's (preference, host), by preference then name; a null MX's host is ""."""
    found = []
    for text in lookup.records if lookup.outcome is Outcome.ANSWER else ():
        preference, _, host = text.strip().partition(" ")
        if preference.isdigit():
            found.append((int(preference), name_of(host)))
    return sorted(found)


def mail_hosts(lookup: Lookup) -> list[str]:
    """The hosts an MX answer sends mail to, by preference (a null MX names none)."""
    return list(dict.fromkeys(h for _, h in mx_records(lookup) if h))


def presence(lookup: Lookup, version: str) -> Presence:
    """Whether a TXT answer holds a record of `version` (`v=spf1`, `v=DMARC1`), in any letter case."""
    if lookup.outcome is Outcome.TEMPERROR:
        return Presence.UNKNOWN
    tagged = re.compile(rf"\s*{re.escape(version)}(?:$|[\s;])", re.IGNORECASE)
    return Presence.PRESENT if any(tagged.match(t) for t in lookup.records) else Presence.ABSENT


def _ips(values: Iterable[str]) -> set[str]:
    out = set()
    for v in values:
        try:
            out.add(ipaddress.ip_address(v.strip()).compressed)
        except ValueError:
            continue
    return out


def judge(
    domain: str,
    mx: Lookup,
    host: ThisHost,
    addresses: Mapping[str, Lookup] | None = None,
    *,
    spf: Lookup | None = None,
    dmarc: Lookup | None = None,
) -> Verdict:
    """Does mail for `domain` come to `host`, from its MX answer, the addresses of its MX hosts
    (those looked up: A and AAAA together), and its TXT and `_dmarc.` TXT answers (None: not
    asked, so unknown)?

    ok when some MX host is this host (by name, or by an address of this host's); wrong when
    the MX hosts are all elsewhere; missing for no such domain, no MX record or a null MX
    (RFC 7505: the domain takes no mail); temperror when DNS did not answer, or when an MX
    host's address could not be looked up and no other host matched."""
    status, detail, records, here = _mx_verdict(mx, host, addresses or {})
    return Verdict(
        domain=name_of(domain),
        status=status,
        detail=detail,
        mx=records,
        here=here,
        spf=Presence.UNKNOWN if spf is None else presence(spf, "v=spf1"),
        dmarc=Presence.UNKNOWN if dmarc is None else presence(dmarc, "v=DMARC1"),
    )


def _mx_verdict(
    mx: Lookup, host: ThisHost, addresses: Mapping[str, Lookup]
) -> tuple[Status, str, tuple[tuple[int, str], ...], str | None]:
    if mx.outcome is Outcome.TEMPERROR:
        return Status.TEMPERROR, f"MX lookup failed: {mx.error or 'no answer'}", (), None
    if mx.outcome is Outcome.NXDOMAIN:
        return Status.MISSING, "no such domain", (), None
    records = tuple(mx_records(mx))
    if not records:
        return Status.MISSING, "no MX record", (), None
    hosts = [(p, h) for p, h in records if h]
    if not hosts:
        return Status.MISSING, "a null MX: the domain says it takes no mail", records, None
    mine = _ips(host.addresses)
    none = Lookup(Outcome.NODATA)
    here = next(((p, h, "") for p, h in hosts if h == name_of(host.name)), None)
    if here is None and mine:
        here = next(((p, h, ", by address") for p, h in hosts if _ips(addresses.get(h, none).records) & mine), None)
    if here is not None:
        preference, at, how = here
        detail = f"MX {preference} {at} (this host{how})"
        first = hosts[0]
        if first[0] < preference:
            detail += f"; {first[1]} ({first[0]}) is tried first"
        return Status.OK, detail, records, at
    unknown = [h for _, h in hosts if mine and addresses.get(h, none).outcome is Outcome.TEMPERROR]
    if unknown:
        return Status.TEMPERROR, f"address lookup failed for {', '.join(unknown)}", records, None
    return Status.WRONG, "MX elsewhere: " + ", ".join(f"{p} {h}" for p, h in hosts), records, None


# -- asking DNS -----------------------------------------------------------------------------------


def _text(rdata: Any) -> str:
    if rdata.rdtype == dns.rdatatype.TXT:
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if rdata.rdtype == dns.rdatatype.MX:
        return f"{rdata.preference} {rdata.exchange.to_text()}"
    return str(rdata.to_text())


@dataclass
class Resolver:
    """DNS questions answered as Lookups (never an exception for what DNS said), each bounded
    by `timeout_s`, at most CONCURRENCY at once."""

    nameservers: Sequence[str] = ()  # "10.0.0.53", "127.0.0.1:5353"; none: the system's
    timeout_s: float = 5.0
    _resolver: dns.asyncresolver.Resolver = field(init=False, repr=False)
    _limit: asyncio.Semaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(*nameserver_address(ns)) for ns in self.nameservers]
        else:
            try:
                resolver = dns.asyncresolver.Resolver()
            except dns.exception.DNSException:  # no /etc/resolv.conf: every question is a temperror
                resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver = resolver
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def lookup(self, name: str, rdtype: str) -> Lookup:
        try:
            async with self._limit:
                answer = await self._resolver.resolve(
                    f"{name_of(name)}.", rdtype, lifetime=self.timeout_s, search=False
                )
        except dns.resolver.NXDOMAIN:
            return Lookup(Outcome.NXDOMAIN)
        except dns.resolver.NoAnswer:
            return Lookup(Outcome.NODATA)
        except dns.exception.Timeout:
            return Lookup(Outcome.TEMPERROR, error=f"no answer in {self.timeout_s:g} s")
        except dns.resolver.NoNameservers:
            return Lookup(Outcome.TEMPERROR, error="the DNS server failed (SERVFAIL or refused)")
        except dns.resolver.NoResolverConfiguration:
            return Lookup(Outcome.TEMPERROR, error="no DNS server to ask (set MAILFLOW_DNS_SERVERS)")
        except dns.exception.DNSException as exc:
            return Lookup(Outcome.TEMPERROR, error=str(exc)[:200])
        return Lookup.answer(*(_text(r) for r in answer))

    async def addresses(self, name: str) -> Lookup:
        """A and AAAA together: the addresses found, else a temperror if either failed."""
        found = await asyncio.gather(self.lookup(name, "A"), self.lookup(name, "AAAA"))
        records = tuple(r for lookup in found for r in lookup.records)
        if records:
            return Lookup(Outcome.ANSWER, records)
        failed = [lookup for lookup in found if lookup.outcome is Outcome.TEMPERROR]
        if failed:
            return failed[0]
        nxdomain = all(lookup.outcome is Outcome.NXDOMAIN for lookup in found)
        return Lookup(Outcome.NXDOMAIN if nxdomain else Outcome.NODATA)


async def this_host(resolver: Resolver, name: str, listen_address: str | None = None) -> ThisHost:
    """This host's name and the addresses it can learn cheaply: its name's A/AAAA records and
    the listening address when that is a public one (not loopback, not a wildcard)."""
    found = set((await resolver.addresses(name)).records)
    try:
        listening = ipaddress.ip_address(listen_address or "")
        if listening.is_global:
            found.add(listening.compressed)
    except ValueError:
        pass
    return ThisHost(name_of(name), frozenset(_ips(found)))


async def check_domain(resolver: Resolver, domain: str, host: ThisHost) -> Verdict:
    mx, spf, dmarc = await asyncio.gather(
        resolver.lookup(domain, "MX"), resolver.lookup(domain, "TXT"), resolver.lookup(f"_dmarc.{domain}", "TXT")
    )
    hosts = mail_hosts(mx)
    addresses: dict[str, Lookup] = {}
    if host.addresses and host.name not in hosts:  # by name it is not: is it by address?
        addresses = dict(zip(hosts, await asyncio.gather(*(resolver.addresses(h) for h in hosts)), strict=True))
    return judge(domain, mx, host, addresses, spf=spf, dmarc=dmarc)


async def check(
    domains: Sequence[str],
    host: str,
    *,
    nameservers: Sequence[str] = (),
    timeout_s: float = 5.0,
    listen_address: str | None = None,
) -> tuple[ThisHost, list[Verdict]]:
    """Every domain's verdict, in the order given (all asked at once), and this host as found."""
    resolver = Resolver(nameservers, timeout_s)
    me = await this_host(resolver, host, listen_address)
    return me, list(await asyncio.gather(*(check_domain(resolver, d, me) for d in domains)))
