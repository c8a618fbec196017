"""Inbound room: the SMTP server (`mailflow inbound`) - aiosmtpd's protocol, mailflow's policy.

`InboundSMTP` is aiosmtpd's protocol class with the connection limits (in all, and per
client IP: over either, `421 4.7.0` and the connection is closed). `Handler` is the policy,
as aiosmtpd intends: RCPT TO is accepted only for addresses mailflow is responsible for
(policy.py; everything else is `550 5.7.1`), at most `max_recipients` per message (`452
4.5.3`); DATA refuses bare LF line ends (`550 5.6.0`), and a 250 is sent only once the
message is committed (store.py), or 451 if it could not be. aiosmtpd itself answers an
over-size message with `552` (the limit is advertised with SIZE), an overlong line with
`500`, and closes a session idle past the timeout; `data_timeout_s` bounds how long one
DATA may take (a slow sender is cut off with `421 4.4.2`).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from mailflow.events.store import EventStore
from mailflow.inbound import directory, policy
from mailflow.inbound import queries as q
from mailflow.inbound.policy import Decision, Directory, Kind
from mailflow.inbound.store import Committer, Incoming
from mailflow.infra.health import Health
from mailflow.log import get_logger
from mailflow.mail import tokens

log = get_logger("mailflow.inbound")

TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections; try again later\r\n"


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 200
    max_connections_per_ip: int = 20
    timeout_s: float = 300.0  # a command (or a whole DATA) may take this long
    data_timeout_s: float = 600.0
    commit_timeout_s: float = 30.0


class Connections:
    """Open sessions, in all and per client IP (one event loop: no lock needed)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def admit(self, ip: str) -> bool:
        self.total += 1
        self.per_ip[ip] += 1
        return self.total <= self.limits.max_connections and self.per_ip[ip] <= self.limits.max_connections_per_ip

    def leave(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class InboundSMTP(SMTP):
    def __init__(self, handler: Handler, connections: Connections, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.policy = handler
        self.connections = connections
        self._ip = ""
        self._admitted: bool | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admitted is None:  # not the STARTTLS re-entry
            peer = transport.get_extra_info("peername")
            self._ip = str(peer[0]) if peer else ""
            self._admitted = self.connections.admit(self._ip)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted is not None:
            self.connections.leave(self._ip)
            self._admitted = None
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if not self._admitted:
            assert self.transport is not None
            self.transport.write(TOO_MANY_CONNECTIONS)  # type: ignore[attr-defined]
            self.transport.close()
            return
        await super()._handle_client()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        try:
            await asyncio.wait_for(super().smtp_DATA(arg), self.policy.limits.data_timeout_s)
        except TimeoutError:
            await self.push("421 4.4.2 Too slow: the message took too long to arrive; closing")
            assert self.transport is not None
            self.transport.close()


class Handler:
    def __init__(self, store: EventStore, committer: Committer, limits: Limits, secret: list[bytes]) -> None:
        self.store = store
        self.committer = committer
        self.limits = limits
        self.secret = secret
        self.directory = Directory()
        self.committing = 0  # sessions waiting for their message to be committed

    def _verp_job(self, address: str) -> str | None:
        try:
            return tokens.job_from_verp(self.secret, address)
        except tokens.BadToken:
            return None

    def _job_tenant(self, job_id: str) -> str | None:
        with self.store.pool.connection() as conn:
            row = conn.execute(q.JOB_TENANT, (job_id,)).fetchone()
        return str(row[0]) if row else None

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list) -> str:
        address = address.strip().strip("<>").strip()  # "" or "<>": the null sender of a bounce
        if address and policy.canonical(address) is None:
            return "553 5.1.7 The sender address is not a plain local@domain address"
        envelope.mail_from = address or "<>"  # aiosmtpd wants it truthy to allow RCPT
        envelope.mail_options.extend(options)
        envelope.decisions = []  # type: ignore[attr-defined]
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list) -> str:
        decisions: list[Decision] = getattr(envelope, "decisions", [])
        if len(envelope.rcpt_tos) >= self.limits.max_recipients:
            return f"452 4.5.3 Too many recipients: at most {self.limits.max_recipients} per message"
        decision = policy.decide(address, self.directory, self._verp_job)
        if decision.kind is Kind.BOUNCE:
            assert decision.job_id is not None
            try:
                tenant = await asyncio.to_thread(self._job_tenant, decision.job_id)
            except Exception:  # noqa: BLE001 - the database is away: the sender retries later
                return "451 4.3.0 Temporary failure; try again later"
            if tenant is None:
                return policy.UNKNOWN_JOB
            decision = Decision(Kind.BOUNCE, decision.address, (tenant,), decision.job_id)
        if not decision.accepted:
            log.info("inbound.refused", reason=decision.kind, client=session.peer[0] if session.peer else None)
            return decision.reply
        envelope.rcpt_tos.append(decision.address)
        envelope.rcpt_options.extend(options)
        decisions.append(decision)
        envelope.decisions = decisions  # type: ignore[attr-defined]
        return decision.reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        if _bare_lf(data):
            return "550 5.6.0 Bare LF line ends are not accepted: end every line with CRLF"
        recipients: dict[str, list[str]] = {}
        for d in getattr(envelope, "decisions", []):
            for tenant in d.tenants:
                recipients.setdefault(tenant, []).append(d.address)
        message = Incoming(
            recipients=recipients,
            data=bytes(data),
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            client_ip=session.peer[0] if session.peer else "",
            helo=session.host_name or "",
            tls=session.ssl is not None,
        )
        self.committing += 1
        try:
            ids = await asyncio.wait_for(
                asyncio.wrap_future(self.committer.submit(message)), self.limits.commit_timeout_s
            )
        except Exception:  # noqa: BLE001 - not committed: the client keeps it and retries
            return "451 4.3.0 The message could not be stored; try again later"
        finally:
            self.committing -= 1
        return f"250 2.0.0 OK: stored as {','.join(sorted(ids.values()))[:200]}"


def _bare_lf(data: bytes) -> bool:
    return data.count(b"\n") != data.count(b"\r\n")


def serve(
    store: EventStore,
    host: str,
    port: int,
    stop: threading.Event,
    *,
    limits: Limits,
    secret: list[bytes],
    hostname: str,
    tls: ssl.SSLContext | None = None,
    health: Health | None = None,
    listen: Callable[[str, int], Any],
    reload_s: float = 2.0,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Receive mail until `stop` is set; then stop accepting, let the sessions in flight end
    (their messages are committed or refused), and return."""
    asyncio.run(_serve(store, host, port, stop, limits, secret, hostname, tls, health, listen, reload_s, ready))


async def _serve(store, host, port, stop, limits, secret, hostname, tls, health, listen, reload_s, ready) -> None:
    committer = Committer(store)
    handler = Handler(store, committer, limits, secret)
    connections = Connections(limits)

    def load_directory() -> Directory:
        with store.pool.connection() as conn:
            return directory.load(conn)

    handler.directory = await asyncio.to_thread(load_directory)
    loop = asyncio.get_running_loop()

    def factory() -> InboundSMTP:
        return InboundSMTP(
            handler,
            connections,
            hostname=hostname,
            data_size_limit=limits.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls,
            timeout=limits.timeout_s,
            ident="mailflow",
        )

    sock = listen(host, port)
    server = await loop.create_server(factory, sock=sock)
    bound = sock.getsockname()[1]
    log.info("inbound.start", host=host, port=bound, starttls=tls is not None, **limits.__dict__)
    if ready is not None:
        ready(bound)
    reloaded = loop.time()
    try:
        while not stop.is_set():
            await asyncio.sleep(0.1)
            if health is not None:
                health.beat()
            if loop.time() - reloaded >= reload_s:
                reloaded = loop.time()
                try:
                    handler.directory = await asyncio.to_thread(load_directory)
                    if health is not None:
                        health.ok("postgres")
                except Exception as exc:  # noqa: BLE001 - keep the last directory meanwhile
                    if health is not None:
                        health.lost("postgres", exc)
    finally:
        server.close()  # no new sessions; those waiting for a commit get their answer
        deadline = loop.time() + limits.commit_timeout_s
        while handler.committing and loop.time() < deadline:  # noqa: ASYNC110 - a counter, bounded
            await asyncio.sleep(0.02)
        await asyncio.to_thread(committer.close)
        log.info("inbound.stop", committed=committer.committed, batches=committer.batches)
