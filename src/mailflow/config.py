"""Configuration room: every setting comes from MAILFLOW_* environment variables, read once.

With no MAILFLOW_DATABASE_URL / MAILFLOW_REDIS_URL the embedded PostgreSQL and Redis
under MAILFLOW_HOME are used (started on demand, shared by every process). A URL that is
set is checked here, before anything connects: a malformed one is a settings mistake to
fix (exit code 2), not an outage to wait out, and a bare `postgresql://` that names no
host and no database would otherwise reach whatever the local socket offers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from mailflow.errors import ConfigurationError


class Settings(BaseSettings):
    """mailflow settings; see docs/operations.md for each variable."""

    model_config = SettingsConfigDict(env_prefix="MAILFLOW_", extra="ignore")

    database_url: str | None = None
    redis_url: str | None = None
    home: Path = Path(".mailflow")
    redis_prefix: str = "mailflow"
    tenant: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")  # whose data the CLI acts on
    log_level: str = "info"
    log_format: str = Field(default="auto", pattern="^(auto|json|console)$")

    # Appends wake the relay with at most one NOTIFY per this many seconds per process
    # (0 = after every append). See events/notify.py for why not inside the transaction.
    notify_interval_s: float = Field(default=0.02, ge=0)

    # Relay
    relay_batch_size: int = Field(default=2000, ge=1)
    relay_poll_interval_s: float = Field(default=1.0, gt=0)
    relay_retry_interval_s: float = Field(default=0.002, gt=0)
    stream_maxlen: int = Field(default=200_000, ge=1000)

    # Consumers
    consumer_batch_size: int = Field(default=500, ge=1)
    consumer_block_ms: int = Field(default=2000, ge=1)
    consumer_claim_idle_ms: int = Field(default=30_000, ge=1)
    consumer_max_attempts: int = Field(default=5, ge=1)
    consumer_retry_backoff_s: float = Field(default=0.2, ge=0)
    catchup_batch_size: int = Field(default=5000, ge=1)

    # Outbound
    # The master keyring, newest first (comma-separated): encrypts secrets, signs VERP and
    # unsubscribe tokens. Default: the lines of secret_key_file, else MAILFLOW_HOME/secret.key.
    secret_key: str | None = None
    secret_key_file: Path | None = None
    unsubscribe_base_url: str | None = None  # e.g. https://mail.example.org/unsubscribe
    preferences_base_url: str | None = None  # default: /preferences beside the unsubscribe pages
    # Open and click tracking (docs/tracking.md): where the pixel and rewritten links point, an
    # absolute http(s) URL of `mailflow web`. Unset: the scheme and host of the unsubscribe base
    # URL; with neither, nothing is tracked.
    tracking_base_url: str | None = None  # e.g. https://mail.example.org

    # The HTTP API (`mailflow web`, /api/v1; docs/api.md)
    api_rate_per_key: float = Field(default=50.0, gt=0)  # requests per second one key may make
    api_burst_per_key: int = Field(default=100, ge=1)  # ... in a burst
    api_rate_per_tenant: float = Field(default=200.0, gt=0)  # all of a tenant's keys together
    api_burst_per_tenant: int = Field(default=400, ge=1)
    api_max_body_bytes: int = Field(default=1_048_576, ge=1024)  # a request body larger is 413
    api_max_import_bytes: int = Field(default=104_857_600, ge=1024)  # ... except a contacts import
    api_timeout_s: float = Field(default=30.0, gt=0)  # a statement running longer is cancelled: 503
    api_trusted_proxies: list[str] = Field(default_factory=list)  # networks whose X-Forwarded-For is believed
    api_cors_origins: list[str] = Field(default_factory=list)  # browser origins allowed to call the API
    api_idempotency_hours: int = Field(default=24, ge=1)  # how long an Idempotency-Key is remembered
    # A verified key's row is kept this long per process (0: read it on every request); changes
    # reach every process at once anyway (api/keycache.py)
    api_key_cache_s: float = Field(default=30.0, ge=0)
    # Browser sessions (web/sessions.py, docs/users.md)
    web_secure_cookies: bool = False  # Secure cookies on http requests too: TLS ends at a proxy
    web_session_idle_s: float = Field(default=3600.0, gt=0)  # a session unused this long ends
    web_session_lifetime_s: float = Field(default=43200.0, gt=0)  # every session ends this long after its login
    queuer_batch_size: int = Field(default=500, ge=1)
    queuer_interval_s: float = Field(default=0.05, gt=0)
    queue_max_depth: int = Field(default=5000, ge=1)  # backpressure: never more unread entries than this
    # Unread work kept in a stream: this many seconds of sending at the recent rate, at least
    # queue_min_unread entries. Shallow, so a tenant's new campaign is not queued behind another's.
    queue_target_s: float = Field(default=0.25, gt=0)
    queue_min_unread: int = Field(default=100, ge=1)
    queuer_reconcile_interval_s: float = Field(
        default=5.0, gt=0
    )  # check the streams against the queued jobs this often
    rate_limits: dict[str, float] = Field(default_factory=dict)  # {"*": 50, "gmail.com": 20} messages/s
    job_lease_s: float = Field(default=120.0, gt=0)
    worker_concurrency: int = Field(default=128, ge=1)
    worker_connections_per_relay: int = Field(default=8, ge=1)
    worker_connections_per_mx: int = Field(default=2, ge=1)  # direct delivery: sessions per MX host
    worker_flush_interval_s: float = Field(default=0.05, gt=0)  # how often finished sends are recorded
    worker_idle_close_s: float = Field(default=60.0, gt=0)  # close pooled SMTP sessions idle this long
    worker_stop_timeout_s: float = Field(default=30.0, ge=0)  # on SIGTERM, keep trying to record sends this long
    ehlo_hostname: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.\-\[\]:]+$")  # EHLO name; default: the FQDN
    mx_overrides: dict[str, str] = Field(default_factory=dict)  # direct delivery: {"example.net": "10.0.0.5:25"}
    dns_servers: list[str] = Field(default_factory=list)  # direct delivery: ["10.0.0.53", "127.0.0.1:5353"]
    # Inbound SMTP (mailflow inbound): limits, each with its SMTP reply (inbound/server.py).
    inbound_host: str = "127.0.0.1"
    inbound_port: int = Field(default=2525, ge=1, le=65535)
    inbound_processes: int = Field(default=1, ge=1, le=64)  # server processes sharing the port (SO_REUSEPORT)
    inbound_hostname: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.\-]+$")  # banner; default: the FQDN
    inbound_max_message_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    inbound_max_recipients: int = Field(default=100, ge=1)
    inbound_max_connections: int = Field(default=200, ge=1)
    inbound_max_connections_per_ip: int = Field(default=20, ge=1)
    inbound_timeout_s: float = Field(default=300.0, gt=0)  # idle between commands
    inbound_data_timeout_s: float = Field(default=600.0, gt=0)  # one whole DATA (slow senders are cut off)
    inbound_tls_cert: Path | None = None  # STARTTLS; default: a self-signed one under MAILFLOW_HOME
    inbound_tls_key: Path | None = None
    # What the server finds out before its 250: authentication (SPF, DKIM, ARC, DMARC; DNS
    # through MAILFLOW_DNS_SERVERS when set) and the spam score (built-in rules, plus spamd or
    # rspamd when one is configured; one that is down or slow leaves the message unscored).
    inbound_authentication: bool = True
    inbound_dns_timeout_s: float = Field(default=5.0, gt=0)
    inbound_spamd: str | None = Field(default=None, pattern=r"^[^\s:]+:\d{1,5}$")  # "127.0.0.1:783"
    inbound_rspamd_url: str | None = Field(default=None, pattern=r"^https?://\S+$")  # "http://127.0.0.1:11333"
    inbound_spam_timeout_s: float = Field(default=10.0, gt=0)
    # Routes' http and forward actions (inbound/actions.py): retried with exponential backoff
    # (base, times factor per attempt, at most max_s apart), given up after max_attempts.
    inbound_forward_relay: str | None = None  # smtp://[user:password@]host[:port][?tls=...]; unset: no forwards
    inbound_action_timeout_s: float = Field(default=30.0, gt=0)  # an http POST's answer
    inbound_action_retry_base_s: float = Field(default=30.0, gt=0)
    inbound_action_retry_factor: float = Field(default=2.0, ge=1)
    inbound_action_retry_max_s: float = Field(default=6 * 3600.0, gt=0)
    inbound_action_max_attempts: int = Field(default=12, ge=1)
    inbound_action_lease_s: float = Field(default=300.0, gt=0)  # a claimed action is not sent twice meanwhile
    inbound_action_concurrency: int = Field(default=16, ge=1)
    inbound_action_poll_s: float = Field(default=1.0, gt=0)
    inbound_action_max_raw_bytes: int = Field(default=5 * 1024 * 1024, ge=0)  # larger: POSTed without raw
    # Webhook endpoints (inbound/webhooks.py): URLs that are, or resolve to, loopback, private or
    # link-local addresses are refused (at `webhooks add` and before each POST) unless this is set.
    webhooks_allow_private: bool = False
    # What came back (outbound/feedback.py): this many soft bounces within the window suppress
    # the address (reason soft_bounces); a hard bounce suppresses at once.
    soft_bounce_limit: int = Field(default=3, ge=1)
    soft_bounce_window_days: float = Field(default=14.0, gt=0)
    retry_base_s: float = Field(default=300.0, gt=0)
    retry_factor: float = Field(default=1.3, ge=1)
    retry_max_attempts: int = Field(default=18, ge=1)
    # Sending domains (outbound/domains.py): what `sending-domains add` says to publish, and the
    # queuer's periodic re-check. SPF names spf_include (a relay provider's SPF domain) when set,
    # else a:<the EHLO name> (direct delivery sends from this host); DMARC's aggregate reports go
    # to dmarc_rua (an address), else dmarc-reports@<the domain>.
    spf_include: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]+$")  # "_spf.relay.example"
    dmarc_rua: str | None = Field(default=None, pattern=r"^[^\s@;,]+@[^\s@;,]+$")  # "dmarc@example.org"
    domain_check_interval_s: float = Field(default=3600.0, gt=0)  # re-check each domain's records this often
    # Analytics (projectors/facts.py, analytics.py): raw facts (and their day partitions) are kept
    # this long; the hourly, daily and monthly aggregates longer (hourly as long as the facts).
    analytics_retention_days: int = Field(default=180, ge=2, le=3660)
    # The queuer's leader schedules the periodic table's duties (outbound/periodic.py) as jobs;
    # off, none is scheduled (the tests that are not about them turn them off).
    periodic_duties: bool = True
    domain_dns_timeout_s: float = Field(default=5.0, gt=0)  # one DNS question of a check

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.redis_url is None

    @property
    def tracking_base(self) -> str | None:
        """The base of tracking URLs (no trailing slash), or None: nothing is tracked."""
        if self.tracking_base_url:
            return self.tracking_base_url.rstrip("/")
        if not self.unsubscribe_base_url:
            return None
        parts = urlsplit(self.unsubscribe_base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return None
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("tracking_base_url")
    @classmethod
    def _tracking_base_url(cls, url: str | None) -> str | None:
        if not url:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{url!r} is not an absolute http(s) URL; use one like https://mail.example.org")
        return url

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, url: str | None) -> str | None:
        problem = None if url is None else database_url_problem(url)
        if problem:
            raise ValueError(problem)
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        problem = None if url is None else redis_url_problem(url)
        if problem:
            raise ValueError(problem)
        return url


POSTGRES_SCHEMES = ("postgresql", "postgres")
REDIS_SCHEMES = ("redis", "rediss", "unix")


def database_url_problem(url: str) -> str | None:
    """Why `url` cannot name a PostgreSQL database, or None when it can.

    A postgresql:// (or postgres://) URL or a libpq key=value string, as libpq parses it,
    naming a host or a database (or both); ports are numbers. Passwords are masked."""
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    if not url.strip():
        return "is empty; unset it to use the embedded PostgreSQL, or give e.g. postgresql://localhost/mailflow"
    scheme, is_url, _ = url.partition("://")
    if is_url and scheme.lower() not in POSTGRES_SCHEMES:
        return (
            f"{mask_url(url)} is not a PostgreSQL URL: it must start with postgresql:// "
            "(or be a libpq string such as 'host=db dbname=mailflow')"
        )
    try:
        params = conninfo_to_dict(url)
    except PsycopgError as exc:
        what = "PostgreSQL URL" if is_url else "PostgreSQL URL or libpq connection string"
        return f"{_masked(url)} is not a valid {what}: {_libpq_reason(url, exc)}"
    if not (params.get("host") or params.get("hostaddr") or params.get("dbname")):
        return (
            f"{mask_url(url)} names no host and no database; give at least one, "
            "e.g. postgresql://localhost/mailflow or postgresql:///mailflow for the local socket"
        )
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return f"{mask_url(url)}: the port must be a number from 1 to 65535"
    return None


def redis_url_problem(url: str) -> str | None:
    """Why `url` cannot name a Redis server, or None: redis://, rediss:// or unix:///path."""
    if not url.strip():
        return "is empty; unset it to use the embedded Redis, or give e.g. redis://localhost:6379/0"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        return f"{mask_url(url)} is not a valid Redis URL: {exc}"
    if parts.scheme.lower() not in REDIS_SCHEMES:
        return f"{mask_url(url)} is not a Redis URL: it must start with redis://, rediss:// or unix://"
    if parts.scheme.lower() == "unix" and not parts.path:
        return f"{mask_url(url)} names no socket; give its path, e.g. unix:///run/redis/redis.sock"
    return None


def check_service_urls(database_url: str | None, redis_url: str | None) -> None:
    """ConfigurationError naming the variable for a URL that bypassed Settings' validation
    (`model_copy(update=...)` does not validate); see services.resolve()."""
    for name, url, problem_of in (
        ("DATABASE_URL", database_url, database_url_problem),
        ("REDIS_URL", redis_url, redis_url_problem),
    ):
        problem = None if url is None else problem_of(url)
        if problem:
            raise ConfigurationError(f"bad setting MAILFLOW_{name}: {problem}")


def _secret_of(url: str) -> str:
    """The password part of a URL's user info, found without parsing (it may not parse)."""
    _, _, rest = url.partition("://")
    userinfo = rest.split("/", 1)[0].rpartition("@")[0]
    return userinfo.partition(":")[2]


def _masked(url: str) -> str:
    secret = _secret_of(url)
    return url.replace(secret, "***") if secret else url


def _libpq_reason(url: str, exc: Exception) -> str:
    """libpq's first line, which may quote the URL (and so its password): masked."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    secret = _secret_of(url)
    return text.replace(secret, "***") if secret else text


_JSON_EXAMPLES = {
    "rate_limits": '{"*": 50, "gmail.com": 20}',
    "mx_overrides": '{"example.net": "10.0.0.5:25"}',
    "dns_servers": '["10.0.0.53", "127.0.0.1:5353"]',
}


def load_settings(**overrides: object) -> Settings:
    """Read MAILFLOW_* once; a bad value becomes one ConfigurationError line naming it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "MAILFLOW_" + "_".join(str(p) for p in first["loc"]).upper()
        message = first["msg"].removeprefix("Value error, ")  # our validators' ValueErrors
        raise ConfigurationError(f"bad setting {name}: {message}") from exc
    except SettingsError as exc:  # a JSON setting that is not JSON: 'error parsing value for field "x" ...'
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "?"
        raise ConfigurationError(
            f"bad setting MAILFLOW_{field.upper()}: not valid JSON (e.g. {_JSON_EXAMPLES.get(field, '{...}')})"
        ) from exc


def settings_env(settings: Settings) -> dict[str, str]:
    """MAILFLOW_* variables that give a child process exactly these settings (`mailflow up`, the demo)."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            text = json.dumps(value)
        elif isinstance(value, Path):
            text = str(value.expanduser().resolve())
        else:
            text = str(value)
        env[f"MAILFLOW_{name.upper()}"] = text
    return env


def debug_enabled() -> bool:
    """MAILFLOW_DEBUG=1 shows tracebacks for unexpected errors (read even if settings are bad)."""
    return os.environ.get("MAILFLOW_DEBUG", "") not in ("", "0", "false")


def mask_url(url: str) -> str:
    """Return url with any password replaced by ***, for error messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    host = netloc[1] if len(netloc) == 2 else parts.netloc
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def split_password(url: str) -> tuple[str, str | None]:
    """(url without its password, the password or None): the URL keeps its user name."""
    from urllib.parse import unquote

    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None
    if parts.password is None:
        return url, None
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.netloc.rsplit("@", 1)[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host)), unquote(parts.password)


def strip_password(url: str) -> str:
    return split_password(url)[0]
