"""Typed errors a user can cause or act on; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class MailflowError(Exception):
    """Base class for errors whose message is meant for the person at the keyboard."""

    exit_code = 1


class ConfigurationError(MailflowError):
    """A setting is missing or malformed."""

    exit_code = 2


class UsageError(MailflowError):
    """A command was called with bad arguments or input."""

    exit_code = 2


class ServiceUnavailable(MailflowError):
    """PostgreSQL or Redis could not be reached at the configured URL.

    `transient` says whether waiting may help (no answer, a server starting or stopping)
    or not (a wrong password, no such database, a malformed URL).
    """

    exit_code = 3

    def __init__(self, message: str, *, service: str | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.service = service
        self.transient = transient


class ConcurrencyError(MailflowError):
    """An append's expected_version did not match the stream's actual version."""

    exit_code = 4

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream!r} is at version {actual}, expected version {expected}; nothing was written"
        )


class DuplicateEventError(MailflowError):
    """An event id was already stored with different content or in another stream."""

    exit_code = 4


class InvalidEventError(MailflowError):
    """Event data failed validation against its registered schema."""

    exit_code = 2


class NotFoundError(MailflowError):
    """The thing asked for (event, stream, projection, dead letter) does not exist."""

    exit_code = 5
