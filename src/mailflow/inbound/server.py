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

Before the 250, DATA finds out what the message is, in a worker thread (the event loop keeps
serving other sessions): its defects (defects.py), its headers, and its SPF, DKIM, ARC and
DMARC verdicts (authn.py); then its spam score (spam.py: built-in rules, and spamd or rspamd
when configured). Routing (routing.py) turns that into one outcome per tenant: refused for
its spam score (when every tenant refuses, `550 5.7.1` before any 250: no backscatter),
quarantined, or routed to its deliveries. The stored copy starts with an
Authentication-Results header (RFC 8601) naming this server.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from mailflow.events.store import EventStore
from mailflow.inbound import defects, directory, mailbox, policy, routing
from mailflow.inbound import queries as q
from mailflow.inbound.authn import Authenticator
from mailflow.inbound.policy import Decision, Directory, Kind
from mailflow.inbound.routing import Recipient
from mailflow.inbound.spam import Checker, Thresholds
from mailflow.inbound.store import Committer, Incoming
from mailflow.infra.health import Health
from mailflow.log import get_logger
from mailflow.mail import tokens

log = get_logger("mailflow.inbound")

TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections; try again later\r\n"
TOO_SLOW = b"421 4.4.2 Too slow: the message took too long to arrive; closing\r\n"


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
        self.data_timer: asyncio.TimerHandle | None = None

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
        """DATA bounded by `data_timeout_s`, from the command to the last byte: past it, `421
        4.4.2` is written and the connection closed. A timer, not wait_for: cancelling
        aiosmtpd's DATA would look to it like a lost connection, and nothing would be said.
        The idle timeout is stretched to match (aiosmtpd re-arms it per command only), and
        the timer stops once the message is in (the commit has its own bound)."""
        limits = self.policy.limits
        self._reset_timeout(max(limits.timeout_s, limits.data_timeout_s) + 1)
        self.data_timer = self.loop.call_later(limits.data_timeout_s, self._too_slow)
        try:
            await super().smtp_DATA(arg)
        finally:
            self.data_timer.cancel()
            self._reset_timeout()

    def _too_slow(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            log.info("inbound.too_slow", client=self._ip, limit_s=self.policy.limits.data_timeout_s)
            transport.write(TOO_SLOW)  # type: ignore[attr-defined]
            transport.close()


@dataclass(frozen=True)
class _Unauthenticated:
    """The verdicts when authentication is off (MAILFLOW_INBOUND_AUTHENTICATION=false)."""

    spf: str = "none"
    dmarc: str = "none"
    dmarc_policy: str | None = None


class Handler:
    def __init__(
        self,
        store: EventStore,
        committer: Committer,
        limits: Limits,
        secret: list[bytes],
        *,
        authenticator: Authenticator | None = None,
        checker: Checker | None = None,
        authserv_id: str = "mailflow",
    ) -> None:
        self.store = store
        self.committer = committer
        self.limits = limits
        self.secret = secret
        self.authenticator = authenticator
        self.checker = checker or Checker()
        self.authserv_id = authserv_id
        self.directory = Directory()
        self.thresholds: dict[str, Thresholds] = {}  # tenant -> its own (the others: the defaults)
        self.committing = 0  # sessions waiting for their message to be committed
        self.counts: Counter[str] = Counter()  # accepted, refused_spam, quarantined, ...
        self.seconds: dict[str, float] = dict.fromkeys(
            ("examine", "spam", "commit"), 0.0
        )  # time spent per stage, summed over the messages

    def _verp_job(self, address: str) -> str | None:
        try:
            return tokens.job_from_verp(self.secret, address)
        except tokens.BadToken:
            return None

    def _owner(self, decision: Decision) -> tuple[str, str | None] | None:
        """Whose a signed address is: a bounced job's tenant and its sender's From, or an
        unsubscribe address's campaign's tenant (None: no such job or campaign)."""
        with self.store.pool.connection() as conn:
            if decision.kind is Kind.BOUNCE:
                row = conn.execute(q.JOB_TENANT, (decision.job_id,)).fetchone()
                return (str(row[0]), row[1]) if row else None
            try:
                uuid.UUID(str(decision.campaign_id))
            except ValueError:
                return None
            row = conn.execute(q.CAMPAIGN_OWNER, (decision.campaign_id,)).fetchone()
            return (str(row[0]), None) if row else None

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list) -> str:
        address = address.strip().strip("<>").strip()  # "" or "<>": the null sender of a bounce
        if address and policy.canonical(address) is None:
            return "553 5.1.7 The sender address is not a plain local@domain address"
        envelope.mail_from = address or "<>"  # aiosmtpd wants it truthy to allow RCPT
        envelope.mail_options.extend(options)
        envelope.recipients = []  # type: ignore[attr-defined]
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list) -> str:
        accepted: list[Recipient] = getattr(envelope, "recipients", [])
        if len(envelope.rcpt_tos) >= self.limits.max_recipients:
            return f"452 4.5.3 Too many recipients: at most {self.limits.max_recipients} per message"
        decision = policy.decide(address, self.directory, self._verp_job)
        bounce_sender: str | None = None
        if decision.kind in (Kind.BOUNCE, Kind.UNSUBSCRIBE):  # a signed address: whose is it?
            try:
                owner = await asyncio.to_thread(self._owner, decision)
            except Exception:  # noqa: BLE001 - the database is away: the sender retries later
                return "451 4.3.0 Temporary failure; try again later"
            if owner is None:
                return policy.UNKNOWN_JOB if decision.kind is Kind.BOUNCE else policy.UNKNOWN_UNSUBSCRIBE
            tenant, bounce_sender = owner
            decision = replace(decision, tenants=(tenant,))
        if not decision.accepted:
            log.info("inbound.refused", reason=decision.kind, client=session.peer[0] if session.peer else None)
            return decision.reply
        envelope.rcpt_tos.append(decision.address)
        envelope.rcpt_options.extend(options)
        accepted.append(Recipient(decision, routing.default_mailbox(decision, self.directory, bounce_sender)))
        envelope.recipients = accepted  # type: ignore[attr-defined]
        return decision.reply

    def _examine(self, data: bytes, mail_from: str, client_ip: str, helo: str, smtputf8: bool) -> tuple:
        """In a worker thread, one hop for all the CPU work: the defects, the headers, the
        authentication verdicts and the built-in spam rules."""
        found = defects.find(data)
        head = defects.headers(data)
        verdicts = None
        if self.authenticator is not None:
            verdicts = self.authenticator.check(data, client_ip=client_ip, helo=helo, mail_from=mail_from)
        auth = verdicts or _Unauthenticated()
        hits = self.checker.builtin_hits(data, auth, smtputf8=smtputf8, defect_names=found)
        return found, head, verdicts, hits

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        timer = getattr(server, "data_timer", None)
        if timer is not None:  # the message is in: what follows has bounds of its own
            timer.cancel()
        data = bytes(envelope.original_content or b"")
        if _bare_lf(data):
            return "550 5.6.0 Bare LF line ends are not accepted: end every line with CRLF"
        mail_from = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        client_ip = session.peer[0] if session.peer else ""
        helo = session.host_name or ""
        by_tenant: dict[str, list[Recipient]] = {}
        for r in getattr(envelope, "recipients", []):
            for tenant in r.decision.tenants:
                by_tenant.setdefault(tenant, []).append(r)
        started = time.perf_counter()
        smtputf8 = bool(envelope.smtp_utf8)
        found, head, verdicts, hits = await asyncio.to_thread(self._examine, data, mail_from, client_ip, helo, smtputf8)
        examined = time.perf_counter()
        score = await self.checker.check(
            data,
            verdicts or _Unauthenticated(),
            client_ip=client_ip,
            helo=helo,
            mail_from=mail_from,
            recipients=list(envelope.rcpt_tos),
            smtputf8=smtputf8,
            defect_names=found,
            builtin=hits,
        )
        outcomes = {
            tenant: routing.outcome(
                score,
                self.thresholds.get(tenant, Thresholds()),
                routing.deliveries(recips, self.directory.routes.get(tenant, ()), head),
            )
            for tenant, recips in by_tenant.items()
        }
        message = Incoming(
            recipients={t: [r.decision.address for r in rs] for t, rs in by_tenant.items()},
            data=data,
            mail_from=mail_from,
            client_ip=client_ip,
            helo=helo,
            tls=session.ssl is not None,
            outcomes=outcomes,
            header=verdicts.header(self.authserv_id) if verdicts is not None else b"",
            auth=verdicts.to_event() if verdicts is not None else None,
            spam=score.to_event(),
            defects=found,
        )
        self.committing += 1
        try:
            scored = time.perf_counter()
            ids = await asyncio.wait_for(
                asyncio.wrap_future(self.committer.submit(message)), self.limits.commit_timeout_s
            )
        except Exception:  # noqa: BLE001 - not committed: the client keeps it and retries
            return "451 4.3.0 The message could not be stored; try again later"
        finally:
            self.committing -= 1
        kinds = Counter(o.kind for o in outcomes.values())
        self.counts.update(kinds)
        for stage, took in (
            ("examine", examined - started),
            ("spam", scored - examined),
            ("commit", time.perf_counter() - scored),
        ):
            self.seconds[stage] += took
        if kinds["rejected"] == len(outcomes):  # every tenant refused it: say so, nothing was stored
            reason = next(iter(outcomes.values())).reason
            log.info("inbound.rejected", reason=reason, score=score.score, rules=list(score.rules)[:20])
            return f"550 5.7.1 Message refused: {reason}"[:400]
        if kinds["quarantined"]:
            log.info("inbound.quarantined", message_ids=sorted(ids.values()), score=score.score)
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
    authenticator: Authenticator | None = None,
    checker: Checker | None = None,
    actions: Callable[[asyncio.Event], Awaitable[None]] | None = None,
) -> None:
    """Receive mail until `stop` is set; then stop accepting, let the sessions in flight end
    (their messages are committed or refused), and return. `authenticator` None: no SPF,
    DKIM, ARC or DMARC checks; `checker` None: the built-in spam rules alone. `actions`: a
    task run beside the server until it stops (the routes' actions: actions.run), told to
    stop with the asyncio.Event it is given."""
    committer = Committer(store)
    handler = Handler(
        store, committer, limits, secret, authenticator=authenticator, checker=checker, authserv_id=hostname
    )
    asyncio.run(_serve(handler, host, port, stop, hostname, tls, health, listen, reload_s, ready, actions))


async def _serve(
    handler: Handler, host, port, stop, hostname, tls, health, listen, reload_s, ready, actions=None
) -> None:
    store, committer, limits = handler.store, handler.committer, handler.limits
    connections = Connections(limits)

    def load_directory() -> tuple[Directory, dict[str, Thresholds]]:
        with store.pool.connection() as conn:
            return directory.load(conn), mailbox.every_tenants_thresholds(conn)

    handler.directory, handler.thresholds = await asyncio.to_thread(load_directory)
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
    halt_actions = asyncio.Event()
    background = asyncio.create_task(actions(halt_actions)) if actions is not None else None
    try:
        while not stop.is_set():
            await asyncio.sleep(0.1)
            if health is not None:
                health.beat()
            if loop.time() - reloaded >= reload_s:
                reloaded = loop.time()
                try:
                    handler.directory, handler.thresholds = await asyncio.to_thread(load_directory)
                    if health is not None:
                        health.ok("postgres")
                except Exception as exc:  # noqa: BLE001 - keep the last directory meanwhile
                    if health is not None:
                        health.lost("postgres", exc)
    finally:
        halt_actions.set()
        server.close()  # no new sessions; those waiting for a commit get their answer
        deadline = loop.time() + limits.commit_timeout_s
        while handler.committing and loop.time() < deadline:  # noqa: ASYNC110 - a counter, bounded
            await asyncio.sleep(0.02)
        await asyncio.to_thread(committer.close)
        if background is not None:
            ended: BaseException | None = (await asyncio.gather(background, return_exceptions=True))[0]
            if isinstance(ended, Exception):  # it drains its actions within their lease, then ends
                log.error("inbound.actions_failed", error=f"{type(ended).__name__}: {ended}"[:300])
        per = {f"{k}_ms": round(v * 1000 / max(1, committer.committed), 2) for k, v in handler.seconds.items()}
        log.info("inbound.stop", committed=committer.committed, batches=committer.batches, **handler.counts, **per)
