"""Outbound room: a misbehaving SMTP peer (aiosmtpd, in process) for `mailflow demo` and the tests.

Real relays answer 4xx, 5xx, slowly, or hang up; this one does so on purpose. A recipient
picks its fault by local part (`bounce-1@...`, see FAULTS), or, with FaultRates, a stable
hash of the address gives a share of recipients each fault, the same one on every attempt.
Everything accepted is kept, so a test or the demo can compare what the server received
with what mailflow recorded.
"""

from __future__ import annotations

import asyncio
import email
import hashlib
import socket
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field, fields
from email.message import EmailMessage
from email.policy import default
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

# Local part "<fault>-<anything>" -> what the server does with that recipient:
FAULTS = {
    "bounce": "RCPT: 550 5.1.1, unknown user (mailflow suppresses the address)",
    "policy": "RCPT: 550 5.7.1, rejected for reputation (failed, not suppressed)",
    "tempfail": "RCPT: 451 4.3.0 with 'try again in 1 seconds', the first tempfail_times times",
    "busy": "RCPT: 451 4.2.1 with 'try again in 1 seconds', every time",
    "drop": "DATA: the connection is closed the first time, accepted after that",
    "slow": "DATA: accepted after slow_s",
    "stall": "DATA: accepted after stall_s (set it beyond the client's timeout)",
}


@dataclass(frozen=True)
class FaultRates:
    """Per mille of addresses given each fault, by a stable hash of the whole address."""

    bounce: int = 0
    policy: int = 0
    tempfail: int = 0
    drop: int = 0
    slow: int = 0


def fault_for(address: str, rates: FaultRates | None = None) -> str | None:
    """The fault (a key of FAULTS) this recipient gets, or None for a plain 250."""
    local = address.split("@", 1)[0].lower()
    for name in FAULTS:
        if local.startswith(name + "-"):
            return name
    if rates is None:
        return None
    fate = int(hashlib.sha256(address.encode()).hexdigest()[:8], 16) % 1000
    for f in fields(rates):
        share = getattr(rates, f.name)
        if fate < share:
            return f.name
        fate -= share
    return None


@dataclass
class Sink:
    """The aiosmtpd handler. Safe to read from other threads while holding `lock`."""

    tempfail_times: int = 1  # tempfail-*: answer 451 this many times, then accept
    delay_s: float = 0.0  # every message: answer DATA after this long
    slow_s: float = 0.2  # slow-* (and the slow share of FaultRates): added to delay_s
    stall_s: float = 2.0  # stall-*: added to delay_s
    rates: FaultRates | None = None  # faults for addresses whose local part names none
    received: list[EmailMessage] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)  # the bytes of each accepted message, as sent
    envelopes: list[tuple[str, str]] = field(default_factory=list)  # (MAIL FROM, RCPT TO) of each accepted message
    attempts: Counter = field(default_factory=Counter)  # RCPT commands per address
    data_attempts: Counter = field(default_factory=Counter)  # DATA commands per address
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fault(self, address: str) -> str | None:
        return fault_for(address, self.rates)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            self.attempts[address] += 1
            n = self.attempts[address]
        fault = self.fault(address)
        if fault == "bounce":
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in virtual mailbox table"
        if fault == "policy":
            return "550 5.7.1 Message rejected due to poor reputation"
        if fault == "busy":
            return "451 4.2.1 Mailbox busy, try again in 1 seconds"
        if fault == "tempfail" and n <= self.tempfail_times:
            return "451 4.3.0 Temporary failure (greylisted), please try again in 1 seconds"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        rcpt = envelope.rcpt_tos[0]
        fault = self.fault(rcpt)
        with self.lock:
            self.data_attempts[rcpt] += 1
            first = self.data_attempts[rcpt] == 1
        if fault == "drop" and first:
            server.transport.close()  # a connection lost mid-transaction
            return "421 4.4.2 Connection dropped"
        delay = self.delay_s + {"slow": self.slow_s, "stall": self.stall_s}.get(fault or "", 0.0)
        if delay:
            await asyncio.sleep(delay)
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=default)
        with self.lock:
            self.received.append(msg)
            self.raw.append(envelope.original_content or envelope.content)
            self.envelopes.append((envelope.mail_from, rcpt))
        return "250 2.0.0 Ok: queued"

    def delivered_to(self) -> Counter:
        """Accepted messages per recipient."""
        with self.lock:
            return Counter(rcpt for _, rcpt in self.envelopes)

    def message_ids(self) -> Counter:
        """Accepted messages per Message-ID: more than one is a message sent twice."""
        with self.lock:
            return Counter(str(m["Message-ID"]) for m in self.received)


class SinkServer:
    """A Sink listening on 127.0.0.1 (aiosmtpd's own thread): `with SinkServer(sink) as server:`."""

    def __init__(self, sink: Sink | None = None, *, credentials: tuple[str, str] | None = None) -> None:
        """With `credentials` (user, password), clients must AUTH (PLAIN or LOGIN, no TLS
        needed on loopback) before MAIL; `logins` counts the successful ones."""
        self.sink = sink if sink is not None else Sink()
        with socket.socket() as probe:  # aiosmtpd's Controller cannot start on port 0
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self.credentials = credentials
        self.logins = 0
        self.refused_logins = 0
        auth: dict[str, Any] = {}
        if credentials is not None:
            auth = {"authenticator": self._authenticate, "auth_required": True, "auth_require_tls": False}
            # A loopback test peer: AUTH without TLS is the point, not a mistake to warn about.
            warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=self.port, **auth)

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        assert self.credentials is not None
        user, password = self.credentials
        good = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
            user.encode(),
            password.encode(),
        )
        with self.sink.lock:
            if good:
                self.logins += 1
            else:
                self.refused_logins += 1
        return AuthResult(success=good, handled=False)

    def relay_url(self, timeout_s: float = 5.0) -> str:
        """The relay URL of a sender that sends here (plain SMTP: the sink offers no TLS)."""
        return f"smtp://127.0.0.1:{self.port}?tls=none&timeout={timeout_s:g}"

    @property
    def url(self) -> str:
        return self.relay_url()

    def __enter__(self) -> SinkServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()
