"""Inbound room: each tenant's webhook endpoints - classified mail (replies, bounces, complaints,
auto-replies, unsubscribes) POSTed as it is recognised, signed per Standard Webhooks, at least once.

- An endpoint (`add_endpoint()`; `mailflow webhooks add`) is a URL and the kinds it wants
  (`KINDS`). Its URL must not be, or resolve to, a loopback, private or link-local address
  (delivery.AddressGuard) unless MAILFLOW_WEBHOOKS_ALLOW_PRIVATE; its signing secret (whsec_...)
  is made at `add`, shown once, and kept only in the vault. WebhookEndpointAdded / Disabled /
  Enabled / Removed are its events (stream `webhook-<id>`), `webhook_endpoints` their inline
  projection (with `webhook_attempts`, one row per attempt).
- The `webhooks` consumer (`WebhookFanout`) puts one `webhook_deliveries` row per classified
  event and active endpoint of its tenant subscribed to its kind, in the consumer's
  transaction: exactly once. The row names the event, not its content.
- The deliverer (`Deliverer`, `run()`: beside the SMTP server in `mailflow inbound`, or alone as
  `mailflow webhooks deliver`) is delivery.Loop: it claims due rows with a lease, a share per
  tenant, builds the body when it sends - the event's fields with the personal values opened
  then (an erased person's are null) - and POSTs it to the address the guard checked. 2xx is
  done; 410 disables the endpoint; 408, 429, 5xx and no answer are retried on `SCHEDULE`
  (about three days, jittered, Retry-After honoured); another 4xx is final. Every attempt is
  an event (WebhookDelivered / WebhookDeliveryFailed on `webhook-delivery-<id>`), recorded
  with the row's change in one transaction; an endpoint whose attempts failed
  `disable_after_failures` times in a row over at least `disable_after_s` is disabled.

The decisions (the kind of an event, the body, when to retry, what a status means, when an
endpoint has failed long enough) are pure functions; the rest is a thin shell around them.
"""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
import psycopg
from psycopg.rows import dict_row

from mailflow.config import Settings
from mailflow.consumers import inline
from mailflow.consumers.inline import InlineProjection, register
from mailflow.consumers.projection import Projection
from mailflow.errors import NotFoundError, UsageError
from mailflow.events.envelope import Envelope, Metadata
from mailflow.events.store import EventStore
from mailflow.inbound import routes
from mailflow.inbound.delivery import (
    AddressGuard,
    Attempt,
    HttpPoster,
    LookupFailed,
    Loop,
    LoopOptions,
    Outcome,
    Refused,
    Verdict,
    decide,
    honour_retry_after,
    http_outcome,
    new_secret,
    signed_headers,
)
from mailflow.inbound.events import (
    CLASSIFIED_TYPES,
    WebhookDelivered,
    WebhookDeliveryFailed,
    WebhookEndpointAdded,
    WebhookEndpointDisabled,
    WebhookEndpointEnabled,
    WebhookEndpointRemoved,
)
from mailflow.infra import personal
from mailflow.infra.vault import Vault

SECRET_KIND = "webhook_endpoint_secret"
TEST_TYPE = "webhook.test"

# The kinds an endpoint subscribes to, and the `type` of their payloads.
KINDS: dict[str, str] = {
    "bounce": "bounce.detected",
    "delayed": "bounce.delayed",
    "complaint": "complaint.received",
    "auto_reply": "auto_reply.received",
    "unsubscribe": "unsubscribe.received",
    "reply": "reply.received",
    "other": "other.received",
}
_KIND_OF_TYPE = {
    "ComplaintReceived": "complaint",
    "AutoReplyReceived": "auto_reply",
    "UnsubscribeReceived": "unsubscribe",
    "ReplyReceived": "reply",
    "OtherReceived": "other",
}
CLASSIFIED = frozenset(t.event_type for t in CLASSIFIED_TYPES)

# The retry schedule: seconds after the 1st, 2nd, ... failed attempt. Eleven attempts over
# about three days (71.6 hours), each delay moved by up to JITTER either way.
SCHEDULE_S: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000, 50400, 50400, 57600)
JITTER = 0.2

# -- SQL, by name ------------------------------------------------------------------------------

FREE_ID = """
SELECT c FROM unnest(%s::text[]) AS c WHERE NOT EXISTS (SELECT 1 FROM webhook_endpoints e WHERE e.id = c) LIMIT 1
"""
_ENDPOINT_COLUMNS = """
id, url, events, status, disabled_reason, disabled_at, fingerprint, failure_streak, failing_since,
last_success_at, created_at
"""
LIST_ENDPOINTS = f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints ORDER BY created_at, id"
GET_ENDPOINT = f"SELECT {_ENDPOINT_COLUMNS}, secret_id::text FROM webhook_endpoints WHERE id = %s"
LOCK_ENDPOINT_STATUS = "SELECT status FROM webhook_endpoints WHERE id = %s FOR UPDATE"
LIST_ATTEMPTS = """
SELECT at, endpoint_id, delivery_id::text, type, attempt, outcome, status, error, duration_ms
FROM webhook_attempts WHERE (%(endpoint)s::text IS NULL OR endpoint_id = %(endpoint)s)
ORDER BY at DESC, attempt DESC LIMIT %(limit)s
"""

# The inline projection.
ADD_ENDPOINT = """
INSERT INTO webhook_endpoints (tenant, id, url, events, secret_id, fingerprint, created_at)
VALUES (%(tenant)s, %(id)s, %(url)s, %(events)s, %(secret_id)s, %(fingerprint)s, %(at)s) ON CONFLICT DO NOTHING
"""
DISABLE_ENDPOINT = """
UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = %(reason)s, disabled_at = %(at)s
WHERE tenant = %(tenant)s AND id = %(id)s
"""
# Only the deliveries made before the disabling: a rebuild replays it after later ones exist.
CANCEL_PENDING = """
UPDATE webhook_deliveries SET state = 'cancelled', lease_until = NULL, done_at = %(at)s, last_error = %(reason)s
WHERE tenant = %(tenant)s AND endpoint_id = %(id)s AND state = 'pending' AND created_at <= %(at)s
"""
ENABLE_ENDPOINT = """
UPDATE webhook_endpoints SET status = 'active', disabled_reason = NULL, disabled_at = NULL, failure_streak = 0,
                             failing_since = NULL
WHERE tenant = %(tenant)s AND id = %(id)s
"""
REMOVE_ENDPOINT = "DELETE FROM webhook_endpoints WHERE tenant = %(tenant)s AND id = %(id)s"
REMOVE_DELIVERIES = "DELETE FROM webhook_deliveries WHERE tenant = %(tenant)s AND endpoint_id = %(id)s"
REMOVE_ATTEMPTS = "DELETE FROM webhook_attempts WHERE tenant = %(tenant)s AND endpoint_id = %(id)s"
SET_DONE = """
UPDATE webhook_deliveries SET state = 'done', attempts = %(attempts)s, last_status = %(status)s, last_error = NULL,
                              lease_until = NULL, done_at = %(at)s
WHERE tenant = %(tenant)s AND id = %(delivery)s
"""
SET_FAILED = """
UPDATE webhook_deliveries SET state = CASE WHEN state = 'cancelled' THEN 'cancelled' WHEN %(final)s THEN 'failed'
                                           ELSE 'pending' END,
                              attempts = %(attempts)s,
                              last_status = %(status)s, last_error = %(error)s, lease_until = NULL,
                              next_at = coalesce(%(retry_at)s, next_at),
                              done_at = CASE WHEN state = 'cancelled' THEN done_at WHEN %(final)s THEN %(at)s END
WHERE tenant = %(tenant)s AND id = %(delivery)s
"""
ADD_ATTEMPT = """
INSERT INTO webhook_attempts (tenant, delivery_id, attempt, endpoint_id, type, at, outcome, status, error, duration_ms)
VALUES (%(tenant)s, %(delivery)s, %(attempts)s, %(endpoint)s, %(type)s, %(at)s, %(outcome)s, %(status)s, %(error)s,
        %(duration_ms)s)
ON CONFLICT DO NOTHING
"""
STREAK_RESET = """
UPDATE webhook_endpoints SET failure_streak = 0, failing_since = NULL, last_success_at = %(at)s
WHERE tenant = %(tenant)s AND id = %(endpoint)s
"""
STREAK_GROWS = """
UPDATE webhook_endpoints SET failure_streak = failure_streak + 1, failing_since = coalesce(failing_since, %(at)s)
WHERE tenant = %(tenant)s AND id = %(endpoint)s
"""

# The consumer: every tenant's active endpoints among those of a batch.
ACTIVE_ENDPOINTS = """
SELECT tenant, id, events, created_at FROM webhook_endpoints WHERE status = 'active' AND tenant = ANY(%s::text[])
"""
FAN_OUT = """
INSERT INTO webhook_deliveries (tenant, id, endpoint_id, event_id, event_position, type, next_at, created_at)
SELECT * FROM unnest(%s::text[], %s::uuid[], %s::text[], %s::uuid[], %s::bigint[], %s::text[], %s::timestamptz[],
                     %s::timestamptz[])
ON CONFLICT DO NOTHING
"""

# The deliverer: due rows of active endpoints not leased by a live process, the tenants
# waiting longest first and an equal share of the batch each (route actions do the same).
_WAITING = """
state = 'pending' AND next_at <= now() AND (lease_until IS NULL OR lease_until < now())
AND EXISTS (SELECT 1 FROM webhook_endpoints e WHERE (e.tenant, e.id) = (d.tenant, d.endpoint_id) AND e.status = 'active')
"""
CLAIM = f"""
WITH waiting AS (
    SELECT d.tenant, min(d.next_at) AS oldest FROM webhook_deliveries d
    WHERE {_WAITING} AND NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = d.tenant AND t.status <> 'active')
    GROUP BY d.tenant ORDER BY oldest LIMIT %(limit)s
), due AS (
    SELECT x.tenant, x.id FROM waiting w CROSS JOIN LATERAL (
        SELECT d.tenant, d.id FROM webhook_deliveries d WHERE d.tenant = w.tenant AND {_WAITING}
        ORDER BY d.next_at LIMIT (SELECT ceil(%(limit)s::numeric / count(*)) FROM waiting)
        FOR UPDATE OF d SKIP LOCKED
    ) x
    LIMIT %(limit)s
)
UPDATE webhook_deliveries d SET lease_until = now() + make_interval(secs => %(lease_s)s)
FROM due u, webhook_endpoints e
WHERE (d.tenant, d.id) = (u.tenant, u.id) AND (e.tenant, e.id) = (d.tenant, d.endpoint_id)
RETURNING d.tenant, d.id::text AS delivery_id, d.endpoint_id, d.event_position, d.type, d.attempts, e.url,
          e.secret_id::text
"""
LOCK_ENDPOINT = """
SELECT status, failure_streak, failing_since, clock_timestamp() AS now FROM webhook_endpoints
WHERE tenant = %s AND id = %s FOR UPDATE
"""
LOCK_DELIVERY = "SELECT state, attempts FROM webhook_deliveries WHERE tenant = %s AND id = %s FOR UPDATE"
SECRET_ID = "SELECT secret_id::text FROM webhook_endpoints WHERE tenant = %s AND id = %s"


# -- decisions (pure) --------------------------------------------------------------------------


def kind_of(event_type: str, data: dict[str, Any]) -> str | None:
    """The webhook kind of a classified event (None: not one)."""
    if event_type == "BounceDetected":
        return "delayed" if data.get("delayed") else "bounce"
    return _KIND_OF_TYPE.get(event_type)


def parse_kinds(text: str) -> list[str]:
    """'reply,bounce' -> ['bounce', 'reply'] (`all`: every kind), or UsageError."""
    wanted = {k.strip().lower().replace("-", "_") for k in text.split(",") if k.strip()}
    if "all" in wanted:
        return sorted(KINDS)
    unknown = sorted(wanted - set(KINDS))
    if unknown or not wanted:
        what = f"unknown webhook event {unknown[0]!r}" if unknown else "no webhook event given"
        raise UsageError(f"{what}: give some of {', '.join(KINDS)} (comma-separated), or all")
    return sorted(wanted)


def delivery_id(tenant: str, endpoint_id: str, event_id: str) -> str:
    """The same for every attempt of one event to one endpoint: the webhook-id's uuid."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailflow:webhook:{tenant}:{endpoint_id}:{event_id}"))


def webhook_msg_id(delivery: str) -> str:
    """The webhook-id header: receivers dedupe by it (at-least-once)."""
    return "msg_" + uuid.UUID(delivery).hex


@dataclass(frozen=True)
class Schedule:
    """Retries after the 1st, 2nd, ... failure at `delays_s` (times `scale`: tests run it in
    milliseconds), each moved by up to `jitter` either way so that a receiver's outage does
    not bring every retry back at once; a Retry-After longer than that is honoured, up to the
    longest delay. After the last delay's attempt the delivery is given up."""

    delays_s: tuple[float, ...] = SCHEDULE_S
    jitter: float = JITTER
    scale: float = 1.0
    rand: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    @property
    def max_attempts(self) -> int:
        return len(self.delays_s) + 1

    def delay(self, attempts: int, retry_after_s: float | None = None) -> float:
        base = self.delays_s[min(max(attempts, 1), len(self.delays_s)) - 1] * self.scale
        moved = base * (1 + self.jitter * (2 * self.rand() - 1))
        return honour_retry_after(moved, retry_after_s, max(self.delays_s) * self.scale)


def webhook_outcome(status: int | None) -> Outcome | Literal["gone"]:
    """2xx done; 410 gone (the endpoint is disabled); 408, 429, 5xx and no answer retried;
    anything else final."""
    return "gone" if status == 410 else http_outcome(status)


@dataclass(frozen=True)
class Judgement:
    """What to record of one attempt: its verdict, whether the receiver said the endpoint is
    gone, and how long it took."""

    verdict: Verdict
    gone: bool = False
    duration_ms: int | None = None


def judge(attempt: Attempt, attempts: int, schedule: Schedule) -> Judgement:
    outcome = webhook_outcome(attempt.status)
    verdict = decide("final" if outcome == "gone" else outcome, attempt, attempts, schedule)
    ms = None if attempt.duration_s is None else round(attempt.duration_s * 1000)
    return Judgement(verdict, outcome == "gone" and not attempt.permanent, ms)


def failing_long_enough(streak: int, since: datetime, now: datetime, *, failures: int, window_s: float) -> bool:
    """An endpoint is disabled once `failures` attempts in a row failed, the first at least
    `window_s` ago: a receiver down for a night keeps its endpoint, one gone for good does not."""
    return streak >= failures and (now - since).total_seconds() >= window_s


def payload(
    env: Envelope, opened: dict[str, Any] | None, recipients: Sequence[dict[str, Any] | None] = ()
) -> dict[str, Any]:
    """The body of a classified event's delivery: {"type", "timestamp", "data"}. `data` is the
    event's fields without what is sealed or names a subject, plus the event's id and position
    and the personal values opened now (`opened`: the correspondent's {"sender", "subject",
    "text"}; `recipients`: each bounced or complained-about recipient's {"email"}) - None,
    sent as null, where the person was erased."""
    kind = kind_of(env.type, env.data)
    data = {k: v for k, v in env.data.items() if k not in ("sealed", "correspondent", "recipients")}
    opened = opened or {}
    data |= {
        "event_id": str(env.id),
        "position": env.position,
        "tenant": env.metadata.tenant,
        "sender": opened.get("sender"),
        "subject": opened.get("subject"),
        "text": opened.get("text"),
    }
    if "recipients" in env.data:
        given = env.data["recipients"]
        emails = [(o or {}).get("email") for o in recipients] + [None] * (len(given) - len(recipients))
        data["recipients"] = [
            {**{k: v for k, v in r.items() if k not in ("sealed", "subject")}, "email": email}
            for r, email in zip(given, emails)
        ]
    return {"type": KINDS[kind] if kind else env.type, "timestamp": env.recorded_at.isoformat(), "data": data}


# -- endpoints ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """An endpoint as `webhooks list` shows it: never its secret."""

    id: str
    url: str
    events: list[str]
    status: str
    disabled_reason: str | None
    disabled_at: datetime | None
    fingerprint: str
    failure_streak: int
    failing_since: datetime | None
    last_success_at: datetime | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(self).items()}


def guard_for(settings: Settings) -> AddressGuard:
    return AddressGuard(
        allow_private=settings.webhooks_allow_private,
        nameservers=settings.dns_servers,
        timeout_s=settings.inbound_dns_timeout_s,
    )


def http_for(settings: Settings, *, max_connections: int = 32) -> HttpPoster:
    """The deliverer's client: every POST checked by the guard, to the address it checked."""
    return HttpPoster(
        timeout_s=settings.inbound_action_timeout_s, max_connections=max_connections, guard=guard_for(settings)
    )


def check_url(url: str, guard: AddressGuard) -> str:
    """The URL as stored, or UsageError: http(s) without credentials or secret-looking query
    parameters (routes' rule: it is recorded in the log), whose host is and resolves to only
    addresses the guard allows."""
    _, url = routes.check_action(routes.Action.HTTP, url)
    import httpx

    try:
        host = httpx.URL(url).host
    except (httpx.InvalidURL, ValueError) as exc:  # a host that is neither an address nor an IDNA name
        raise UsageError(f"{url!r} is not a URL mailflow can POST to: {exc}") from exc
    try:
        guard.check_now(host)
    except Refused as exc:
        raise UsageError(f"refused {url}: {exc}") from exc
    except LookupFailed as exc:
        raise UsageError(f"cannot add {url}: {exc}") from exc
    except UnicodeError as exc:  # the system resolver's IDNA codec refuses the name (an empty or long label)
        raise UsageError(f"cannot add {url}: {host} is not a name that resolves ({exc})") from exc
    return url


def _tenant(store: EventStore) -> str:
    if store.tenant is None:
        raise UsageError("webhook endpoints belong to a tenant: act for one (--tenant)")
    return store.tenant


def add_endpoint(
    store: EventStore, vault: Vault, guard: AddressGuard, url: str, kinds: Sequence[str]
) -> tuple[Endpoint, str]:
    """Add an endpoint for the tenant; returns it and its signing secret (shown once: only the
    vault keeps it)."""
    tenant = _tenant(store)
    url = check_url(url, guard)
    kinds = parse_kinds(",".join(kinds))
    secret = new_secret()
    with inline.writing(store) as w:
        endpoint_id = _new_id(w.conn)
        ref = vault.put(w.conn, tenant=tenant, kind=SECRET_KIND, owner=f"webhook:{endpoint_id}", plaintext=secret)
        event = WebhookEndpointAdded(endpoint_id=endpoint_id, url=url, events=kinds, secret=ref.to_dict())
        w.record([(f"webhook-{endpoint_id}", event.to_new())])
        found = endpoint(w.conn, endpoint_id)
    return found, secret


def _new_id(conn: psycopg.Connection) -> str:
    """Eight hex digits, not yet an endpoint of the tenant's (short enough to type)."""
    row = None
    while row is None:
        row = conn.execute(FREE_ID, ([uuid.uuid4().hex[:8] for _ in range(4)],)).fetchone()
    return str(row[0])


def _endpoint(row: dict[str, Any]) -> Endpoint:
    return Endpoint(**{k: v for k, v in row.items() if k != "secret_id"})


def endpoints(conn: psycopg.Connection) -> list[Endpoint]:
    """The connection's tenant's endpoints, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        return [_endpoint(r) for r in cur.execute(LIST_ENDPOINTS).fetchall()]


def endpoint(conn: psycopg.Connection, endpoint_id: str) -> Endpoint:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(GET_ENDPOINT, (endpoint_id.strip().lower(),)).fetchone()
    if row is None:
        raise NotFoundError(f"no webhook endpoint {endpoint_id} (see `mailflow webhooks list`)")
    return _endpoint(row)


def _change(store: EventStore, endpoint_id: str, make: Callable[[str, str], Any | None]) -> Endpoint:
    """Record the event `make(id, status)` gives (None: nothing to change) under the endpoint's lock."""
    _tenant(store)
    endpoint_id = endpoint_id.strip().lower()
    with inline.writing(store) as w:
        row = w.conn.execute(LOCK_ENDPOINT_STATUS, (endpoint_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no webhook endpoint {endpoint_id} (see `mailflow webhooks list`)")
        event = make(endpoint_id, row[0])
        if event is not None:
            w.record([(f"webhook-{endpoint_id}", event.to_new())])
        return endpoint(w.conn, endpoint_id)


def disable_endpoint(store: EventStore, endpoint_id: str, reason: str = "disabled by the operator") -> Endpoint:
    """No more deliveries to it; its pending ones are cancelled. Disabling a disabled one is a no-op."""
    return _change(
        store,
        endpoint_id,
        lambda i, status: None if status == "disabled" else WebhookEndpointDisabled(endpoint_id=i, reason=reason),
    )


def enable_endpoint(store: EventStore, endpoint_id: str) -> Endpoint:
    """Deliveries again, of the events classified from now on (its failure streak starts over)."""
    return _change(
        store, endpoint_id, lambda i, status: None if status == "active" else WebhookEndpointEnabled(endpoint_id=i)
    )


def remove_endpoint(store: EventStore, vault: Vault, endpoint_id: str) -> None:
    """The endpoint, its deliveries and attempts go, and its secret leaves the vault."""
    tenant = _tenant(store)
    endpoint_id = endpoint_id.strip().lower()
    with inline.writing(store) as w:
        if w.conn.execute(LOCK_ENDPOINT_STATUS, (endpoint_id,)).fetchone() is None:
            raise NotFoundError(f"no webhook endpoint {endpoint_id} (see `mailflow webhooks list`)")
        w.record([(f"webhook-{endpoint_id}", WebhookEndpointRemoved(endpoint_id=endpoint_id).to_new())])
        vault.keep_only(w.conn, tenant, f"webhook:{endpoint_id}", [])


def attempts(conn: psycopg.Connection, endpoint_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Every attempt (the connection's tenant's; of one endpoint), newest first."""
    if endpoint_id is not None:
        endpoint(conn, endpoint_id)  # NotFoundError for one that is not the tenant's
        endpoint_id = endpoint_id.strip().lower()
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(LIST_ATTEMPTS, {"endpoint": endpoint_id, "limit": limit}).fetchall()


@dataclass(frozen=True)
class Answer:
    """What `mailflow webhooks test` got."""

    endpoint_id: str
    delivery_id: str
    outcome: Outcome
    status: int | None
    error: str
    duration_ms: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def send_test(store: EventStore, vault: Vault, http: HttpPoster, endpoint_id: str) -> Answer:
    """POST a signed `webhook.test` to the endpoint now (disabled or not) and record the attempt;
    it changes neither the endpoint's status nor its failure streak."""
    tenant = _tenant(store)
    with inline.reading(store) as conn:
        found = endpoint(conn, endpoint_id)
        row = conn.execute(SECRET_ID, (tenant, found.id)).fetchone()
        assert row is not None
        secret = vault.get(conn, row[0])
    delivery = str(uuid.uuid4())
    body = orjson.dumps(
        {
            "type": TEST_TYPE,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": {"endpoint_id": found.id, "tenant": tenant},
        }
    )

    async def once() -> Attempt:
        try:
            return await http.post(found.url, body, signed_headers(secret, webhook_msg_id(delivery), body))
        finally:
            await http.aclose()

    attempt = asyncio.run(once())
    verdict = decide(http_outcome(attempt.status), attempt, 1, Schedule(delays_s=()))
    ms = None if attempt.duration_s is None else round(attempt.duration_s * 1000)
    common = {"endpoint_id": found.id, "delivery_id": delivery, "type": TEST_TYPE, "attempts": 1, "test": True}
    event: WebhookDelivered | WebhookDeliveryFailed
    if verdict.outcome == "done":
        event = WebhookDelivered(**common, status=verdict.status or 0, duration_ms=ms)
    else:
        event = WebhookDeliveryFailed(**common, error=verdict.error, final=True, status=verdict.status, duration_ms=ms)
    inline.record(store, [(f"webhook-delivery-{delivery}", event.to_new())])
    return Answer(
        found.id, delivery, "done" if verdict.outcome == "done" else "final", attempt.status, verdict.error, ms
    )


# -- the inline projection: endpoints and attempts ---------------------------------------------


def _each(
    apply: Callable[[psycopg.Connection, dict[str, Any]], None],
) -> Callable[[psycopg.Connection, list[Envelope]], None]:
    def run(conn: psycopg.Connection, events: list[Envelope]) -> None:
        for env in events:
            apply(conn, {**env.data, "tenant": str(env.metadata.tenant), "at": env.recorded_at})

    return run


def _added(conn: psycopg.Connection, d: dict[str, Any]) -> None:
    conn.execute(
        ADD_ENDPOINT,
        {
            "tenant": d["tenant"],
            "id": d["endpoint_id"],
            "url": d["url"],
            "events": d["events"],
            "secret_id": d["secret"]["id"],
            "fingerprint": d["secret"]["fingerprint"],
            "at": d["at"],
        },
    )


def _disabled(conn: psycopg.Connection, d: dict[str, Any]) -> None:
    args = {"tenant": d["tenant"], "id": d["endpoint_id"], "reason": d["reason"], "at": d["at"]}
    conn.execute(DISABLE_ENDPOINT, args)
    conn.execute(CANCEL_PENDING, {**args, "reason": f"endpoint disabled: {d['reason']}"})


def _enabled(conn: psycopg.Connection, d: dict[str, Any]) -> None:
    conn.execute(ENABLE_ENDPOINT, {"tenant": d["tenant"], "id": d["endpoint_id"]})


def _removed(conn: psycopg.Connection, d: dict[str, Any]) -> None:
    args = {"tenant": d["tenant"], "id": d["endpoint_id"]}
    for statement in (REMOVE_ENDPOINT, REMOVE_DELIVERIES, REMOVE_ATTEMPTS):
        conn.execute(statement, args)


def _attempted(conn: psycopg.Connection, d: dict[str, Any]) -> None:
    done = "error" not in d
    args = {
        "tenant": d["tenant"],
        "delivery": d["delivery_id"],
        "endpoint": d["endpoint_id"],
        "type": d["type"],
        "attempts": d["attempts"],
        "status": d.get("status"),
        "error": d.get("error"),
        "final": bool(d.get("final")),
        "retry_at": d.get("retry_at"),
        "duration_ms": d.get("duration_ms"),
        "outcome": "done" if done else "final" if d.get("final") else "retry",
        "at": d["at"],
    }
    conn.execute(SET_DONE if done else SET_FAILED, args)
    conn.execute(ADD_ATTEMPT, args)
    if not d.get("test"):
        conn.execute(STREAK_RESET if done else STREAK_GROWS, args)


PROJECTION = register(
    InlineProjection(
        "webhook_endpoints",
        "webhook endpoints and every delivery attempt (inline)",
        ("webhook_endpoints", "webhook_attempts"),
        {
            "WebhookEndpointAdded": _each(_added),
            "WebhookEndpointDisabled": _each(_disabled),
            "WebhookEndpointEnabled": _each(_enabled),
            "WebhookEndpointRemoved": _each(_removed),
            "WebhookDelivered": _each(_attempted),
            "WebhookDeliveryFailed": _each(_attempted),
        },
    )
)


# -- the consumer: one delivery per classified event and subscribed endpoint -------------------


class WebhookFanout(Projection):
    """For each classified event, a pending delivery per active endpoint of its tenant that
    subscribes to its kind and existed when the event was recorded, in the consumer's
    transaction (so exactly once; a row's id is derived from the endpoint and the event, too).

    A rebuild sends nothing again: reset() keeps the rows (they are side effects underway or
    done), and the events applied again make the same rows, which are there already."""

    name = "webhooks"
    description = "a webhook delivery per classified event and subscribed endpoint"

    def apply(self, conn: psycopg.Connection, events: list[Envelope]) -> None:
        classified = [(e, kind_of(e.type, e.data)) for e in events if e.type in CLASSIFIED]
        if not classified:
            return
        tenants = sorted({str(e.metadata.tenant) for e, _ in classified})
        by_tenant: dict[str, list[tuple[str, list[str], datetime]]] = {}
        for tenant, endpoint_id, kinds, created_at in conn.execute(ACTIVE_ENDPOINTS, (tenants,)).fetchall():
            by_tenant.setdefault(tenant, []).append((endpoint_id, kinds, created_at))
        rows = [
            (
                tenant,
                delivery_id(tenant, ep, str(e.id)),
                ep,
                e.id,
                e.position,
                KINDS[kind],
                e.recorded_at,
                e.recorded_at,
            )
            for e, kind in classified
            if kind is not None
            for tenant in (str(e.metadata.tenant),)
            for ep, kinds, created_at in by_tenant.get(tenant, ())
            if kind in kinds and created_at <= e.recorded_at
        ]
        if rows:
            conn.execute(FAN_OUT, tuple(list(c) for c in zip(*rows)))

    def reset(self, conn: psycopg.Connection, from_position: int, applied_upto: int) -> None:
        """Nothing to undo (see the class docstring)."""


# -- the deliverer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Options(LoopOptions):
    schedule: Schedule = field(default_factory=Schedule)
    disable_after_failures: int = 20  # attempts failed in a row ...
    disable_after_s: float = 86400.0  # ... the first at least this long ago: the endpoint is disabled
    secret_ttl_s: float = 60.0


@dataclass(frozen=True)
class Claimed:
    """One delivery this process holds the lease of."""

    tenant: str
    delivery_id: str
    endpoint_id: str
    event_position: int
    type: str
    attempts: int  # before this one
    url: str
    secret_id: str


class Deliverer(Loop[Claimed, Judgement]):
    """The webhook deliveries of one process (see the module docstring); `run()` drives it."""

    prefix = "inbound.webhooks"
    done_line = "inbound.webhook"

    def __init__(self, store: EventStore, vault: Vault, http: HttpPoster, options: Options) -> None:
        super().__init__(store, options)
        self.vault = vault
        self.http = http
        self.schedule = options.schedule
        self.disable_after_failures = options.disable_after_failures
        self.disable_after_s = options.disable_after_s
        self.secret_ttl_s = options.secret_ttl_s

    async def _close(self) -> None:
        await self.http.aclose()

    def _fields(self, c: Claimed, verdict: Judgement | None = None) -> dict[str, Any]:
        ids = {"tenant": c.tenant, "endpoint_id": c.endpoint_id, "delivery_id": c.delivery_id}
        if verdict is None:
            return ids
        v = verdict.verdict
        return {
            **ids,
            "type": c.type,
            "attempts": c.attempts + 1,
            "outcome": v.outcome,
            "status": v.status,
            "error": v.error or None,
            "gone": verdict.gone or None,
        }

    def _claim(self, limit: int) -> list[Claimed]:
        with self.store.pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(CLAIM, {"limit": limit, "lease_s": self.options.lease_s}).fetchall()
        return [Claimed(**r) for r in rows]

    def _body(self, c: Claimed) -> bytes | None:
        """The body, built now: None when the event is no longer in the log."""
        try:
            env = self.store.get(c.event_position)
        except NotFoundError:
            return None
        recipients = env.data.get("recipients") or []
        items = [(env.data.get("correspondent"), env.data.get("sealed"))] + [
            (r.get("subject"), r.get("sealed")) for r in recipients
        ]
        with self.store.pool.connection() as conn:
            known = [(s, t) for s, t in items if s and t]
            opened_known = iter(personal.open_many(conn, c.tenant, known))
        opened = [next(opened_known) if s and t else None for s, t in items]
        return orjson.dumps(payload(env, opened[0], opened[1:]))

    def _secret(self, c: Claimed) -> str:
        return self._secret_of(c.secret_id, self.secret_ttl_s, lambda conn: self.vault.get(conn, c.secret_id))

    async def _attempt(self, c: Claimed) -> Attempt:
        body = await self._db(self._body, c)
        if body is None:
            return Attempt(None, "the event is no longer in the log", permanent=True)
        secret = await self._db(self._secret, c)
        return await self.http.post(c.url, body, signed_headers(secret, webhook_msg_id(c.delivery_id), body))

    def _judge(self, c: Claimed, attempt: Attempt) -> Judgement:
        return judge(attempt, c.attempts + 1, self.schedule)

    def _record(self, c: Claimed, verdict: Judgement) -> bool:
        """Record the attempt, if the delivery is still the one claimed (else another process,
        after this one's lease ran out, sent it and recorded first); disable the endpoint on a
        410 or a long failure streak. The endpoint is locked first, as disabling it does."""
        with inline.writing(self.store.for_tenant(c.tenant)) as w:
            ep = w.conn.execute(LOCK_ENDPOINT, (c.tenant, c.endpoint_id)).fetchone()
            row = w.conn.execute(LOCK_DELIVERY, (c.tenant, c.delivery_id)).fetchone()
            # Cancelled while in flight (the endpoint was disabled meanwhile): sent all the same, so recorded.
            if ep is None or row is None or row[0] not in ("pending", "cancelled") or row[1] != c.attempts:
                return False
            status, streak, since, now = ep
            v, md, attempts = verdict.verdict, Metadata(tenant=c.tenant), c.attempts + 1
            common = {"endpoint_id": c.endpoint_id, "delivery_id": c.delivery_id, "type": c.type, "attempts": attempts}
            events: list[Any] = []
            if v.outcome == "done":
                events.append(WebhookDelivered(**common, status=v.status or 0, duration_ms=verdict.duration_ms))
            else:
                retry_at = now + timedelta(seconds=v.delay_s) if v.delay_s is not None else None
                events.append(
                    WebhookDeliveryFailed(
                        **common,
                        error=v.error,
                        final=v.outcome == "final",
                        status=v.status,
                        retry_at=retry_at,
                        duration_ms=verdict.duration_ms,
                    )
                )
                if status == "active" and verdict.gone:
                    events.append(
                        WebhookEndpointDisabled(
                            endpoint_id=c.endpoint_id,
                            reason=f"the endpoint answered {v.error or '410 Gone'}",
                            by="gone",
                        )
                    )
                elif status == "active" and failing_long_enough(
                    streak + 1, since or now, now, failures=self.disable_after_failures, window_s=self.disable_after_s
                ):
                    events.append(
                        WebhookEndpointDisabled(
                            endpoint_id=c.endpoint_id,
                            reason=f"{streak + 1} attempts failed in a row since {(since or now).isoformat()}",
                            by="failing",
                        )
                    )
            streams = [f"webhook-delivery-{c.delivery_id}"] + [f"webhook-{c.endpoint_id}"] * (len(events) - 1)
            w.record([(s, e.to_new(md)) for s, e in zip(streams, events)])
        return True


async def run(
    store: EventStore,
    stop: threading.Event | asyncio.Event,
    *,
    vault: Vault,
    http: HttpPoster,
    options: Options | None = None,
) -> None:
    """Deliver due webhooks until `stop` is set (an operator's store: every tenant's)."""
    await Deliverer(store, vault, http, options or Options()).run(stop)
