"""Inbound room: who a received message is from - SPF for the MAIL FROM and HELO identities,
every DKIM signature, the ARC chain and DMARC alignment, as verdicts for the MessageReceived
event and an Authentication-Results header (RFC 8601) for the stored copy.

The checks are the libraries': pyspf evaluates SPF records, dkimpy verifies DKIM signatures
and ARC chains, publicsuffixlist (which ships the public suffix list: nothing is fetched at
run time) finds organizational domains. What is decided here is what their outcomes mean as
RFC 8601 results, and DMARC (RFC 7489): policy discovery, alignment and the policy that
applies are small pure functions. authheaders is not used: it returns only a header string,
verifies only the first DKIM signature, lets DNS timeouts escape as exceptions and reads the
whole public suffix list on every call.

All DNS goes through one dnspython resolver per Authenticator - the configured servers, or
the system's - with a bounded cache that keeps answers for their TTL (negative ones for the
SOA's minimum) and remembers a failed lookup for a few seconds, so a dead server costs one
timeout per name rather than one per message. Each lookup gives up after `timeout_s` and a
whole check after `total_timeout_s`; what did not answer in time is a temperror.

pyspf takes no DNS function: it calls its module's `DNSLookup`. That name is replaced once,
below, by a function that uses the lookups of the check running in the current context (a
ContextVar, so concurrent checks in different threads each get their own) and pyspf's own
lookup for any other caller: the one process-wide hook, and it changes nothing for them.
"""

from __future__ import annotations

import email.errors
import email.policy
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import dkim
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import spf  # type: ignore[import-untyped]
from publicsuffixlist import PublicSuffixList

from mailflow.log import get_logger
from mailflow.mail.dns import nameserver_address

log = get_logger("mailflow.inbound")

MAX_SIGNATURES = 10  # DKIM signatures verified and reported per message (the newest first)
MAX_ARC_SETS = 50  # RFC 8617 5.1.1.1: a longer chain fails
FAILED_LOOKUP_TTL_S = 5.0  # a name whose lookup failed is not asked again for this long
CACHE_SIZE = 10_000  # DNS answers kept per Authenticator

SPF_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
POLICIES = ("none", "quarantine", "reject")

_PSL = PublicSuffixList()  # read-only after loading: shared by every thread
_DMARC_RECORD = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|$)", re.IGNORECASE)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")  # RFC 2045 token: a value that needs no quotes
_HEADER_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+):")
# "Alice Smith <alice@example.com>" or "alice@example.com": no quotes, comments, groups,
# encoded words or second address - anything else goes to the email package's parser.
_PLAIN_FROM = re.compile(
    rb"\s*(?:[A-Za-z0-9 ._'-]*<[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@([A-Za-z0-9.-]+)>"
    rb"|[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@([A-Za-z0-9.-]+))\s*"
)
_ARC_HEADERS = frozenset({"arc-seal", "arc-message-signature", "arc-authentication-results"})

# dkimpy logs every failed verification at ERROR: the verdict says it, once, in the event.
_dkimpy_log = logging.getLogger("mailflow.inbound.authn.dkimpy")
_dkimpy_log.disabled = True


@dataclass(frozen=True)
class DkimResult:
    domain: str  # d=
    selector: str  # s=
    result: str  # pass|fail|neutral|temperror|permerror|policy
    reason: str = ""  # why it is not a pass, in a few words


@dataclass(frozen=True)
class Verdicts:
    spf: str  # RFC 8601 result for the MAIL FROM identity (the HELO's for a null sender)
    spf_domain: str  # the domain checked: MAIL FROM's, or the HELO's for a null sender ("" if none)
    spf_helo: str  # result for the HELO identity
    dkim: tuple[DkimResult, ...]  # every signature (up to MAX_SIGNATURES), in header order
    arc: str  # pass|fail|none
    dmarc: str  # pass|fail|none|temperror|permerror
    dmarc_policy: str | None  # the policy that applies (sp= for a subdomain); None: no record
    from_domain: str | None  # RFC5322.From domain; None: missing or unusable From
    helo_domain: str = ""  # the HELO name checked ("" when it is not a domain name)
    null_sender: bool = False  # MAIL FROM:<> - a bounce; SPF checked the HELO identity

    def header(self, authserv_id: str) -> bytes:
        """The Authentication-Results header field to prepend to the stored copy, folded, one result a line."""
        results: list[str] = []
        if self.null_sender:
            results.append(_resinfo("spf", self.spf, props=[("smtp.helo", self.spf_domain)]))
        else:
            results.append(_resinfo("spf", self.spf, props=[("smtp.mailfrom", self.spf_domain)]))
            if self.helo_domain:
                results.append(_resinfo("spf", self.spf_helo, props=[("smtp.helo", self.helo_domain)]))
        for d in self.dkim:
            reason = d.reason if d.result != "pass" else ""
            results.append(_resinfo("dkim", d.result, reason, [("header.d", d.domain), ("header.s", d.selector)]))
        if not self.dkim:
            results.append("dkim=none")
        results.append(_resinfo("arc", self.arc))
        comment = f" (p={self.dmarc_policy})" if self.dmarc_policy else ""
        results.append(_resinfo("dmarc", self.dmarc + comment, props=[("header.from", self.from_domain or "")]))
        return ("Authentication-Results: " + ";\r\n\t".join([_value(authserv_id), *results]) + "\r\n").encode()

    def to_event(self) -> dict[str, Any]:
        """The verdicts for MessageReceived: results and domains, nothing about the people."""
        return {
            "spf": self.spf,
            "spf_domain": self.spf_domain,
            "spf_helo": self.spf_helo,
            "dkim": [{"domain": d.domain, "selector": d.selector, "result": d.result} for d in self.dkim],
            "arc": self.arc,
            "dmarc": self.dmarc,
            "dmarc_policy": self.dmarc_policy,
            "from_domain": self.from_domain,
        }


# What a check that failed unexpectedly reports: nothing could be completed.
UNVERIFIED = Verdicts("temperror", "", "temperror", (), "none", "temperror", None, None)


# --- Decisions -------------------------------------------------------------------------------


def hostname(text: str) -> str | None:
    """A multi-label domain name in lower-case ASCII (IDNA), or None: "Mail.Example.COM." -> "mail.example.com"."""
    text = text.strip().rstrip(".").lower()
    try:
        name = text.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    labels = name.split(".")
    if len(labels) < 2 or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return name


def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 3.2): one label below the public suffix."""
    return _PSL.privatesuffix(domain) or domain


def header_fields(data: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw value) of each header field, unfolded; lines that are not fields are skipped."""
    end = re.search(rb"\r?\n\r?\n", data)
    block = data[: end.start()] if end else data
    fields: list[tuple[str, list[bytes]]] = []
    for line in re.split(rb"\r?\n", block):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)
            continue
        m = _HEADER_NAME.match(line)
        if m:
            fields.append((m.group(1).decode("ascii").lower(), [line[m.end() :]]))
    return [(name, b"".join(parts)) for name, parts in fields]


def header_from(fields: Sequence[tuple[str, bytes]]) -> tuple[str | None, str]:
    """(RFC5322.From domain, "") - or (None, the DMARC result when there is no usable one:
    "none" without a From, "permerror" for several From fields, addresses of several domains
    or one that cannot be parsed the same way by every reader; RFC 7489 6.6.1)."""
    values = [value for name, value in fields if name == "from"]
    if not values:
        return None, "none"
    if len(values) > 1:
        return None, "permerror"
    plain = _PLAIN_FROM.fullmatch(values[0])  # most From fields: read the same by any parser, 10x faster
    if plain:
        domain = hostname((plain.group(1) or plain.group(2)).decode("ascii"))
        return (domain, "") if domain else (None, "permerror")
    try:
        parsed = email.policy.default.header_factory("from", values[0].decode("utf-8", "replace"))
        addresses = parsed.addresses
    except Exception:  # noqa: BLE001 - the stdlib parser on hostile input: unusable, not an error of ours
        return None, "permerror"
    if not addresses or any(isinstance(d, email.errors.InvalidHeaderDefect) for d in parsed.defects):
        return None, "permerror"
    domains = {hostname(a.domain) for a in addresses}
    if len(domains) != 1 or None in domains:
        return None, "permerror"
    return domains.pop(), ""


@dataclass(frozen=True)
class DmarcPolicy:
    p: str
    sp: str
    adkim: str  # "r" relaxed | "s" strict
    aspf: str


def parse_dmarc(text: str) -> DmarcPolicy | None:
    """A DMARC record's policy; None when the record asks for no DMARC processing (an invalid
    p= or sp= without rua=, RFC 7489 6.6.3 step 6); ValueError if it is not a tag list."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"not a tag=value list: {text[:100]!r}")
        tags.setdefault(name.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    if p not in POLICIES or sp not in POLICIES:
        if not tags.get("rua"):
            return None
        p = sp = "none"
    adkim, aspf = tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower()
    return DmarcPolicy(p, sp, adkim if adkim in ("r", "s") else "r", aspf if aspf in ("r", "s") else "r")


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 3.1): the same domain (strict), or the same organizational domain (relaxed)."""
    domain = domain.lower().rstrip(".")
    if not domain:
        return False
    return domain == from_domain if mode == "s" else org_domain(domain) == org_domain(from_domain)


def dmarc_result(
    policy: DmarcPolicy, from_domain: str, spf_result: str, spf_domain: str, dkim_results: Sequence[DkimResult]
) -> str:
    """pass when an aligned identifier passed; temperror when none did but an aligned one could
    not be checked (a DNS failure must not turn into a reject); fail otherwise."""
    spf_aligned = aligned(spf_domain, from_domain, policy.aspf)
    dkim_aligned = [d.result for d in dkim_results if aligned(d.domain, from_domain, policy.adkim)]
    if (spf_aligned and spf_result == "pass") or "pass" in dkim_aligned:
        return "pass"
    if (spf_aligned and spf_result == "temperror") or "temperror" in dkim_aligned:
        return "temperror"
    return "fail"


def _resinfo(method: str, result: str, reason: str = "", props: Sequence[tuple[str, str]] = ()) -> str:
    parts = [f"{method}={result}"]
    if reason:
        parts.append(f"reason={_value(reason)}")
    parts.extend(f"{name}={_value(value)}" for name, value in props if value)
    return " ".join(parts)


def _value(text: str) -> str:
    """An RFC 8601 value: a token as it is, anything else as a quoted string of printable ASCII."""
    if _TOKEN.fullmatch(text):
        return text
    clean = "".join(c for c in text if " " <= c <= "~")[:200]
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tag(value: bytes, name: bytes) -> str:
    """One tag of a DKIM-Signature, read leniently to name the signature even when it is broken."""
    m = re.search(rb"(?:^|;)\s*" + name + rb"\s*=\s*([^;]*)", value)
    return re.sub(r"\s+", "", m.group(1).decode("utf-8", "replace"))[:253].lower() if m else ""


def _reason(exc: BaseException) -> str:
    """An exception's message without the values it quotes (they may name people): "body hash mismatch"."""
    text = re.sub(r"b'([^']*)'", r"\1", str(exc))  # dkimpy formats bytes with %s: "missing b'b'="
    return re.split(r" \(|: ", text, maxsplit=1)[0][:80] or type(exc).__name__


# --- DNS -------------------------------------------------------------------------------------


class _Unanswered(Exception):
    """DNS gave no answer in time (timeout, SERVFAIL, no server, the check out of time)."""


class _Dns:
    """One resolver for every check of an Authenticator: thread-safe (dnspython's cache locks itself)."""

    def __init__(self, nameservers: list[str] | None, timeout_s: float, cache_size: int) -> None:
        if nameservers:
            self.resolver = dns.resolver.Resolver(configure=False)
            self.resolver.nameservers = [dns.nameserver.Do53Nameserver(*nameserver_address(ns)) for ns in nameservers]
        else:
            try:
                self.resolver = dns.resolver.Resolver()
            except dns.exception.DNSException:  # no /etc/resolv.conf: every lookup is a temperror
                self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.lifetime = timeout_s
        self.resolver.timeout = min(timeout_s, 2.0)  # per attempt: a lost UDP datagram is asked again
        self.resolver.cache = dns.resolver.LRUCache(cache_size) if cache_size else None
        self.timeout_s = timeout_s
        self._failed: dict[tuple[dns.name.Name, str], float] = {}
        self._lock = threading.Lock()

    def query(self, name: str, rdtype: str, deadline: float) -> list[Any]:
        """The records (following CNAMEs); [] for no such name or no such data; _Unanswered otherwise."""
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return []  # not a name that can be asked: nothing there
        now = time.monotonic()
        if now >= deadline:
            raise _Unanswered("the check ran out of time")
        key = (qname, rdtype)
        with self._lock:
            if self._failed.get(key, 0.0) > now:
                raise _Unanswered(f"{rdtype} lookup failed moments ago")
        lifetime = min(self.timeout_s, deadline - now)
        try:
            answer = self.resolver.resolve(qname, rdtype, lifetime=lifetime, search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN):
            return []
        except Exception as exc:  # noqa: BLE001 - whatever kept the answer away (timeout, SERVFAIL, socket) is temporary
            if lifetime >= self.timeout_s or not isinstance(exc, dns.exception.Timeout):  # not just cut short
                with self._lock:
                    if len(self._failed) > CACHE_SIZE:
                        self._failed = {k: t for k, t in self._failed.items() if t > now}
                    self._failed[key] = time.monotonic() + FAILED_LOOKUP_TTL_S
            raise _Unanswered(f"{rdtype} lookup failed: {type(exc).__name__}") from None
        return list(answer)


class _Lookups:
    """One check's view of the DNS, in the shapes each library asks for, within the check's deadline."""

    def __init__(self, resolver: _Dns, deadline: float) -> None:
        self.resolver = resolver
        self.deadline = deadline
        self.unanswered = 0  # lookups that failed: a DKIM key that could not be fetched is a temperror
        self.keys_fetched = 0
        self.last_key: bytes | None = None

    def records(self, name: str, rdtype: str) -> list[Any]:
        try:
            return self.resolver.query(name, rdtype, self.deadline)
        except _Unanswered:
            self.unanswered += 1
            raise

    def txt(self, name: str) -> list[bytes]:
        return [b"".join(r.strings) for r in self.records(name, "TXT")]

    def dkim_key(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        """dkimpy's dnsfunc: the key record at <selector>._domainkey.<domain>, or None."""
        self.last_key = None
        try:
            records = self.txt(name.decode("ascii"))
        except UnicodeDecodeError:
            records = []
        except _Unanswered as exc:
            raise dkim.DnsTimeoutError(str(exc)) from None
        self.keys_fetched += 1
        self.last_key = records[0] if records else None
        return self.last_key

    def spf(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's DNSLookup: [((name, type), value)], the values shaped as pyspf's dnspython driver gives them."""
        try:
            found = self.records(name, qtype)
        except _Unanswered as exc:
            raise spf.TempError(f"DNS {exc}") from None
        out: list[tuple[tuple[str, str], Any]] = []
        for r in found:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange.to_text(omit_final_dot=True))))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(omit_final_dot=True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), r.strings))
        return out


_spf_lookups: ContextVar[Callable[[str, str], list[Any]] | None] = ContextVar("mailflow_spf_lookups", default=None)
_pyspf_lookup = spf.DNSLookup


def _routed_spf_lookup(name: str, qtype: str, strict: object = True, timeout: float = 20) -> list[Any]:
    lookups = _spf_lookups.get()
    return lookups(name, qtype) if lookups is not None else _pyspf_lookup(name, qtype, strict, timeout)


spf.DNSLookup = _routed_spf_lookup


# --- The checks ------------------------------------------------------------------------------


class Authenticator:
    """SPF, DKIM, ARC and DMARC verdicts for received messages; one per server, shared by its threads."""

    def __init__(
        self,
        *,
        nameservers: list[str] | None = None,
        timeout_s: float = 5.0,
        total_timeout_s: float | None = None,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        """nameservers: ask only these ("10.0.0.53", "127.0.0.1:5353", "[::1]:53"; ConfigurationError
        if one is not an address); none: the system's. timeout_s bounds each lookup, total_timeout_s
        (default twice timeout_s) a whole check; cache_size=0 turns the answer cache off."""
        self.timeout_s = timeout_s
        self.total_timeout_s = total_timeout_s if total_timeout_s is not None else 2 * timeout_s
        self._dns = _Dns(nameservers, timeout_s, cache_size)

    def check(self, data: bytes, *, client_ip: str, helo: str, mail_from: str) -> Verdicts:
        """The verdicts on one message as it arrived (raw bytes, the client's IP, HELO and MAIL FROM,
        "" for a null sender). Never raises; takes at most about total_timeout_s."""
        try:
            return self._check(bytes(data), client_ip, helo, mail_from)
        except Exception as exc:  # noqa: BLE001 - a bug here must not cost the message: it is stored unverified
            log.warning("inbound.authn_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            return UNVERIFIED

    def _check(self, data: bytes, client_ip: str, helo: str, mail_from: str) -> Verdicts:
        lookups = _Lookups(self._dns, time.monotonic() + self.total_timeout_s)
        fields = header_fields(data)
        helo_domain = hostname(helo) or ""
        sender = mail_from.strip().strip("<>").strip()
        if sender:
            local, _, domain = sender.rpartition("@")
            spf_domain = hostname(domain) or ""
            spf_result = self._spf(lookups, client_ip, f"{local or 'postmaster'}@{spf_domain}", helo, spf_domain)
        else:
            spf_domain = helo_domain
            spf_result = self._spf(lookups, client_ip, "", helo_domain, helo_domain)
        signatures = self._dkim(data, fields, lookups)
        from_domain, problem = header_from(fields)
        if from_domain is None:
            dmarc, policy = problem, None
        else:
            dmarc, policy = self._dmarc(lookups, from_domain, spf_result, spf_domain, signatures)
        arc = self._arc(data, fields, lookups)
        spf_helo = spf_result if not sender else self._spf(lookups, client_ip, "", helo_domain, helo_domain)
        return Verdicts(
            spf=spf_result,
            spf_domain=spf_domain,
            spf_helo=spf_helo,
            dkim=signatures,
            arc=arc,
            dmarc=dmarc,
            dmarc_policy=policy,
            from_domain=from_domain,
            helo_domain=helo_domain,
            null_sender=not sender,
        )

    def _spf(self, lookups: _Lookups, client_ip: str, sender: str, helo: str, domain: str) -> str:
        """check_host() (RFC 7208) for one identity; none when there is no domain or client address to check."""
        try:
            ipaddress.ip_address(client_ip)
        except ValueError:
            return "none"
        if not domain:
            return "none"
        token = _spf_lookups.set(lookups.spf)
        try:
            result, _code, _explanation = spf.query(i=client_ip, s=sender, h=helo, timeout=self.timeout_s).check()
        except Exception:  # noqa: BLE001 - pyspf asserts on some records (recursion): a permanent error in the record
            return "permerror"
        finally:
            _spf_lookups.reset(token)
        return result if result in SPF_RESULTS else "permerror"

    def _dkim(self, data: bytes, fields: Sequence[tuple[str, bytes]], lookups: _Lookups) -> tuple[DkimResult, ...]:
        """Every signature's result, the first MAX_SIGNATURES of them (a forwarder's are above the author's)."""
        signed = [value for name, value in fields if name == "dkim-signature"][:MAX_SIGNATURES]
        if not signed:
            return ()
        try:
            message = dkim.DKIM(data, logger=_dkimpy_log, timeout=self.timeout_s)
            raw = [value for name, value in message.headers if name.lower() == b"dkim-signature"]
        except Exception as exc:  # noqa: BLE001 - dkimpy cannot parse the header: no signature can be verified
            why = f"malformed message: {_reason(exc)}"
            return tuple(DkimResult(_tag(v, b"d"), _tag(v, b"s"), "permerror", why) for v in signed)
        return tuple(self._signature(message, i, value, lookups) for i, value in enumerate(raw[:MAX_SIGNATURES]))

    def _signature(self, message: Any, idx: int, value: bytes, lookups: _Lookups) -> DkimResult:
        domain, selector = _tag(value, b"d"), _tag(value, b"s")
        if time.monotonic() >= lookups.deadline:
            return DkimResult(domain, selector, "temperror", "out of time")
        unanswered, fetched = lookups.unanswered, lookups.keys_fetched
        try:
            ok = message.verify(idx=idx, dnsfunc=lookups.dkim_key)
        except dkim.ValidationError as exc:  # before the key lookup: a broken signature; after: the body changed
            return DkimResult(domain, selector, "fail" if lookups.keys_fetched > fetched else "permerror", _reason(exc))
        except (dkim.UnknownKeyTypeError, dkim.NaClNotFoundError):
            return DkimResult(domain, selector, "neutral", "unsupported key type")
        except Exception as exc:  # noqa: BLE001 - a malformed signature or key (dkimpy raises more than DKIMException)
            return DkimResult(domain, selector, "permerror", _reason(exc))
        if ok:
            if _tag(value, b"a") == "rsa-sha1":
                return DkimResult(domain, selector, "policy", "rsa-sha1 is not accepted (RFC 8301)")
            return DkimResult(domain, selector, "pass")
        if lookups.unanswered > unanswered:
            return DkimResult(domain, selector, "temperror", "key lookup failed")
        if lookups.keys_fetched > fetched and lookups.last_key is None:
            return DkimResult(domain, selector, "permerror", "no key")
        try:
            dkim.evaluate_pk(b"", lookups.last_key)
        except Exception:  # noqa: BLE001 - any problem with the published key makes it unusable
            return DkimResult(domain, selector, "permerror", "unusable key")
        return DkimResult(domain, selector, "fail", "signature did not verify")

    def _arc(self, data: bytes, fields: Sequence[tuple[str, bytes]], lookups: _Lookups) -> str:
        """The chain's validation status (RFC 8617 5.2): none without ARC sets, pass or fail (also
        when a key could not be fetched: ARC has no temperror)."""
        names = [name for name, _ in fields if name in _ARC_HEADERS]
        if not names:
            return "none"
        if names.count("arc-seal") > MAX_ARC_SETS:
            return "fail"
        try:
            cv, _sets, _why = dkim.ARC(data, logger=_dkimpy_log, timeout=self.timeout_s).verify(
                dnsfunc=lookups.dkim_key
            )
        except Exception:  # noqa: BLE001 - a chain dkimpy cannot even read does not validate
            return "fail"
        return "pass" if cv == dkim.CV_Pass else "fail"

    def _dmarc(
        self,
        lookups: _Lookups,
        from_domain: str,
        spf_result: str,
        spf_domain: str,
        signatures: Sequence[DkimResult],
    ) -> tuple[str, str | None]:
        """(DMARC result, the policy that applies) after policy discovery (RFC 7489 6.6.3)."""
        for domain in dict.fromkeys((from_domain, org_domain(from_domain))):
            try:
                records = [r.decode("utf-8", "replace") for r in lookups.txt(f"_dmarc.{domain}")]
            except _Unanswered:
                return "temperror", None
            records = [t for t in records if _DMARC_RECORD.match(t)]
            if len(records) > 1:
                return "none", None  # several records: DMARC is not applied
            if records:
                try:
                    policy = parse_dmarc(records[0])
                except ValueError:
                    return "permerror", None
                if policy is None:
                    return "none", None
                applied = policy.sp if domain != from_domain else policy.p
                return dmarc_result(policy, from_domain, spf_result, spf_domain, signatures), applied
        return "none", None
