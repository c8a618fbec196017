"""Outbound room: senders - a From identity, the SMTP relay it sends through, optional DKIM.

A relay is a URL: smtp://[user:password@]host[:port][?tls=starttls|none], or
smtps://... for TLS from the first byte (port 465). STARTTLS is the default for smtp://
on any port but 25, where it is opportunistic-off unless asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from email_validator import EmailNotValidError, validate_email

from ..config import mask_url
from ..errors import UsageError

TLS_MODES = ("none", "starttls", "tls")


@dataclass(frozen=True)
class SmtpRelay:
    host: str
    port: int
    tls: str  # none | starttls | tls
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0

    @property
    def key(self) -> tuple[str, int, str, str | None]:
        """Messages for the same key can share one SMTP session."""
        return (self.host, self.port, self.tls, self.username)


def parse_relay_url(url: str) -> SmtpRelay:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"relay URL {mask_url(url)} is not valid: {exc}") from exc
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise UsageError(f"relay URL {mask_url(url)} must look like smtp://host:587 or smtps://host:465")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"tls", "timeout"}
    if unknown:
        raise UsageError(f"relay URL {mask_url(url)}: unknown option(s) {', '.join(sorted(unknown))}")
    if parts.scheme == "smtps":
        tls, port = "tls", port or 465
    else:
        port = port or 587
        tls = query.get("tls", "none" if port == 25 else "starttls")
    if tls not in TLS_MODES:
        raise UsageError(f"relay URL {mask_url(url)}: tls must be one of {', '.join(TLS_MODES)}")
    try:
        timeout = float(query.get("timeout", "30"))
    except ValueError as exc:
        raise UsageError(f"relay URL {mask_url(url)}: timeout must be a number of seconds") from exc
    return SmtpRelay(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        timeout_s=timeout,
    )


@dataclass(frozen=True)
class Sender:
    name: str
    from_email: str
    from_name: str
    relay_url: str
    dkim_selector: str | None = None
    dkim_key_pem: str | None = None

    @property
    def domain(self) -> str:
        return self.from_email.rsplit("@", 1)[1]

    @property
    def relay(self) -> SmtpRelay:
        return parse_relay_url(self.relay_url)


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
    return Sender(sender.name, email, sender.from_name, sender.relay_url, sender.dkim_selector, sender.dkim_key_pem)
