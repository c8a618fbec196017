"""Inbound room: what the routes' http actions (actions.py) and the webhook endpoints
(webhooks.py) share to carry a POST out at least once - what an answer means and when to try
again (pure), Standard Webhooks signing, the guard that keeps POSTs off private addresses, the
HTTP client, and the loop that claims due work with a lease and records each attempt.

Both keep their due work in a PostgreSQL table (never in process memory: a delay longer than
a lease must not send twice) and change a row only with its event, in the transaction that
checks the row is still the claimed attempt. `Loop` is that shape once: it claims a few rows
per round (FOR UPDATE SKIP LOCKED, a lease, an equal share per tenant: the subclass's SQL),
carries them out concurrently, and leaves a row it could not record leased, so that another
process sends it again after the lease: at least once, never lost.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import ipaddress
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

from mailflow.events.store import EventStore
from mailflow.log import get_logger

if TYPE_CHECKING:
    import httpx

MAX_ERROR = 300

# -- decisions (pure) --------------------------------------------------------------------------

Outcome = Literal["done", "retry", "final"]


@dataclass(frozen=True)
class Attempt:
    """What one try got: the HTTP status or SMTP reply code (None: no answer), the error to
    record, the server's Retry-After, `permanent` for a failure no retry can change, and how
    long it took."""

    status: int | None = None
    error: str = ""
    retry_after_s: float | None = None
    permanent: bool = False
    duration_s: float | None = None


def http_outcome(status: int | None) -> Outcome:
    """2xx done; 408, 429, 5xx and no answer retried; anything else (410, other 4xx, a
    redirect, which a signed POST does not follow) final."""
    if status is None or status in (408, 429) or 500 <= status <= 599:
        return "retry"
    return "done" if 200 <= status <= 299 else "final"


class Backoff(Protocol):
    """When to try again: seconds after the `attempts`-th failed, and when to stop."""

    @property
    def max_attempts(self) -> int: ...

    def delay(self, attempts: int, retry_after_s: float | None = None) -> float: ...


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
        return honour_retry_after(backoff, retry_after_s, self.max_delay_s)


def honour_retry_after(backoff: float, retry_after_s: float | None, ceiling_s: float) -> float:
    """A Retry-After longer than the backoff wins, up to the ceiling (a hostile one is capped)."""
    if retry_after_s is not None:
        backoff = max(backoff, min(retry_after_s, ceiling_s))
    return backoff


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    status: int | None
    error: str = ""
    delay_s: float | None = None  # retry: seconds from now


def decide(outcome: Outcome, attempt: Attempt, attempts: int, policy: Backoff) -> Verdict:
    """What to record after the `attempts`-th attempt (counting this one) whose answer means
    `outcome`: a permanent failure is final, and so is a retry past the policy's last attempt."""
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


# -- where a POST may go (pure, and the lookup) ------------------------------------------------

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def refusal(address: str, *, allow_private: bool = False) -> str | None:
    """Why a POST must not go to `address` (an IP), or None. Multicast, unspecified (0.0.0.0
    reaches this host), reserved and broadcast addresses are always refused; loopback,
    private, link-local (169.254.169.254: cloud metadata), shared (100.64/10) and every other
    address that is not public are refused unless `allow_private`."""
    ip: IpAddress = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    reserved = ip.is_reserved and not ip.is_loopback  # ::1 is in IPv6's reserved ::/8
    if ip.is_multicast or ip.is_unspecified or reserved or ip == ipaddress.IPv4Address("255.255.255.255"):
        return f"{ip} is a {'multicast' if ip.is_multicast else 'reserved'} address"
    if ip.is_global or allow_private:
        return None
    what = (
        "loopback"
        if ip.is_loopback
        else "link-local"
        if ip.is_link_local
        else "private"
        if ip.is_private
        else "non-public"
    )
    return f"{ip} is a {what} address (MAILFLOW_WEBHOOKS_ALLOW_PRIVATE allows it)"


class Refused(Exception):
    """The URL's host is, or resolves to, an address POSTs may not go to."""


class LookupFailed(Exception):
    """The URL's host did not resolve (no such name, or DNS did not answer)."""


class AddressGuard:
    """Resolves a URL's host (MAILFLOW_DNS_SERVERS when set, else the system resolver) and
    refuses it when any of its addresses is one POSTs may not go to (`refusal()`). `check()`
    returns the addresses it checked: the POST connects to one of them, so a name that
    resolves differently a moment later (DNS rebinding) cannot reach an address not checked."""

    def __init__(self, *, allow_private: bool = False, nameservers: Sequence[str] = (), timeout_s: float = 5.0) -> None:
        self.allow_private = allow_private
        self.nameservers = list(nameservers)
        self.timeout_s = timeout_s

    async def check(self, host: str) -> list[str]:
        found = await self.resolve(host)
        for address in found:
            why = refusal(address, allow_private=self.allow_private)
            if why is not None:
                raise Refused(why if address == host else f"{host} resolves to {why}")
        return found

    def check_now(self, host: str) -> list[str]:
        """check() for a caller outside an event loop (a CLI command)."""
        return asyncio.run(self.check(host))

    async def resolve(self, host: str) -> list[str]:
        host = host.strip("[]")
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        if self.nameservers:
            return await self._dns(host)
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM), self.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise LookupFailed(f"{host} does not resolve: {exc or 'timed out'}") from exc
        return list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))

    async def _dns(self, host: str) -> list[str]:
        import dns.asyncresolver
        import dns.exception
        import dns.nameserver
        import dns.resolver

        from mailflow.mail.dns import nameserver_address

        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*nameserver_address(ns)) for ns in self.nameservers]
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(host, rdtype, lifetime=self.timeout_s)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                raise LookupFailed(f"{host} does not resolve: {exc}") from exc
            found += [r.to_text() for r in answer]
        if not found:
            raise LookupFailed(f"{host} does not resolve: no such name")
        return found


# -- Standard Webhooks -------------------------------------------------------------------------


def new_secret() -> str:
    """A signing secret as Standard Webhooks libraries take it: whsec_<base64 of 32 bytes>."""
    import secrets

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: v1,<base64 HMAC-SHA256 of "id.timestamp.body">."""
    from standardwebhooks import Webhook

    return Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())


def signed_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The headers of a signed JSON POST: webhook-id (the receiver dedupes by it),
    webhook-timestamp and webhook-signature."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


# -- the HTTP client (thin I/O shell) ----------------------------------------------------------


class HttpPoster:
    """POSTs over httpx: redirects are not followed, proxies and .netrc from the environment
    are not used (trust_env off), and nothing of the answer is read but its status line.

    With a `guard`, the URL's host is resolved and checked before each POST and the POST
    connects to the address checked (the Host header and TLS name stay the URL's)."""

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        max_connections: int = 32,
        user_agent: str = "mailflow",
        guard: AddressGuard | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.user_agent = user_agent
        self.guard = guard
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
        started = time.monotonic()
        attempt = await self._post(url, body, headers)
        return replace(attempt, duration_s=time.monotonic() - started)

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        import httpx

        extensions: dict[str, Any] = {}
        target: str | httpx.URL = url
        if self.guard is not None:
            try:
                parsed = httpx.URL(url)
                addresses = await self.guard.check(parsed.host)
            except Refused as exc:
                return Attempt(None, f"refused: {exc}", permanent=True)
            except LookupFailed as exc:
                return Attempt(None, str(exc))
            except httpx.InvalidURL as exc:
                return Attempt(None, f"cannot POST to this URL: {exc}", permanent=True)
            target = parsed.copy_with(host=addresses[0])
            headers = {**headers, "host": parsed.netloc.decode("ascii")}
            if parsed.scheme == "https":
                extensions["sni_hostname"] = parsed.host
        try:
            async with self._connect().stream(
                "POST", target, content=body, headers=headers, extensions=extensions or None
            ) as resp:
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
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# -- the loop ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopOptions:
    """What every Loop's options say (actions.Options and webhooks.Options add their own)."""

    lease_s: float = 300.0  # a claimed row is not claimed again for this long
    concurrency: int = 16  # attempts in flight at once
    poll_s: float = 1.0  # how often due rows are looked for when there is nothing to do


C = TypeVar("C")  # a claimed row
V = TypeVar("V")  # what is recorded of one attempt


class Loop(ABC, Generic[C, V]):
    """Claims due rows, carries each one out, records the attempt (see the module docstring).

    A subclass says how to claim (`_claim`), try (`_attempt`), judge (`_judge`) and record
    (`_record`: False when the row is no longer the claimed attempt), and what its log lines
    say (`prefix`, `done_line`, `_fields`)."""

    prefix = ""  # log lines <prefix>.start, .claim_failed, .not_sent, .record_failed, .stop
    done_line = ""  # the log line of each recorded attempt

    def __init__(self, store: EventStore, options: LoopOptions) -> None:
        if store.tenant is not None:
            raise ValueError(f"{self.prefix} is every tenant's work: run it with an operator's store")
        self.store = store
        self.options = options
        self.log = get_logger(f"mailflow.{self.prefix}")
        self.db = asyncio.Semaphore(2)  # the rest of the pool is the process's (the SMTP server's commits)
        self.claim_failing = False
        self.sent = 0
        self.recorded = 0
        self._secrets: dict[str, tuple[str, float]] = {}

    @abstractmethod
    def _claim(self, limit: int) -> list[C]: ...

    @abstractmethod
    async def _attempt(self, c: C) -> Attempt: ...

    @abstractmethod
    def _judge(self, c: C, attempt: Attempt) -> V: ...

    @abstractmethod
    def _record(self, c: C, verdict: V) -> bool: ...

    @abstractmethod
    def _fields(self, c: C, verdict: V | None = None) -> dict[str, Any]:
        """What the log lines say of a row (and of its verdict, for the line of a recorded attempt)."""

    def _start_fields(self) -> dict[str, Any]:
        return dict(self.options.__dict__)

    async def run(self, stop: threading.Event | asyncio.Event) -> None:
        inflight: set[asyncio.Task[None]] = set()
        self.log.info(f"{self.prefix}.start", **self._start_fields())
        try:
            while not stop.is_set():
                inflight = {t for t in inflight if not t.done()}
                free = self.options.concurrency - len(inflight)
                claimed: list[C] = []
                if free > 0:
                    try:
                        claimed = await self._db(self._claim, free)
                        self.claim_failing = False
                    except Exception as exc:  # noqa: BLE001 - the database is away: try again later
                        if not self.claim_failing:  # said once per outage
                            self.log.warning(f"{self.prefix}.claim_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                        self.claim_failing = True
                for c in claimed:
                    inflight.add(asyncio.create_task(self._carry_out(c)))
                if free > 0 and len(claimed) == free:
                    continue  # more may be due
                await self._pause(stop, inflight)
        finally:
            await self._drain(inflight)
            await self._close()
            self.log.info(f"{self.prefix}.stop", sent=self.sent, recorded=self.recorded)

    async def _close(self) -> None:
        """Release what the loop holds (its HTTP client) once it has drained."""

    async def _pause(self, stop: threading.Event | asyncio.Event, inflight: set[asyncio.Task[None]]) -> None:
        """Until an attempt finishes, `stop` is set or poll_s has passed."""
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
        """Let the attempts in flight finish (and be recorded) for a while; the others keep
        their lease and are sent again after it."""
        if not inflight:
            return
        _, pending = await asyncio.wait(inflight, timeout=min(30.0, self.options.lease_s / 2))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _secret_of(self, key: str, ttl_s: float, read: Callable[[Any], str]) -> str:
        """A signing secret, `read(conn)` from the vault at most every `ttl_s` per key: a rotated
        one is used within that long, and the vault is not asked for every POST."""
        cached = self._secrets.get(key)
        if cached is not None and time.monotonic() - cached[1] < ttl_s:
            return cached[0]
        with self.store.pool.connection() as conn:
            secret = read(conn)
        self._secrets[key] = (secret, time.monotonic())
        return secret

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self.db:
            return await asyncio.to_thread(fn, *args)

    async def _carry_out(self, c: C) -> None:
        try:
            attempt = await asyncio.wait_for(self._attempt(c), timeout=max(1.0, self.options.lease_s / 2))
        except TimeoutError:
            attempt = Attempt(None, f"took longer than {self.options.lease_s / 2:g} s")
        except Exception as exc:  # noqa: BLE001 - the database or the vault: not sent, try again
            self.log.warning(f"{self.prefix}.not_sent", **self._fields(c), error=f"{type(exc).__name__}: {exc}")
            return  # the lease runs out and the row is claimed again
        self.sent += 1
        verdict = self._judge(c, attempt)
        try:
            recorded = await self._db(self._record, c, verdict)
        except Exception as exc:  # noqa: BLE001 - sent, not recorded: sent again after the lease
            self.log.warning(f"{self.prefix}.record_failed", **self._fields(c), error=f"{type(exc).__name__}: {exc}")
            return
        if recorded:
            self.recorded += 1
            self.log.info(self.done_line, **self._fields(c, verdict))
