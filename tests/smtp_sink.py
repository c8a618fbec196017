"""A real SMTP server for tests (aiosmtpd, in process) that can answer with faults.

Recipients choose their fate by local part: bounce-* -> 550 5.1.1, policy-* -> 550 5.7.1,
tempfail-* -> 451 4.3.0 the first N times then accepted, drop-* -> connection closed
during DATA the first time; everything else -> 250. Every accepted message is kept.
"""

from __future__ import annotations

import asyncio
import email
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from email.policy import default

from aiosmtpd.controller import Controller


@dataclass
class Sink:
    tempfail_times: int = 1
    delay_s: float = 0.0
    received: list[email.message.EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, str]] = field(default_factory=list)
    attempts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        with self.lock:
            self.attempts[address] += 1
            n = self.attempts[address]
        if local.startswith("bounce"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if local.startswith("policy"):
            return "550 5.7.1 Message rejected due to poor reputation"
        if local.startswith("tempfail") and n <= self.tempfail_times:
            return "451 4.3.0 Temporary failure, please try again in 1 seconds"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        rcpt = envelope.rcpt_tos[0]
        if rcpt.split("@")[0].startswith("drop"):
            with self.lock:
                first = self.attempts[rcpt + "#data"] == 0
                self.attempts[rcpt + "#data"] += 1
            if first:
                server.transport.close()
                return "421 closing"
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=default)
        with self.lock:
            self.received.append(msg)
            self.envelopes.append((envelope.mail_from, rcpt))
        return "250 2.0.0 Ok: queued"

    def delivered_to(self) -> Counter:
        with self.lock:
            return Counter(r for _, r in self.envelopes)


class SinkServer:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        with socket.socket() as probe:  # aiosmtpd's Controller cannot start on port 0
            probe.bind(("127.0.0.1", 0))
            self._port = probe.getsockname()[1]
        self.controller = Controller(sink, hostname="127.0.0.1", port=self._port)

    def __enter__(self) -> "SinkServer":
        self.controller.start()
        return self

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?tls=none&timeout=5"

    def __exit__(self, *exc) -> None:
        self.controller.stop()
