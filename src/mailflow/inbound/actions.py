"""Inbound room: carrying out the routes' `http` and `forward` actions - signed, retried POSTs, and
forwards over SMTP through a smart host - at least once, each attempt an event.

MessageRouted puts one `route_actions` row per http or forward delivery (the `messages` inline
projection, mailbox.py; `plan()` here). `run()` is the loop `mailflow inbound` runs beside its
SMTP server: it claims due rows with FOR UPDATE SKIP LOCKED and a lease (`lease_until`), so two
inbound processes never send one action at once, a few per tenant at a time so that one
tenant's backlog does not starve the others, and carries each one out:

- http: a POST of JSON (the message's id, recipient, route, captures, envelope, verdicts, and
  the raw message in base64 when it is not over the size limit) signed per Standard Webhooks
  (webhook-id, webhook-timestamp, webhook-signature) with the tenant's secret, made on first
  use and kept in the vault (`webhook_secret()`; `mailflow routes secret`). 2xx is done; 408,
  429, 5xx and no answer are retried (Retry-After honoured); any other status is final.
- forward: the stored copy, with a Received and an X-Forwarded-For header of ours on top,
  through MAILFLOW_INBOUND_FORWARD_RELAY to the target, from an SRS0= address at the
  recipient's inbound domain (`srs_address()`), so that SPF holds at the next hop and bounces
  come back to mailflow, not to the original sender. 2xx is done, 4xx and no answer are
  retried, 5xx is final. With no relay configured, forwards fail (final), said once in the log.

A row changes only with its event: RouteActionDone or RouteActionFailed (a retry at
`retry_at`, or `final`) is recorded through inline.writing(), in the transaction that
checks the row is still the claimed attempt. A process that dies between a send and its
record leaves the row leased; after the lease another process sends it again: at least once,
never lost. Receivers dedupe by webhook-id, which is the same for every attempt of an action.
The decisions (what an answer means, when to try again) are pure functions. What this module
shares with the webhook endpoints (webhooks.py) - the HTTP decisions, signing, the HTTP client
and the claim-attempt-record loop - lives in delivery.py.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiosmtplib
import orjson
import psycopg
from psycopg.rows import dict_row

from mailflow.consumers import inline
from mailflow.events.envelope import Envelope, Metadata
from mailflow.events.store import EventStore
from mailflow.inbound.delivery import (
    Attempt,
    HttpPoster,
    Loop,
    LoopOptions,
    Outcome,
    RetryPolicy,
    Verdict,
    decide,
    http_outcome,
    new_secret,
    retry_after,
    sign,
    signed_headers,
)
from mailflow.inbound.events import RouteActionDone, RouteActionFailed
from mailflow.infra.vault import Vault
from mailflow.log import get_logger
from mailflow.mail import tokens

log = get_logger("mailflow.inbound.actions")

# The decisions and the HTTP client are shared with the webhook endpoints (delivery.py), and
# named here too, as they were first written here.
__all__ = ["Attempt", "HttpPoster", "RetryPolicy", "Verdict", "http_outcome", "retry_after", "sign"]

ACTIONS = ("http", "forward")  # the deliveries that something must carry out
SECRET_KIND = "webhook_secret"
SECRET_OWNER = "routes"
SRS_PREFIX = "SRS0="
SRS_VALID_DAYS = 30  # a bounce to an SRS address older than this is not ours any more
MAX_HOPS = 30  # Received headers: a message with more is in a loop (RFC 5321 section 6.3)
NO_RELAY = "forwarding needs a smart host: set MAILFLOW_INBOUND_FORWARD_RELAY (smtp://host:port)"

# -- SQL, by name ------------------------------------------------------------------------------

PLAN = """
INSERT INTO route_actions (tenant, message_id, recipient, action, target, route_id, captures, next_at, created_at)
SELECT u.tenant, u.message_id, u.recipient, u.action, u.target, u.route_id, u.captures::jsonb, u.at, u.at
FROM unnest(%b::text[], %b::uuid[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[])
     AS u(tenant, message_id, recipient, action, target, route_id, captures, at)
ON CONFLICT DO NOTHING
"""
_KEY = "(a.tenant, a.message_id, a.recipient, a.action, a.target) = (u.tenant, u.message_id, u.recipient, u.action, u.target)"
SET_DONE = f"""
UPDATE route_actions a SET state = 'done', attempts = u.attempts, last_status = u.status, last_error = NULL,
                           lease_until = NULL, done_at = u.at
FROM unnest(%b::text[], %b::uuid[], %b::text[], %b::text[], %b::text[], %b::int[], %b::int[], %b::timestamptz[])
     AS u(tenant, message_id, recipient, action, target, attempts, status, at)
WHERE {_KEY}
"""
SET_FAILED = f"""
UPDATE route_actions a SET state = CASE WHEN u.final THEN 'failed' ELSE 'pending' END, attempts = u.attempts,
                           last_status = u.status, last_error = u.error, lease_until = NULL,
                           next_at = coalesce(u.retry_at, a.next_at), done_at = CASE WHEN u.final THEN u.at END
FROM unnest(%b::text[], %b::uuid[], %b::text[], %b::text[], %b::text[], %b::int[], %b::int[], %b::text[],
            %b::bool[], %b::timestamptz[], %b::timestamptz[])
     AS u(tenant, message_id, recipient, action, target, attempts, status, error, final, retry_at, at)
WHERE {_KEY}
"""
# Due rows not leased by a live process: the tenants waiting longest first, an equal share of
# the batch each, and for each row what the POST says about its message.
_DUE = "state = 'pending' AND next_at <= now() AND (lease_until IS NULL OR lease_until < now())"
CLAIM = f"""
WITH waiting AS (
    SELECT tenant, min(next_at) AS oldest FROM route_actions r
    WHERE {_DUE} AND NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = r.tenant AND t.status <> 'active')
    GROUP BY tenant ORDER BY oldest LIMIT %(limit)s
), due AS (
    SELECT d.* FROM waiting w CROSS JOIN LATERAL (
        SELECT tenant, message_id, recipient, action, target FROM route_actions r
        WHERE r.tenant = w.tenant AND {_DUE}
        ORDER BY r.next_at LIMIT (SELECT ceil(%(limit)s::numeric / count(*)) FROM waiting)
        FOR UPDATE SKIP LOCKED
    ) d
    LIMIT %(limit)s
)
UPDATE route_actions a SET lease_until = now() + make_interval(secs => %(lease_s)s)
FROM due u, inbound_messages m
WHERE {_KEY} AND (m.tenant, m.id) = (a.tenant, a.message_id)
RETURNING a.tenant, a.message_id::text, a.recipient, a.action, a.target, a.route_id, a.captures, a.attempts,
          m.sha256, m.received_at, m.recipients, m.helo, m.tls, m.auth, m.spam,
          (SELECT octet_length(r.data) FROM raw_messages r WHERE (r.tenant, r.sha256) = (m.tenant, m.sha256))
              AS raw_size
"""
RAW = "SELECT data FROM raw_messages WHERE tenant = %s AND sha256 = %s"
LOCK_ACTION = """
SELECT state, attempts, clock_timestamp() AS now FROM route_actions
WHERE tenant = %s AND message_id = %s AND recipient = %s AND action = %s AND target = %s FOR UPDATE
"""
GET_SECRET = f"SELECT id::text FROM secrets WHERE tenant = %s AND kind = '{SECRET_KIND}'"
DROP_SECRET = f"DELETE FROM secrets WHERE tenant = %s AND kind = '{SECRET_KIND}'"
LIST_ACTIONS = """
SELECT tenant, message_id::text, recipient, action, target, route_id, state, attempts, next_at, last_status,
       last_error, created_at, done_at
FROM route_actions WHERE (%(message_id)s::uuid IS NULL OR message_id = %(message_id)s) ORDER BY created_at, recipient
"""


# -- decisions (pure) --------------------------------------------------------------------------


def smtp_outcome(code: int | None) -> Outcome:
    """2xx done; 5xx final (the relay or the next hop refused it for good); 4xx, anything
    else and no answer retried."""
    if code is not None and 200 <= code <= 299:
        return "done"
    return "final" if code is not None and 500 <= code <= 599 else "retry"


def judge(action: str, attempt: Attempt, attempts: int, policy: RetryPolicy) -> Verdict:
    """What to record after the `attempts`-th attempt (counting this one)."""
    return decide((http_outcome if action == "http" else smtp_outcome)(attempt.status), attempt, attempts, policy)


def webhook_id(tenant: str, message_id: str, recipient: str, target: str) -> str:
    """The same for every attempt of one action: receivers dedupe by it (at-least-once)."""
    return "msg_" + uuid.uuid5(uuid.NAMESPACE_URL, f"mailflow:{tenant}:{message_id}:{recipient}:{target}").hex


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def srs_address(key: bytes, message_id: str, domain: str, day: int) -> str:
    """SRS0=<token>@domain: the envelope sender of a forward. The token (tokens.sign: HMAC
    under the installation's key) names the message and the day, so a bounce to it proves
    itself and expires; the original sender is not in it (bounces come back to mailflow).
    At most 58 characters before the @, within RFC 5321's 64."""
    return f"{SRS_PREFIX}{tokens.sign(key, f'{day:x}.{_b64url(uuid.UUID(message_id).bytes)}')}@{domain}"


def srs_message(keys: bytes | list[bytes], address: str, today: int) -> str:
    """The message id an SRS0= address of ours names; tokens.BadToken if forged or expired."""
    local = address.rsplit("@", 1)[0]
    if not local.upper().startswith(SRS_PREFIX.upper()):
        raise tokens.BadToken(f"{address!r} is not an SRS address")
    day, _, uid = tokens.verify(keys, local[len(SRS_PREFIX) :]).partition(".")
    try:
        age = today - int(day, 16)
        message_id = str(uuid.UUID(bytes=base64.urlsafe_b64decode(uid + "=" * (-len(uid) % 4))))
    except ValueError as exc:
        raise tokens.BadToken("malformed SRS token") from exc
    if not 0 <= age <= SRS_VALID_DAYS:
        raise tokens.BadToken("the SRS address has expired")
    return message_id


def epoch_day(now: datetime) -> int:
    return int(now.timestamp() // 86400)


def hops(raw: bytes) -> int:
    """How many Received headers the message's header section has."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    return sum(1 for line in head.split(b"\r\n") if line[:9].lower() == b"received:")


def trace(hostname: str, message_id: str, recipient: str, target: str, now: datetime) -> bytes:
    """The headers a forward adds on top: where it went through, and for whom."""
    return (
        f"Received: by {hostname} (mailflow) id {message_id}\r\n\tfor <{target}>; "
        f"{email.utils.format_datetime(now)}\r\nX-Forwarded-For: {recipient} {target}\r\n"
    ).encode()


# -- the projection (the `messages` inline projection applies these: mailbox.py) ---------------


def plan(conn: psycopg.Connection, events: Sequence[Envelope]) -> None:
    """MessageRouted: a pending row for each http and forward delivery, due at once."""
    rows = [
        (
            str(e.metadata.tenant),
            e.data["message_id"],
            d["recipient"],
            d["action"],
            d["target"],
            d.get("route_id"),
            orjson.dumps(d.get("captures") or {}).decode(),
            e.recorded_at,
        )
        for e in events
        for d in e.data["deliveries"]
        if d["action"] in ACTIONS
    ]
    if rows:
        conn.execute(PLAN, tuple(list(c) for c in zip(*rows)))


def _key(e: Envelope) -> tuple[str, str, str, str, str]:
    d = e.data
    return (str(e.metadata.tenant), d["message_id"], d["recipient"], d["action"], d["target"])


def _last_per_action(events: Sequence[Envelope]) -> list[Envelope]:
    """One event per action, the last: a run of outcomes (a rebuild) may hold several."""
    return list({_key(e): e for e in events}.values())


def project_done(conn: psycopg.Connection, events: list[Envelope]) -> None:
    rows = [(*_key(e), e.data["attempts"], e.data["status"], e.recorded_at) for e in _last_per_action(events)]
    conn.execute(SET_DONE, tuple(list(c) for c in zip(*rows)))


def project_failed(conn: psycopg.Connection, events: list[Envelope]) -> None:
    rows = [
        (
            *_key(e),
            e.data["attempts"],
            e.data.get("status"),
            e.data["error"],
            e.data["final"],
            datetime.fromisoformat(e.data["retry_at"]) if e.data.get("retry_at") else None,
            e.recorded_at,
        )
        for e in _last_per_action(events)
    ]
    conn.execute(SET_FAILED, tuple(list(c) for c in zip(*rows)))


def listing(conn: psycopg.Connection, message_id: str | None = None) -> list[dict[str, Any]]:
    """The actions (the connection's tenant's), oldest first; of one message with `message_id`."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(LIST_ACTIONS, {"message_id": message_id}).fetchall()


# -- the signing secret ------------------------------------------------------------------------


def webhook_secret(conn: psycopg.Connection, vault: Vault, tenant: str, *, rotate: bool = False) -> str:
    """The tenant's webhook signing secret (whsec_<base64>, as Standard Webhooks libraries take
    it), made on first use; `rotate`: replaced by a new one. Kept only in the vault (encrypted),
    never in an event or a log line. A unique index makes two first uses agree on one."""
    with conn.transaction():
        if rotate:
            conn.execute(DROP_SECRET, (tenant,))
        else:
            row = conn.execute(GET_SECRET, (tenant,)).fetchone()
            if row is not None:
                return vault.get(conn, row[0])
        secret = new_secret()
        try:
            with conn.transaction():
                vault.put(conn, tenant=tenant, kind=SECRET_KIND, owner=SECRET_OWNER, plaintext=secret)
            return secret
        except psycopg.errors.UniqueViolation:  # another process made it first: theirs
            row = conn.execute(GET_SECRET, (tenant,)).fetchone()
            assert row is not None
            return vault.get(conn, row[0])


# -- the senders (thin I/O shells) -------------------------------------------------------------


class Forwarder:
    """Forwards over SMTP through one smart host: `connect()` makes an unconnected aiosmtplib
    client for it (commands/inbound.py builds it from MAILFLOW_INBOUND_FORWARD_RELAY).
    `srs_key` signs the SRS0= envelope senders; `hostname` names this server in Received."""

    def __init__(self, connect: Callable[[], aiosmtplib.SMTP], *, srs_key: bytes, hostname: str) -> None:
        self.connect = connect
        self.srs_key = srs_key
        self.hostname = hostname

    async def forward(self, message_id: str, recipient: str, target: str, raw: bytes) -> Attempt:
        if hops(raw) >= MAX_HOPS:
            return Attempt(None, f"a mail loop: the message has {hops(raw)} Received headers", permanent=True)
        now = datetime.now(UTC)
        domain = recipient.rsplit("@", 1)[1]
        mail_from = srs_address(self.srs_key, message_id, domain, epoch_day(now))
        data = trace(self.hostname, message_id, recipient, target, now) + raw
        return await self.send(mail_from, target, data)

    async def send(self, mail_from: str, rcpt_to: str, data: bytes) -> Attempt:
        client = self.connect()
        try:
            async with client:
                await client.sendmail(mail_from, [rcpt_to], data)
            return Attempt(250)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients[0]
            return Attempt(refused.code, f"{refused.code} {refused.message}")
        except aiosmtplib.SMTPNotSupported as exc:
            return Attempt(None, f"the relay cannot take it: {exc}", permanent=True)
        except aiosmtplib.SMTPResponseException as exc:
            return Attempt(exc.code, f"{exc.code} {exc.message}")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return Attempt(None, f"{type(exc).__name__}: {exc}")


# -- the loop ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options(LoopOptions):
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_raw_bytes: int = 5 * 1024 * 1024  # a larger message is POSTed without its raw copy
    secret_ttl_s: float = 10.0  # a rotated secret is used after at most this long


@dataclass(frozen=True)
class Claimed:
    """One action this process holds the lease of, with what the POST says about its message."""

    tenant: str
    message_id: str
    recipient: str
    action: str
    target: str
    route_id: str | None
    captures: dict[str, str]
    attempts: int  # before this one
    sha256: str
    received_at: datetime
    recipients: list[str]
    helo: str
    tls: bool
    auth: dict[str, Any] | None
    spam: dict[str, Any] | None
    raw_size: int | None  # None: the raw copy is gone

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.tenant, self.message_id, self.recipient, self.action, self.target)


def body(c: Claimed, raw: bytes | None, max_raw_bytes: int) -> bytes:
    """The POST's JSON: no secret, no sender address but what the raw message itself says."""
    omitted = "deleted" if c.raw_size is None else "too_large" if c.raw_size > max_raw_bytes else None
    return orjson.dumps(
        {
            "message_id": c.message_id,
            "tenant": c.tenant,
            "recipient": c.recipient,
            "route_id": c.route_id,
            "captures": c.captures,
            "envelope": {"recipients": c.recipients, "helo": c.helo, "tls": c.tls},
            "auth": c.auth,
            "spam": c.spam,
            "received_at": c.received_at.isoformat(),
            "sha256": c.sha256,
            "size": c.raw_size,
            "raw": base64.b64encode(raw).decode() if raw is not None and omitted is None else None,
            "raw_omitted": omitted,
        }
    )


class Actions(Loop[Claimed, Verdict]):
    """The loop of one inbound process (see the module docstring); `run()` drives it."""

    prefix = "inbound.actions"
    done_line = "inbound.action"

    def __init__(
        self,
        store: EventStore,
        vault: Vault,
        http: HttpPoster,
        forwarder: Forwarder | None,
        options: Options,
    ) -> None:
        super().__init__(store, options)
        self.vault = vault
        self.http = http
        self.forwarder = forwarder
        self.retry = options.retry
        self.max_raw_bytes = options.max_raw_bytes
        self.secret_ttl_s = options.secret_ttl_s
        self.told_no_relay = False

    def _start_fields(self) -> dict[str, Any]:
        return {"forward_relay": self.forwarder is not None, **super()._start_fields()}

    async def _close(self) -> None:
        await self.http.aclose()

    def _fields(self, c: Claimed, verdict: Verdict | None = None) -> dict[str, Any]:
        if verdict is None:
            return {"message_id": c.message_id}
        return {
            "tenant": c.tenant,
            "message_id": c.message_id,
            "action": c.action,
            "route_id": c.route_id,
            "attempts": c.attempts + 1,
            "outcome": verdict.outcome,
            "status": verdict.status,
            "error": verdict.error or None,
        }

    def _judge(self, c: Claimed, attempt: Attempt) -> Verdict:
        return judge(c.action, attempt, c.attempts + 1, self.retry)

    def _claim(self, limit: int) -> list[Claimed]:
        with self.store.pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(CLAIM, {"limit": limit, "lease_s": self.options.lease_s}).fetchall()
        return [Claimed(**r) for r in rows]

    def _raw(self, c: Claimed) -> bytes | None:
        with self.store.pool.connection() as conn:
            row = conn.execute(RAW, (c.tenant, c.sha256)).fetchone()
        return None if row is None else bytes(row[0])

    def _secret(self, tenant: str) -> str:
        return self._secret_of(tenant, self.secret_ttl_s, lambda conn: webhook_secret(conn, self.vault, tenant))

    async def _attempt(self, c: Claimed) -> Attempt:
        if c.action == "forward":
            if self.forwarder is None:
                if not self.told_no_relay:
                    self.told_no_relay = True
                    log.warning("inbound.actions.no_forward_relay", error=NO_RELAY)
                return Attempt(None, NO_RELAY, permanent=True)
            raw = await self._db(self._raw, c)
            if raw is None:
                return Attempt(None, "the message's raw copy was deleted", permanent=True)
            return await self.forwarder.forward(c.message_id, c.recipient, c.target, raw)
        secret = await self._db(self._secret, c.tenant)
        fits = c.raw_size is not None and c.raw_size <= self.max_raw_bytes
        raw = await self._db(self._raw, c) if fits else None
        payload = await asyncio.to_thread(body, c, raw, self.max_raw_bytes)
        msg_id = webhook_id(c.tenant, c.message_id, c.recipient, c.target)
        return await self.http.post(c.target, payload, signed_headers(secret, msg_id, payload))

    def _record(self, c: Claimed, verdict: Verdict) -> bool:
        """Record the attempt, if the row is still the one claimed (else another process, after
        this one's lease ran out, sent it and recorded first: nothing to add)."""
        with inline.writing(self.store.for_tenant(c.tenant)) as w:
            row = w.conn.execute(LOCK_ACTION, c.key).fetchone()
            if row is None or row[0] != "pending" or row[1] != c.attempts:
                return False
            attempts, md = c.attempts + 1, Metadata(tenant=c.tenant)
            common = {"message_id": c.message_id, "recipient": c.recipient, "action": c.action, "target": c.target}
            event: RouteActionDone | RouteActionFailed
            if verdict.outcome == "done":
                event = RouteActionDone(**common, attempts=attempts, status=verdict.status or 0)
            else:
                retry_at = row[2] + timedelta(seconds=verdict.delay_s) if verdict.delay_s is not None else None
                event = RouteActionFailed(
                    **common,
                    attempts=attempts,
                    error=verdict.error,
                    final=verdict.outcome == "final",
                    status=verdict.status,
                    retry_at=retry_at,
                )
            w.record([(f"inbound-message-{c.message_id}", event.to_new(md))])
        return True


async def run(
    store: EventStore,
    stop: threading.Event | asyncio.Event,
    *,
    http: HttpPoster,
    forwarder: Forwarder | None,
    vault: Vault,
    options: Options | None = None,
) -> None:
    """Carry out due route actions until `stop` is set (an operator's store: every tenant's)."""
    await Actions(store, vault, http, forwarder, options or Options()).run(stop)
