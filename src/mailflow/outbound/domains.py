"""Outbound room: sending domains - the DKIM key mailflow generates for a domain a tenant sends
from, exactly which DNS records to publish (SPF, DKIM, DMARC, the return path's MX), whether DNS
has them, and the periodic re-check that warns when one breaks.

`records()` (what to publish) and `judge()` (DNS answers in, a verdict per record out) are the
decisions and need no network; `verify()` is the shell that asks DNS - outside any database
transaction, every question bounded by a timeout - and records SendingDomainChecked, plus a
SendingDomainRecordBroken for each record that passed at the previous check and fails now (the
warning). A DNS server that does not answer is an `error`, never a `missing`: it neither breaks
a record nor changes the domain's status. `recheck_due()` checks every tenant's domains whose
last check is older than MAILFLOW_DOMAIN_CHECK_INTERVAL_S; the queuer runs it in a thread of its
own, so a DNS server that hangs delays only the check.

The return path: mailflow's VERP address is bounces+<token>@<the From domain> (mail/tokens.py,
outbound/mime.py), so bounces reach mailflow only when the domain's own MX names mailflow's
inbound host (MAILFLOW_INBOUND_HOSTNAME, else the FQDN). That one MX record is the return path
and also brings the domain's other mail to mailflow's inbound; a domain whose mailboxes are
hosted elsewhere cannot publish it without moving them (bounces then go to that host, and only
the SMTP-time rejections the workers see are classified).

The DKIM private key is kept in the vault exactly as a sender's (owner `sending-domain:<domain>`),
never in an event: SendingDomainAdded carries its reference, fingerprint and public key. A sender
of the domain without a DKIM key of its own signs with the domain's (sending.load_sender); a
domain is therefore not removed while such a sender exists.
"""

from __future__ import annotations

import base64
import functools
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import idna
import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from mailflow.config import Settings
from mailflow.consumers import inline
from mailflow.consumers.inline import InlineProjection, register
from mailflow.errors import ConflictError, NotFoundError, UsageError
from mailflow.events.envelope import Envelope
from mailflow.events.store import EventStore
from mailflow.infra.vault import Vault, dkim_fingerprint
from mailflow.log import get_logger
from mailflow.mail.dns import nameserver_address
from mailflow.outbound import queries as q
from mailflow.outbound.events import (
    RecordVerdict,
    SecretRef,
    SendingDomainAdded,
    SendingDomainChecked,
    SendingDomainRecordBroken,
    SendingDomainRemoved,
)

log = get_logger("mailflow.domains")

DEFAULT_SELECTOR = "mailflow"
KEY_BITS = 2048
MX_PREFERENCE = 10
TXT_STRING_BYTES = 255  # a TXT record's character-strings are at most this long (RFC 1035 3.3)
MAX_NAME = 253
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class Purpose(StrEnum):
    SPF = "spf"
    DKIM = "dkim"
    DMARC = "dmarc"
    RETURN_PATH = "return_path"


class Verdict(StrEnum):
    OK = "ok"
    WARNING = "warning"  # published and working, but worth tightening (DMARC p=none)
    MISSING = "missing"  # no such record (or no such name)
    WRONG = "wrong"  # a record is there, and it is not the one to publish
    ERROR = "error"  # DNS did not answer (timeout, SERVFAIL): not a verdict on the record

    @property
    def passed(self) -> bool:
        return self in (Verdict.OK, Verdict.WARNING)


class Status(StrEnum):
    PENDING = "pending"  # not verified yet
    VERIFIED = "verified"  # every required record passed at the last check DNS answered
    FAILING = "failing"  # a required record is missing or wrong


# -- what is published, what DNS said, what was found ---------------------------------------------


@dataclass(frozen=True)
class DnsRecord:
    """One record to publish. `value` is the whole text; `strings` is a TXT value in the
    character-strings of at most 255 bytes that DNS needs (a 2048-bit DKIM key takes two)."""

    purpose: Purpose
    type: str  # TXT | MX
    name: str
    value: str  # TXT: the text; MX: "10 mx.example.net."
    required: bool
    note: str = ""

    @property
    def strings(self) -> list[str]:
        if self.type != "TXT":
            return [self.value]
        raw = self.value.encode()
        return [raw[i : i + TXT_STRING_BYTES].decode() for i in range(0, len(raw), TXT_STRING_BYTES)] or [""]

    def zone_line(self) -> str:
        """The record in zone-file form: `name. TXT "..." "..."`, `name. MX 10 host.`."""
        if self.type == "TXT":
            return f"{self.name}. TXT " + " ".join(_quoted(s) for s in self.strings)
        return f"{self.name}. {self.type} {self.value}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "purpose": str(self.purpose),
            "type": self.type,
            "name": self.name,
            "value": self.value,
            "strings": self.strings,
            "zone": self.zone_line(),
            "required": self.required,
            "note": self.note,
        }


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Outcome(StrEnum):
    ANSWER = "answer"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"  # the name exists, without records of the type asked
    ERROR = "error"  # no answer: timeout, SERVFAIL, refused, no server to ask


@dataclass(frozen=True)
class Answer:
    """What one DNS question got: the records as text (a TXT record's strings joined, an MX as
    `10 mx.example.net.`), or why there are none (`error` says it when DNS did not answer)."""

    outcome: Outcome
    records: tuple[str, ...] = ()
    error: str = ""

    @classmethod
    def of(cls, *records: str) -> Answer:
        return cls(Outcome.ANSWER, records) if records else cls(Outcome.NODATA)


@dataclass(frozen=True)
class RecordCheck:
    """One record's verdict at a check, with a line a user can act on."""

    purpose: Purpose
    type: str
    name: str
    required: bool
    status: Verdict
    detail: str
    known: Verdict | None = None  # the last verdict DNS answered for (this one unless error)

    @property
    def passed(self) -> bool:
        return self.status.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "purpose": str(self.purpose),
            "type": self.type,
            "name": self.name,
            "required": self.required,
            "status": str(self.status),
            "detail": self.detail,
            "known": str(self.known) if self.known else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecordCheck:
        return cls(
            Purpose(d["purpose"]),
            d["type"],
            d["name"],
            bool(d["required"]),
            Verdict(d["status"]),
            d["detail"],
            Verdict(d["known"]) if d.get("known") else None,
        )


@dataclass(frozen=True)
class DomainCheck:
    """A check of every record of one domain; `broken`: the records that passed before and fail now."""

    domain: str
    status: Status
    checks: list[RecordCheck]
    broken: list[RecordCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every required record passed."""
        return all(c.passed for c in self.checks if c.required)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "status": str(self.status),
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "broken": [c.to_dict() for c in self.broken],
        }


@dataclass(frozen=True)
class SendingDomain:
    """A sending domain as shown: its DKIM key (public part), the records to publish and what
    the last check found of each."""

    domain: str  # IDNA A-labels
    display: str  # the same name in Unicode (as typed, for an internationalised name)
    selector: str
    status: Status
    dkim_public_key: str  # base64 SubjectPublicKeyInfo
    dkim_fingerprint: str
    created_at: datetime
    records: list[DnsRecord] = field(default_factory=list)
    last_check: list[RecordCheck] | None = None
    last_checked_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            status=str(self.status),
            created_at=self.created_at.isoformat(),
            last_checked_at=self.last_checked_at.isoformat() if self.last_checked_at else None,
            records=[r.to_dict() for r in self.records],
            last_check=[c.to_dict() for c in self.last_check] if self.last_check is not None else None,
        )
        return d


# -- names --------------------------------------------------------------------------------------


def domain_name(raw: str) -> str:
    """A domain name as stored and asked about: lower case, IDNA A-labels (UTS 46), no final
    dot; UsageError for anything that is not a name of two or more labels."""
    name = raw.strip().rstrip(".").lower()
    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii") if name else ""
    except (idna.IDNAError, UnicodeError, ValueError):
        ascii_name = ""
    labels = ascii_name.split(".")
    if len(labels) < 2 or len(ascii_name) > MAX_NAME or not all(_LABEL.match(label) for label in labels):
        raise UsageError(f"{raw!r} is not a domain name (like example.org or news.example.org)")
    return ascii_name


def unicode_name(ascii_name: str) -> str:
    """An A-label name as a person reads it (xn--bcher-kva.example -> bücher.example)."""
    try:
        return idna.decode(ascii_name)
    except (idna.IDNAError, UnicodeError, ValueError):
        return ascii_name


def selector_name(raw: str) -> str:
    """A DKIM selector: one or more DNS labels (RFC 6376 3.1), lower case."""
    name = raw.strip().lower()
    if not name or not all(_LABEL.match(label) for label in name.split(".")):
        raise UsageError(f"DKIM selector {raw!r}: use letters, digits and '-' (like mailflow or mf2026)")
    return name


@functools.cache
def _fqdn() -> str:
    return socket.getfqdn()  # asked once per process: it may take a reverse DNS lookup


def _host(configured: str | None) -> str:
    return (configured or _fqdn()).strip().rstrip(".").lower()


def outbound_host(settings: Settings) -> str:
    """The host direct delivery sends from: the name it gives in EHLO (MAILFLOW_EHLO_HOSTNAME, else the FQDN)."""
    return _host(settings.ehlo_hostname)


def inbound_host(settings: Settings) -> str:
    """The host bounces should reach: MAILFLOW_INBOUND_HOSTNAME, else the FQDN (as `mailflow inbound` greets)."""
    return _host(settings.inbound_hostname)


# -- what to publish (pure) -----------------------------------------------------------------------


def spf_mechanism(settings: Settings) -> str:
    """What the domain's SPF record must hold for mailflow's mail: include:MAILFLOW_SPF_INCLUDE
    (the SPF domain of the relay the senders use), else a:<the outbound host> (direct delivery)."""
    if settings.spf_include:
        return f"include:{settings.spf_include.strip().rstrip('.').lower()}"
    return f"a:{outbound_host(settings)}"


def dkim_value(public_key: str) -> str:
    return f"v=DKIM1; k=rsa; p={public_key}"


def records(domain: SendingDomain, settings: Settings) -> list[DnsRecord]:
    """Exactly what to publish for `domain`: SPF, DKIM and DMARC TXT records and the return
    path's MX, each with whether it is required and what it is for. Pure, but for the FQDN
    (asked once per process) when MAILFLOW_EHLO_HOSTNAME or MAILFLOW_INBOUND_HOSTNAME is unset."""
    name = domain.domain
    rua = settings.dmarc_rua or f"dmarc-reports@{name}"
    inbound = inbound_host(settings)
    return [
        DnsRecord(
            Purpose.SPF,
            "TXT",
            name,
            f"v=spf1 {spf_mechanism(settings)} ~all",
            True,
            "lets mailflow send for the domain; a domain has ONE v=spf1 record: if it has one "
            f"already, add {spf_mechanism(settings)} to it before its 'all'",
        ),
        DnsRecord(
            Purpose.DKIM,
            "TXT",
            f"{domain.selector}._domainkey.{name}",
            dkim_value(domain.dkim_public_key),
            True,
            "the public key that verifies the DKIM signatures mailflow adds to the domain's mail",
        ),
        DnsRecord(
            Purpose.DMARC,
            "TXT",
            f"_dmarc.{name}",
            f"v=DMARC1; p=none; rua=mailto:{rua}",
            True,
            "p=none only asks for reports; once they show your mail passes, tighten it to p=quarantine, then p=reject",
        ),
        DnsRecord(
            Purpose.RETURN_PATH,
            "MX",
            name,
            f"{MX_PREFERENCE} {inbound}.",
            True,
            f"bounces to bounces+...@{name} reach mailflow (and so does the domain's other mail: "
            "`mailflow domains add` routes it)",
        ),
    ]


# -- the decision (pure) ------------------------------------------------------------------------


def judge(wanted: Sequence[DnsRecord], answers: Mapping[tuple[str, str], Answer]) -> list[RecordCheck]:
    """Does DNS have each record? `answers` by (name, type), as asked; a question not asked is
    an error. SPF: exactly one v=spf1 record, holding the mechanism before any `all`; DKIM: the
    same public key (whitespace and quotes ignored); DMARC: one valid v=DMARC1 record (p=none
    is a warning); MX: the host named (with the lowest preference, else a warning)."""
    judges = {Purpose.SPF: _spf, Purpose.DKIM: _dkim, Purpose.DMARC: _dmarc, Purpose.RETURN_PATH: _mx}
    checks = []
    for record in wanted:
        answer = answers.get((record.name, record.type), Answer(Outcome.ERROR, error="not asked"))
        if answer.outcome is Outcome.ERROR:
            status, detail = Verdict.ERROR, f"DNS did not answer ({answer.error or 'no answer'}); checked again later"
        else:
            status, detail = judges[record.purpose](record, answer)
        checks.append(
            RecordCheck(record.purpose, record.type, record.name, record.required, status, detail, _known(status))
        )
    return checks


def _known(status: Verdict) -> Verdict | None:
    return None if status is Verdict.ERROR else status


def _missing(record: DnsRecord, answer: Answer, what: str) -> tuple[Verdict, str]:
    where = "no such name in DNS" if answer.outcome is Outcome.NXDOMAIN else f"no {what} record"
    return Verdict.MISSING, f"{where}: publish {record.type} {_short(record.value)} at {record.name}"


def _short(value: str, room: int = 60) -> str:
    return _quoted(value if len(value) <= room else value[: room - 3] + "...")


def _tagged(text: str, version: str) -> bool:
    return re.match(rf"\s*{re.escape(version)}(?:$|[\s;])", text, re.IGNORECASE) is not None


def _spf(record: DnsRecord, answer: Answer) -> tuple[Verdict, str]:
    spf = [t for t in answer.records if _tagged(t.replace('"', ""), "v=spf1")]
    if not spf:
        return _missing(record, answer, "SPF (v=spf1)")
    if len(spf) > 1:
        return Verdict.WRONG, (
            f"{len(spf)} v=spf1 records: receivers treat that as a permanent error (RFC 7208 4.5); merge them into one"
        )
    wanted = record.value.split()[1].lower()
    terms = spf[0].replace('"', "").split()[1:]
    bare = [t.lower().rstrip(".") for t in terms]
    at = next((i for i, t in enumerate(bare) if t.lstrip("+-~?") == wanted), None)
    if at is None:
        if any(t.startswith("redirect=") for t in bare):
            return Verdict.WRONG, f"SPF redirects elsewhere without {wanted}: add {wanted} to this record"
        return Verdict.WRONG, f"SPF does not include {wanted}: add it before the record's 'all'"
    if bare[at][0] in "-~?":
        return Verdict.WRONG, f"SPF has {terms[at]} with a failing qualifier: make it {wanted}"
    first_all = next((t for t in terms[:at] if t.lower().lstrip("+-~?") == "all"), None)
    if first_all is not None:
        return Verdict.WRONG, f"SPF reaches {first_all} before {wanted}: move {wanted} before it"
    return Verdict.OK, f"SPF includes {wanted}"


def _tags(text: str) -> dict[str, str]:
    """A DKIM or DMARC record's tags (tag=value; ...), names in lower case, quotes dropped."""
    tags: dict[str, str] = {}
    for part in text.replace('"', "").split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    return tags


def _dkim(record: DnsRecord, answer: Answer) -> tuple[Verdict, str]:
    wanted = _tags(record.value)["p"]
    keys = [tags for tags in map(_tags, answer.records) if "p" in tags]
    if not keys:
        return _missing(record, answer, "DKIM (v=DKIM1; p=...)")
    published = ["".join(tags["p"].split()) for tags in keys]
    if wanted in published:
        if len(keys) > 1:
            return Verdict.WARNING, f"the key is published, beside {len(keys) - 1} other record(s): keep only it"
        return Verdict.OK, "DKIM publishes mailflow's key"
    if published == [""]:
        return Verdict.WRONG, "the DKIM record is revoked (an empty p=): publish mailflow's key"
    return Verdict.WRONG, f"DKIM publishes another key: replace {record.name} with mailflow's"


def _dmarc(record: DnsRecord, answer: Answer) -> tuple[Verdict, str]:
    found = [t for t in answer.records if _tagged(t.replace('"', ""), "v=DMARC1")]
    if not found:
        return _missing(record, answer, "DMARC (v=DMARC1)")
    if len(found) > 1:
        return Verdict.WRONG, f"{len(found)} v=DMARC1 records: receivers then apply none (RFC 7489 6.6.3); keep one"
    policy = _tags(found[0]).get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        shown = f"p={policy}" if policy else "no p= tag"
        return Verdict.WRONG, f"DMARC has {shown}: give p=none, p=quarantine or p=reject"
    if policy == "none":
        return Verdict.WARNING, "DMARC p=none only monitors: once reports show your mail passes, use p=quarantine"
    return Verdict.OK, f"DMARC p={policy}"


def _mx(record: DnsRecord, answer: Answer) -> tuple[Verdict, str]:
    host = record.value.split()[1].rstrip(".").lower()
    found = []
    for text in answer.records:
        preference, _, name = text.strip().partition(" ")
        if preference.isdigit():
            found.append((int(preference), name.strip().rstrip(".").lower()))
    found.sort()
    if not found:
        return _missing(record, answer, "MX")
    hosts = [(p, h) for p, h in found if h]
    if not hosts:
        return Verdict.WRONG, f"a null MX says {record.name} takes no mail: bounces are lost; point its MX at {host}"
    here = [p for p, h in hosts if h == host]
    if not here:
        listed = ", ".join(f"{p} {h}" for p, h in hosts)
        return Verdict.WRONG, f"MX names {listed}: bounces go there, not to mailflow; point it at {host}"
    if hosts[0][0] < here[0]:
        return Verdict.WARNING, f"MX {here[0]} {host} is there, but {hosts[0][1]} ({hosts[0][0]}) is tried first"
    return Verdict.OK, f"MX {here[0]} {host}"


def settle(
    checks: Sequence[RecordCheck], previous: Sequence[RecordCheck] | None, was: Status
) -> tuple[list[RecordCheck], list[tuple[RecordCheck, Verdict]], Status]:
    """The checks with what was last known of each record, the records that broke (passed at
    the last answer DNS gave for them, missing or wrong now) with that last verdict, and the
    domain's new status:
    verified when every required record passed, failing when one is missing or wrong, else
    (DNS did not answer for some) as it was."""
    before = {(c.purpose, c.type, c.name): c.known for c in previous or ()}
    settled: list[RecordCheck] = []
    broken: list[tuple[RecordCheck, Verdict]] = []
    for c in checks:
        last = before.get((c.purpose, c.type, c.name))
        known = c.known if c.status is not Verdict.ERROR else last
        check = RecordCheck(c.purpose, c.type, c.name, c.required, c.status, c.detail, known)
        settled.append(check)
        if last is not None and last.passed and c.status in (Verdict.MISSING, Verdict.WRONG):
            broken.append((check, last))
    required = [c for c in settled if c.required]
    if all(c.passed for c in required):
        status = Status.VERIFIED
    elif any(c.status in (Verdict.MISSING, Verdict.WRONG) for c in required):
        status = Status.FAILING
    else:
        status = was
    return settled, broken, status


# -- asking DNS ---------------------------------------------------------------------------------


def _text(rdata: Any) -> str:
    if rdata.rdtype == dns.rdatatype.TXT:
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if rdata.rdtype == dns.rdatatype.MX:
        return f"{rdata.preference} {rdata.exchange.to_text()}"
    return str(rdata.to_text())


@dataclass
class Resolver:
    """DNS questions answered as Answers (never an exception for what DNS said), asked at once,
    each bounded by `timeout_s`: MAILFLOW_DNS_SERVERS when given, else the system's resolvers."""

    nameservers: Sequence[str] = ()  # "10.0.0.53", "127.0.0.1:5353"
    timeout_s: float = 5.0
    _resolver: dns.resolver.Resolver = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.nameservers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(*nameserver_address(ns)) for ns in self.nameservers]
        else:
            try:
                resolver = dns.resolver.Resolver()
            except dns.exception.DNSException:  # no /etc/resolv.conf: every question is an error
                resolver = dns.resolver.Resolver(configure=False)
        self._resolver = resolver

    @classmethod
    def from_settings(cls, settings: Settings) -> Resolver:
        return cls(settings.dns_servers, settings.domain_dns_timeout_s)

    def lookup(self, name: str, rdtype: str) -> Answer:
        try:
            answer = self._resolver.resolve(f"{name}.", rdtype, lifetime=self.timeout_s, search=False)
        except dns.resolver.NXDOMAIN:
            return Answer(Outcome.NXDOMAIN)
        except dns.resolver.NoAnswer:
            return Answer(Outcome.NODATA)
        except dns.exception.Timeout:
            return Answer(Outcome.ERROR, error=f"no answer in {self.timeout_s:g} s")
        except dns.resolver.NoNameservers:
            return Answer(Outcome.ERROR, error="the DNS server failed (SERVFAIL or refused)")
        except dns.resolver.NoResolverConfiguration:
            return Answer(Outcome.ERROR, error="no DNS server to ask (set MAILFLOW_DNS_SERVERS)")
        except dns.exception.DNSException as exc:
            return Answer(Outcome.ERROR, error=str(exc)[:200])
        return Answer.of(*(_text(r) for r in answer))

    def ask(self, questions: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Answer]:
        """Every (name, type) asked at once; the whole takes about one timeout at most."""
        unique = list(dict.fromkeys(questions))
        if not unique:
            return {}
        with ThreadPoolExecutor(max_workers=len(unique), thread_name_prefix="mailflow-dns") as pool:
            answers = list(pool.map(lambda question: self.lookup(*question), unique))
        return dict(zip(unique, answers, strict=True))


# -- the shells ---------------------------------------------------------------------------------


def _owner(domain: str) -> str:
    return f"sending-domain:{domain}"


def _stream(domain: str) -> str:
    return f"sending-domain-{domain}"


def _tenant(store: EventStore) -> str:
    if store.tenant is None:
        raise UsageError("sending domains belong to a tenant: act for one (--tenant)")
    return store.tenant


def _no_domain(domain: str) -> NotFoundError:
    return NotFoundError(f"no sending domain {domain} (see `mailflow sending-domains list`)")


def _from_row(row: Mapping[str, Any], settings: Settings) -> SendingDomain:
    checks = row["last_check"]
    domain = SendingDomain(
        domain=row["domain"],
        display=unicode_name(row["domain"]),
        selector=row["dkim_selector"],
        status=Status(row["status"]),
        dkim_public_key=row["dkim_public_key"],
        dkim_fingerprint=row["dkim_fingerprint"],
        created_at=row["created_at"],
        last_check=[RecordCheck.from_dict(c) for c in checks] if checks is not None else None,
        last_checked_at=row["last_checked_at"],
    )
    return replace(domain, records=records(domain, settings))


def _row(conn: psycopg.Connection, query: str, domain: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, (domain,)).fetchone()


def new_dkim_key(bits: int = KEY_BITS) -> tuple[str, bytes]:
    """A new RSA key for rsa-sha256 signatures: (its private PEM, its SubjectPublicKeyInfo DER)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, der


def add(
    store: EventStore,
    vault: Vault,
    domain: str,
    *,
    settings: Settings,
    selector: str | None = None,
    exist_ok: bool = False,
) -> SendingDomain:
    """Send from `domain`: a new DKIM key (RSA 2048) whose private half goes into the vault,
    and SendingDomainAdded with its reference, fingerprint and public key. ConflictError when
    the tenant has the domain already - unless `exist_ok` and no other selector is asked for:
    then the existing one is returned unchanged (a retried request makes no second key) - and
    when another tenant sends from it."""
    tenant = _tenant(store)
    name = domain_name(domain)
    chosen = selector_name(selector) if selector is not None else None
    if len(f"{chosen or DEFAULT_SELECTOR}._domainkey.{name}") > MAX_NAME:
        raise UsageError(f"{name}: the DKIM record's name would be longer than {MAX_NAME} characters")
    pem, der = new_dkim_key()  # before the transaction: it takes a moment
    public = base64.b64encode(der).decode()
    try:
        with inline.writing(store) as w:
            existing = _row(w.conn, q.GET_SENDING_DOMAIN, name)
            if existing is not None:
                if exist_ok and chosen in (None, existing["dkim_selector"]):
                    return _from_row(existing, settings)
                raise ConflictError(
                    f"{name} is a sending domain already (selector {existing['dkim_selector']}; "
                    f"see `mailflow sending-domains show {name}`)"
                )
            secret = vault.put(w.conn, tenant=tenant, kind="dkim_key", owner=_owner(name), plaintext=pem)
            ref = SecretRef(id=secret.id, fingerprint=dkim_fingerprint(der))
            added = SendingDomainAdded(
                domain=name, selector=chosen or DEFAULT_SELECTOR, dkim_key=ref, dkim_public_key=public
            )
            w.record([(_stream(name), added.to_new())])
            row = _row(w.conn, q.GET_SENDING_DOMAIN, name)
    except pg_errors.UniqueViolation as exc:
        raise ConflictError(f"{name} is a sending domain of another tenant") from exc
    assert row is not None
    return _from_row(row, settings)


def get(conn: psycopg.Connection, domain: str, *, settings: Settings) -> SendingDomain:
    """One sending domain of the connection's tenant, with its records and last check; NotFoundError
    for an unknown one (another tenant's is not visible)."""
    name = domain_name(domain)
    row = _row(conn, q.GET_SENDING_DOMAIN, name)
    if row is None:
        raise _no_domain(name)
    return _from_row(row, settings)


def listing(conn: psycopg.Connection, *, settings: Settings) -> list[SendingDomain]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q.LIST_SENDING_DOMAINS).fetchall()
    return [_from_row(row, settings) for row in rows]


def signing_senders(conn: psycopg.Connection, domain: str) -> list[str]:
    """The senders at `domain` without a DKIM key of their own: they sign with the domain's."""
    names = list(dict.fromkeys([domain, unicode_name(domain)]))
    return [name for (name,) in conn.execute(q.SENDERS_SIGNING_WITH_DOMAIN, {"names": names}).fetchall()]


def remove(store: EventStore, domain: str) -> None:
    """Stop sending from `domain` (SendingDomainRemoved) and delete its DKIM key from the vault.
    ConflictError while a sender of the domain has no key of its own (it signs with this one):
    give it a key, or delete it, first. Senders with their own keys do not hold it back."""
    _tenant(store)
    name = domain_name(domain)
    with inline.writing(store) as w:
        if _row(w.conn, q.LOCK_SENDING_DOMAIN, name) is None:
            raise _no_domain(name)
        users = signing_senders(w.conn, name)
        if users:
            raise ConflictError(
                f"{name} signs the mail of sender(s) {', '.join(users)}: give them a DKIM key of their own "
                "(`mailflow senders add ... --dkim-key`) or delete them first"
            )
        w.record([(_stream(name), SendingDomainRemoved(domain=name).to_new())])
        w.conn.execute(q.DELETE_SENDING_DOMAIN_SECRETS, (_owner(name),))


def verify(store: EventStore, domain: str, resolver: Resolver, *, settings: Settings) -> DomainCheck:
    """Ask DNS about every record of `domain` (no transaction open meanwhile), record
    SendingDomainChecked and a SendingDomainRecordBroken per record that broke; the domain's
    status follows (see settle())."""
    _tenant(store)
    name = domain_name(domain)
    with inline.reading(store) as conn:
        before = get(conn, name, settings=settings)
    answers = resolver.ask((r.name, r.type) for r in before.records)
    found = judge(before.records, answers)
    with inline.writing(store) as w:
        row = _row(w.conn, q.LOCK_SENDING_DOMAIN, name)  # the previous check, as it stands now
        if row is None:
            raise _no_domain(name)  # removed meanwhile
        current = _from_row(row, settings)
        checks, broken, status = settle(found, current.last_check, current.status)
        events = [
            (
                _stream(name),
                SendingDomainChecked(
                    domain=name,
                    status=str(status),
                    checks=[RecordVerdict.model_validate(c.to_dict()) for c in checks],
                ).to_new(),
            )
        ]
        for c, was in broken:
            events.append(
                (
                    _stream(name),
                    SendingDomainRecordBroken(
                        domain=name,
                        purpose=str(c.purpose),
                        type=c.type,
                        name=c.name,
                        was=str(was),
                        now=str(c.status),
                        detail=c.detail,
                    ).to_new(),
                )
            )
        w.record(events)
    return DomainCheck(name, status, checks, [c for c, _ in broken])


def recheck_due(store: EventStore, resolver: Resolver, *, interval_s: float, settings: Settings) -> int:
    """Check every domain (of every tenant, for the operator's store) not checked for
    `interval_s`, the longest unchecked first; returns how many were checked. One domain
    that cannot be checked is logged and left for the next round, never stops the others."""
    with inline.reading(store) as conn:
        due = conn.execute(q.DUE_SENDING_DOMAINS, {"interval_s": interval_s, "limit": 100_000}).fetchall()
    checked = 0
    for tenant, domain in due:
        try:
            check = verify(store.for_tenant(tenant), domain, resolver, settings=settings)
        except NotFoundError:
            continue  # removed meanwhile
        except Exception as exc:  # noqa: BLE001 - one domain's trouble is no reason to skip the rest
            log.warning("domains.check_failed", tenant=tenant, domain=domain, error=str(exc)[:300])
            continue
        checked += 1
        for c in check.broken:
            log.warning("domains.record_broken", tenant=tenant, domain=domain, record=str(c.purpose), detail=c.detail)
    return checked


# -- the inline projection: the sending_domains table ---------------------------------------------


def _added(conn: psycopg.Connection, events: list[Envelope]) -> None:
    for e in events:
        d = e.data
        conn.execute(
            q.ADD_SENDING_DOMAIN,
            {
                "tenant": str(e.metadata.tenant),
                "domain": d["domain"],
                "selector": d["selector"],
                "secret": d["dkim_key"]["id"],
                "public_key": d["dkim_public_key"],
                "fingerprint": d["dkim_key"]["fingerprint"],
                "at": e.recorded_at,
            },
        )


def _checked(conn: psycopg.Connection, events: list[Envelope]) -> None:
    for e in events:
        conn.execute(
            q.SET_SENDING_DOMAIN_CHECK,
            {
                "tenant": str(e.metadata.tenant),
                "domain": e.data["domain"],
                "status": e.data["status"],
                "checks": orjson.dumps(e.data["checks"]).decode(),
                "at": e.recorded_at,
            },
        )


def _removed(conn: psycopg.Connection, events: list[Envelope]) -> None:
    for e in events:
        conn.execute(q.REMOVE_SENDING_DOMAIN, {"tenant": str(e.metadata.tenant), "domain": e.data["domain"]})


PROJECTION = register(
    InlineProjection(
        "sending_domains",
        "sending domains, their DKIM keys (by reference) and last DNS checks (inline)",
        ("sending_domains",),
        {
            "SendingDomainAdded": _added,
            "SendingDomainChecked": _checked,
            "SendingDomainRemoved": _removed,
        },
    )
)
