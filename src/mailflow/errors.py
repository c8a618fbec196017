"""Errors a user can cause or act on: a small hierarchy, each kind with an exit code and an HTTP status.

Rooms subclass the kind that fits (a bad segment filter is a UserError, an unknown
template NotFound, a campaign that was already started a Conflict). The CLI turns any of
them into one `error:` line and `exit_code`; the API into problem+json with `http_status`.
The codes are documented in docs/operations.md ("Exit codes").
"""

from __future__ import annotations


class MailflowError(Exception):
    """Base class for errors whose message is meant for the person at the keyboard."""

    exit_code = 1
    http_status = 500


class UserError(MailflowError):
    """Bad input: an argument, a file, a filter, a template, an address."""

    exit_code = 2
    http_status = 422


class ConfigurationError(UserError):
    """A setting is missing or malformed (a MAILFLOW_* variable, not a request)."""

    http_status = 500


class UsageError(UserError):
    """A command was called with bad arguments or input."""


class InvalidEventError(UserError):
    """Event data failed validation against its registered schema."""


class BadToken(UserError):
    """A signed token (VERP, unsubscribe, preferences, SRS, open or click tracking) that is
    malformed, truncated, forged, expired, or names what it may not."""


class NotFoundError(MailflowError):
    """The thing asked for (event, projection, dead letter, contact, segment, template,
    sender, campaign, job) does not exist, or belongs to someone else."""

    exit_code = 5
    http_status = 404


class ConflictError(MailflowError):
    """The request is well formed but the current state refuses it: a name taken, a
    campaign already started, a template a running campaign still uses."""

    exit_code = 4
    http_status = 409


class ConcurrencyError(ConflictError):
    """An append's expected_version did not match the stream's actual version."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(f"stream {stream!r} is at version {actual}, expected version {expected}; nothing was written")


class DuplicateEventError(ConflictError):
    """An event id was already stored with different content or in another stream."""


class ServiceUnavailable(MailflowError):
    """PostgreSQL or Redis could not be reached at the configured URL.

    `transient` says whether waiting may help (no answer, a server starting or stopping)
    or not (a wrong password, no such database).
    """

    exit_code = 3
    http_status = 503

    def __init__(self, message: str, *, service: str | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.service = service
        self.transient = transient


class AuthenticationError(MailflowError):
    """No credentials, or credentials that are not (or no longer) good."""

    exit_code = 6
    http_status = 401


class PermissionDenied(MailflowError):
    """Good credentials that do not allow this (a key without the scope, a viewer's write)."""

    exit_code = 6
    http_status = 403


class RateLimited(MailflowError):
    """Too many requests; `retry_after` seconds until the next one is accepted."""

    exit_code = 7
    http_status = 429

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
