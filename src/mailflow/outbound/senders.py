"""Outbound room: senders - a From identity, the SMTP relay it sends through, optional DKIM.

A relay is a URL: smtp://[user:password@]host[:port][?tls=starttls|opportunistic|none], or
smtps://... for TLS from the first byte (port 465). STARTTLS is required by default for
smtp:// on any port but 25, where it is opportunistic (used when offered, certificate not
checked) unless asked for. direct:// delivers to each recipient domain's MX hosts on port 25
with opportunistic STARTTLS (see mx.py).

`dkim_record()` derives the DNS TXT record that publishes a sender's DKIM public key from
its private key, so the record cannot drift from the key that signs.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
from email_validator import EmailNotValidError, validate_email

from mailflow.config import mask_url
from mailflow.errors import UsageError, UserError

TLS_MODES = ("none", "opportunistic", "starttls", "tls")


@dataclass(frozen=True)
class SmtpRelay:
    host: str  # empty for direct delivery until a recipient's MX host is filled in
    port: int
    tls: str  # none | opportunistic | starttls | tls
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0
    direct: bool = False  # deliver to the recipient domain's MX hosts
    key: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Messages for the same key can share one SMTP session.
        object.__setattr__(self, "key", (self.host, self.port, self.tls, self.username))

    def at(self, host: str, port: int) -> SmtpRelay:
        """This relay's settings, pointed at one MX host."""
        return replace(self, host=host, port=port)

    def describe(self) -> str:
        return "direct to MX hosts" if self.direct and not self.host else f"{self.host}:{self.port}"


def smtp_client(relay: SmtpRelay, local_hostname: str | None = None) -> aiosmtplib.SMTP:
    """An unconnected aiosmtplib client for a relay (or an MX host of a direct one)."""
    return aiosmtplib.SMTP(
        hostname=relay.host,
        port=relay.port,
        timeout=relay.timeout_s,
        local_hostname=local_hostname,
        use_tls=relay.tls == "tls",
        # None: STARTTLS when the server offers it
        start_tls={"starttls": True, "opportunistic": None}.get(relay.tls, False),
        validate_certs=relay.tls in ("tls", "starttls"),
        username=relay.username,
        password=relay.password,
    )


def parse_relay_url(url: str) -> SmtpRelay:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"relay URL {mask_url(url)} is not valid: {exc}") from exc
    if parts.scheme == "direct":
        return _parse_direct(url, parts)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise UsageError(f"relay URL {mask_url(url)} must look like smtp://host:587, smtps://host:465 or direct://")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"tls", "timeout"}
    if unknown:
        raise UsageError(f"relay URL {mask_url(url)}: unknown option(s) {', '.join(sorted(unknown))}")
    if parts.scheme == "smtps":
        tls, port = "tls", port or 465
    else:
        port = port or 587
        tls = query.get("tls", "opportunistic" if port == 25 else "starttls")
    if tls not in TLS_MODES:
        raise UsageError(f"relay URL {mask_url(url)}: tls must be one of {', '.join(TLS_MODES)}")
    timeout = _timeout(url, query)
    return SmtpRelay(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        timeout_s=timeout,
    )


def _timeout(url: str, query: dict[str, str]) -> float:
    try:
        timeout = float(query.get("timeout", "30"))
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= 3600:
        raise UsageError(f"relay URL {mask_url(url)}: timeout must be a number of seconds from 0 to 3600")
    return timeout


def _parse_direct(url: str, parts) -> SmtpRelay:
    url = mask_url(url)
    if parts.netloc or parts.path not in ("", "/"):
        raise UsageError(f"relay URL {url}: direct delivery takes no host (direct:// or direct://?tls=none)")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"tls", "timeout", "port"}
    if unknown:
        raise UsageError(f"relay URL {url}: unknown option(s) {', '.join(sorted(unknown))}")
    tls = query.get("tls", "opportunistic")
    if tls not in ("none", "opportunistic", "starttls"):
        raise UsageError(f"relay URL {url}: tls for direct delivery must be none, opportunistic or starttls")
    port = query.get("port", "25")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"relay URL {url}: port must be a number from 1 to 65535")
    return SmtpRelay(host="", port=int(port), tls=tls, timeout_s=_timeout(url, query), direct=True)


@dataclass(frozen=True)
class Sender:
    """A sender as given (relay_url may hold a password, dkim_key_pem the key), or as loaded:
    relay_url without a password, the secrets' ids, and - once resolved from the vault, in
    the memory of the process that sends - relay_password and dkim_key_pem."""

    name: str
    from_email: str
    from_name: str
    relay_url: str
    dkim_selector: str | None = None
    dkim_key_pem: str | None = None
    relay_password: str | None = None
    relay_secret: str | None = None
    dkim_secret: str | None = None
    dkim_public_key: str | None = None

    @property
    def domain(self) -> str:
        return self.from_email.rsplit("@", 1)[1]

    @cached_property
    def relay(self) -> SmtpRelay:
        relay = parse_relay_url(self.relay_url)
        if self.relay_password is not None and relay.password is None:
            relay = replace(relay, password=self.relay_password)
        return relay

    def __repr__(self) -> str:  # never a secret in a log line or a traceback
        return f"Sender(name={self.name!r}, from_email={self.from_email!r}, relay={mask_url(self.relay_url)!r})"


def check_sender(sender: Sender) -> Sender:
    """Validate a sender before it is saved; returns it with the address normalised."""
    if not re.match(r"^[A-Za-z0-9_.\-]{1,100}$", sender.name):
        raise UsageError("a sender name uses letters, digits, '.', '_' and '-' (1 to 100 characters)")
    try:
        email = validate_email(sender.from_email, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise UsageError(f"from address {sender.from_email!r} is not valid: {exc}") from exc
    parse_relay_url(sender.relay_url)
    if (sender.dkim_selector is None) != (sender.dkim_key_pem is None):
        raise UsageError("DKIM needs both a selector and a private key")
    if sender.dkim_key_pem is not None and "PRIVATE KEY" not in sender.dkim_key_pem:
        raise UsageError("the DKIM key must be a PEM private key")
    checked = replace(sender, from_email=email)
    if checked.dkim_key_pem is not None:
        dkim_record(checked)  # a key that cannot sign fails now, with the reason, not at send time
    return checked


@dataclass(frozen=True)
class DkimRecord:
    """The TXT record receivers look up to verify a sender's signatures (RFC 6376 3.6.1)."""

    name: str  # <selector>._domainkey.<domain>
    value: str  # v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>

    def zone_line(self) -> str:
        return f'{self.name} TXT "{self.value}"'

    def strings(self) -> list[str]:
        """The value in character-strings of at most 255 bytes, as a zone file needs for 2048-bit keys."""
        return [self.value[i : i + 255] for i in range(0, len(self.value), 255)]


def dkim_record(sender: Sender) -> DkimRecord:
    """The DNS record for the sender's DKIM key; UserError for a sender without one.

    An RSA key's SubjectPublicKeyInfo (k=rsa, RFC 6376 3.6.1): mailflow signs with
    rsa-sha256 (dkimpy), so only RSA keys are taken."""
    if not sender.dkim_selector or not (sender.dkim_key_pem or sender.dkim_public_key):
        raise UserError(f"sender {sender.name!r} has no DKIM key (save it again with --dkim-selector and --dkim-key)")
    name = f"{sender.dkim_selector}._domainkey.{sender.domain}"
    if not sender.dkim_key_pem:  # as loaded: the public key was kept when the private one was sealed
        return DkimRecord(name=name, value=f"v=DKIM1; k=rsa; p={sender.dkim_public_key}")
    return DkimRecord(name=name, value=f"v=DKIM1; k=rsa; p={base64.b64encode(dkim_public_der(sender)).decode()}")


def dkim_public_der(sender: Sender) -> bytes:
    """The SubjectPublicKeyInfo (DER) of the sender's DKIM private key; UserError if unusable."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    assert sender.dkim_key_pem is not None
    try:
        key = serialization.load_pem_private_key(sender.dkim_key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise UserError(f"sender {sender.name!r}: its DKIM key is not a private key mailflow can read: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UserError(f"sender {sender.name!r}: DKIM keys are RSA (rsa-sha256), not {type(key).__name__}")
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
