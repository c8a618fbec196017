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
The decisions (what an answer means, when to try again) are pure functions.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import aiosmtplib
import orjson
import psycopg
from psycopg.rows import dict_row

from mailflow.consumers import inline
from mailflow.events.envelope import Envelope, Metadata
from mailflow.events.store import EventStore
from mailflow.inbound.events import RouteActionDone, RouteActionFailed
from mailflow.infra.vault import Vault
from mailflow.log import get_logger
from mailflow.mail import tokens

if TYPE_CHECKING:
    import httpx

log = get_logger("mailflow.inbound.actions")

ACTIONS = ("http", "forward")  # the deliveries that something must carry out
SECRET_KIND = "webhook_secret"
SECRET_OWNER = "routes"
SRS_PREFIX = "SRS0="
SRS_VALID_DAYS = 30  # a bounce to an SRS address older than this is not ours any more
MAX_HOPS = 30  # Received headers: a message with more is in a loop (RFC 5321 section 6.3)
MAX_ERROR = 300
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


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: `base_s`, times `factor` per attempt, at most `max_delay_s`; after
    `max_attempts` attempts the action is given up."""

    base_s: float = 30.0
    factor: float = 2.0
    max_attempts: int = 12
    max_delay_s: float = 6 * 3600.0

    def delay(self, attempts: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait after the `attempts`-th attempt failed (a Retry-After longer than the
        backoff is honoured, up to max_delay_s)."""
        backoff = min(self.base_s * self.factor ** max(0, attempts - 1), self.max_delay_s)
        if retry_after_s is not None:
            backoff = max(backoff, min(retry_after_s, self.max_delay_s))
        return backoff


@dataclass(frozen=True)
class Attempt:
    """What one try got: the HTTP status or SMTP reply code (None: no answer), the error to
    record, the server's Retry-After, and `permanent` for a failure no retry can change."""

    status: int | None = None
    error: str = ""
    retry_after_s: float | None = None
    permanent: bool = False


Outcome = Literal["done", "retry", "final"]


def http_outcome(status: int | None) -> Outcome:
    """2xx done; 408, 429, 5xx and no answer retried; anything else (410, other 4xx, a
    redirect, which a signed POST does not follow) final."""
    if status is None or status in (408, 429) or 500 <= status <= 599:
        return "retry"
    return "done" if 200 <= status <= 299 else "final"


def smtp_outcome(code: int | None) -> Outcome:
    """2xx done; 5xx final (the relay or the next hop refused it for good); 4xx, anything
    else and no answer retried."""
    if code is not None and 200 <= code <= 299:
        return "done"
    return "final" if code is not None and 500 <= code <= 599 else "retry"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    status: int | None
    error: str = ""
    delay_s: float | None = None  # retry: seconds from now


def judge(action: str, attempt: Attempt, attempts: int, policy: RetryPolicy) -> Verdict:
    """What to record after the `attempts`-th attempt (counting this one)."""
    outcome = (http_outcome if action == "http" else smtp_outcome)(attempt.status)
    if attempt.permanent and outcome != "done":
        outcome = "final"
    error = attempt.error[:MAX_ERROR]
    if outcome == "retry" and attempts >= policy.max_attempts:
        return Verdict("final", attempt.status, f"{error} (gave up after {attempts} attempts)"[:MAX_ERROR])
    if outcome == "retry":
        return Verdict("retry", attempt.status, error, policy.delay(attempts, attempt.retry_after_s))
    return Verdict(outcome, attempt.status, error)


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


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


def _new_secret() -> str:
    import secrets

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


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
        secret = _new_secret()
        try:
            with conn.transaction():
                vault.put(conn, tenant=tenant, kind=SECRET_KIND, owner=SECRET_OWNER, plaintext=secret)
            return secret
        except psycopg.errors.UniqueViolation:  # another process made it first: theirs
            row = conn.execute(GET_SECRET, (tenant,)).fetchone()
            assert row is not None
            return vault.get(conn, row[0])


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: v1,<base64 HMAC-SHA256 of "id.timestamp.body">."""
    from standardwebhooks import Webhook

    return Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())


# -- the senders (thin I/O shells) -------------------------------------------------------------


class HttpPoster:
    """POSTs over httpx: redirects are not followed, proxies and .netrc from the environment
    are not used (trust_env off), and nothing of the answer is read but its status line."""

    def __init__(self, *, timeout_s: float = 30.0, max_connections: int = 32, user_agent: str = "mailflow") -> None:
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.user_agent = user_agent
        self._client: httpx.AsyncClient | None = None

    def _connect(self) -> httpx.AsyncClient:
        import httpx

        if self._client is None:  # made in the loop that uses it
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                follow_redirects=False,
                trust_env=False,
                limits=httpx.Limits(max_connections=self.max_connections),
                headers={"user-agent": self.user_agent},
            )
        return self._client

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        import httpx

        try:
            async with self._connect().stream("POST", url, content=body, headers=headers) as resp:
                return Attempt(
                    resp.status_code,
                    f"HTTP {resp.status_code} {resp.reason_phrase}".strip(),
                    retry_after(resp.headers.get("retry-after")),
                )
        except httpx.TimeoutException:
            return Attempt(None, f"no answer from {_where(url)} within {self.timeout_s:g} s")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            return Attempt(None, f"cannot POST to this URL: {exc}", permanent=True)
        except (httpx.HTTPError, OSError) as exc:
            return Attempt(None, f"{type(exc).__name__} from {_where(url)}: {exc}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _where(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


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
class Options:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    lease_s: float = 300.0  # a claimed action is not claimed again for this long
    concurrency: int = 16  # actions in flight at once
    poll_s: float = 1.0  # how often due actions are looked for when there is nothing to do
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


class Actions:
    """The loop of one inbound process (see the module docstring); `run()` drives it."""

    def __init__(
        self,
        store: EventStore,
        vault: Vault,
        http: HttpPoster,
        forwarder: Forwarder | None,
        options: Options,
    ) -> None:
        if store.tenant is not None:
            raise ValueError("route actions are every tenant's: run them with an operator's store")
        self.store = store
        self.vault = vault
        self.http = http
        self.forwarder = forwarder
        self.options = options
        self.db = asyncio.Semaphore(2)  # the SMTP server's commits keep the rest of the pool
        self.secrets: dict[str, tuple[str, float]] = {}
        self.told_no_relay = False
        self.claim_failing = False
        self.sent = 0
        self.recorded = 0

    async def run(self, stop: threading.Event | asyncio.Event) -> None:
        inflight: set[asyncio.Task[None]] = set()
        log.info("inbound.actions.start", forward_relay=self.forwarder is not None, **self.options.__dict__)
        try:
            while not stop.is_set():
                inflight = {t for t in inflight if not t.done()}
                free = self.options.concurrency - len(inflight)
                claimed: list[Claimed] = []
                if free > 0:
                    try:
                        claimed = await self._db(self._claim, free)
                        self.claim_failing = False
                    except Exception as exc:  # noqa: BLE001 - the database is away: try again later
                        if not self.claim_failing:  # said once per outage
                            log.warning("inbound.actions.claim_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                        self.claim_failing = True
                for c in claimed:
                    inflight.add(asyncio.create_task(self._carry_out(c)))
                if free > 0 and len(claimed) == free:
                    continue  # more may be due
                await self._pause(stop, inflight)
        finally:
            await self._drain(inflight)
            await self.http.aclose()
            log.info("inbound.actions.stop", sent=self.sent, recorded=self.recorded)

    async def _pause(self, stop: threading.Event | asyncio.Event, inflight: set[asyncio.Task[None]]) -> None:
        """Until an action finishes, `stop` is set or poll_s has passed."""
        deadline = time.monotonic() + self.options.poll_s
        while not stop.is_set() and time.monotonic() < deadline:
            step = min(0.05, max(0.0, deadline - time.monotonic()))
            if inflight:
                done, _ = await asyncio.wait(inflight, timeout=step, return_when=asyncio.FIRST_COMPLETED)
                if done:
                    return
            else:
                await asyncio.sleep(step)

    async def _drain(self, inflight: set[asyncio.Task[None]]) -> None:
        """Let the actions in flight finish (and be recorded) for a while; the others keep
        their lease and are sent again after it."""
        if not inflight:
            return
        _, pending = await asyncio.wait(inflight, timeout=min(30.0, self.options.lease_s / 2))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self.db:
            return await asyncio.to_thread(fn, *args)

    def _claim(self, limit: int) -> list[Claimed]:
        with self.store.pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(CLAIM, {"limit": limit, "lease_s": self.options.lease_s}).fetchall()
        return [Claimed(**r) for r in rows]

    def _raw(self, c: Claimed) -> bytes | None:
        with self.store.pool.connection() as conn:
            row = conn.execute(RAW, (c.tenant, c.sha256)).fetchone()
        return None if row is None else bytes(row[0])

    def _secret(self, tenant: str) -> str:
        cached = self.secrets.get(tenant)
        if cached is not None and time.monotonic() - cached[1] < self.options.secret_ttl_s:
            return cached[0]
        with self.store.pool.connection() as conn:
            secret = webhook_secret(conn, self.vault, tenant)
        self.secrets[tenant] = (secret, time.monotonic())
        return secret

    async def _carry_out(self, c: Claimed) -> None:
        try:
            attempt = await asyncio.wait_for(self._attempt(c), timeout=max(1.0, self.options.lease_s / 2))
        except TimeoutError:
            attempt = Attempt(None, f"took longer than {self.options.lease_s / 2:g} s")
        except Exception as exc:  # noqa: BLE001 - the database or the vault: not sent, try again
            log.warning("inbound.actions.not_sent", message_id=c.message_id, error=f"{type(exc).__name__}: {exc}")
            return  # the lease runs out and the action is claimed again
        self.sent += 1
        verdict = judge(c.action, attempt, c.attempts + 1, self.options.retry)
        try:
            recorded = await self._db(self._record, c, verdict)
        except Exception as exc:  # noqa: BLE001 - sent, not recorded: sent again after the lease
            log.warning("inbound.actions.record_failed", message_id=c.message_id, error=f"{type(exc).__name__}: {exc}")
            return
        if recorded:
            self.recorded += 1
            log.info(
                "inbound.action",
                tenant=c.tenant,
                message_id=c.message_id,
                action=c.action,
                route_id=c.route_id,
                attempts=c.attempts + 1,
                outcome=verdict.outcome,
                status=verdict.status,
                error=verdict.error or None,
            )

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
        fits = c.raw_size is not None and c.raw_size <= self.options.max_raw_bytes
        raw = await self._db(self._raw, c) if fits else None
        payload = await asyncio.to_thread(body, c, raw, self.options.max_raw_bytes)
        msg_id, timestamp = webhook_id(c.tenant, c.message_id, c.recipient, c.target), int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, payload),
        }
        return await self.http.post(c.target, payload, headers)

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
