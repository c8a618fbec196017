"""Tenants room: users of the browser pages - roles per tenant, passwords, logins, browser sessions.

A user belongs to one tenant and has one role there (owner, admin, member, viewer); the same
address in two tenants is two users with two passwords. The log names a user by subject (the
keyed hash of the address) with the address sealed for the subject (infra/personal.py), so
erasing the person erases the user too (`_forget`). Every change of who may log in is an
event (the audit log): UserAdded, UserRoleChanged, UserPasswordChanged, UserRemoved,
UserLoggedIn, UserLoginFailed, SessionRevoked. The `users` inline projection keeps the users
table and the failed-login counts.

Passwords are hashed with argon2id (argon2-cffi). The hash is a secret: it lives in
`user_passwords`, written beside its event and never in it, like the vault's secrets. A login
costs the same whether the address is a user's or not - an unknown address is verified
against a dummy hash made with the same parameters - so response times do not tell which
addresses have accounts; a hash made under older parameters is replaced at the next good
login (`check_needs_rehash`; not an event: the password did not change). Repeated failures
for one address are refused for the rest of a window (`throttled()`), whether the address is
a user's or not, so the refusal tells nothing either.

Browser sessions are rows of `web_sessions` (only the SHA-256 of the cookie's random token
is stored): revoking one - logout, a new password, the user's removal - ends it at once.
The cookie, CSRF and the pages are web/sessions.py's.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from psycopg.rows import dict_row

from mailflow.consumers import inline
from mailflow.errors import ConflictError, NotFoundError, RateLimited, UsageError, UserError
from mailflow.events.envelope import Envelope, Metadata
from mailflow.events.store import EventStore
from mailflow.infra import personal
from mailflow.infra.tenancy import check_tenant_id
from mailflow.mail.addresses import EmailNotValidError, normalize_email
from mailflow.tenants import queries as q
from mailflow.tenants.events import (
    SessionRevoked,
    UserAdded,
    UserLoggedIn,
    UserLoginFailed,
    UserPasswordChanged,
    UserRemoved,
    UserRoleChanged,
)

ROLES = ("owner", "admin", "member", "viewer")  # most rights first
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024  # argon2 takes any length; a megabyte "password" is only a cost
LOGIN_MAX_FAILURES = 10  # failed logins for one address within LOGIN_WINDOW ...
LOGIN_WINDOW = timedelta(minutes=15)  # ... refuse more until the window is over
SESSION_TOUCH_EVERY = timedelta(seconds=60)  # last_seen_at is written at most this often

# argon2-cffi's defaults (RFC 9106's low-memory profile: argon2id, t=3, m=64 MiB, p=4).
# Replaced in one place when they change; hashes made before are rehashed at login.
HASHER = PasswordHasher()

LOGIN_ACTOR = "login-page"


class PasswordRejected(UserError):
    """A password the policy refuses (too short, the address itself)."""


class LoginThrottled(RateLimited):
    """Too many failed logins for this address lately; `retry_after` seconds to wait."""


def user_stream(user_id: str) -> str:
    return f"user-{user_id}"


def login_stream(subject: str) -> str:
    """Where failed logins for an address that is no user's are recorded."""
    return f"login-{subject}"


@dataclass(frozen=True)
class User:
    """Who logged in (or was added): enough to decide what they may do."""

    id: str
    tenant: str
    email: str
    role: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ListedUser:
    id: str
    email: str | None  # None once removed
    role: str
    status: str
    failed_logins: int
    last_failed_login_at: datetime | None
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime
    sessions: int  # open browser sessions

    def to_dict(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class SessionGrant:
    """A browser session just opened: `token` goes into the cookie and is stored nowhere."""

    id: str
    token: str
    user: User
    expires_at: datetime


@dataclass(frozen=True)
class ActiveSession:
    id: str
    tenant: str
    user_id: str
    email: str
    role: str
    created_at: datetime
    expires_at: datetime
    last_seen_at: datetime


# -- decisions (pure) -------------------------------------------------------------------------


def address(raw: str) -> str:
    """A user's address in canonical form, or UsageError."""
    try:
        return normalize_email(raw)
    except EmailNotValidError as exc:
        raise UsageError(f"{raw!r} is not a valid email address: {exc}") from exc


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UsageError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def password_problem(password: str, email: str) -> str | None:
    """Why the policy refuses `password` for the user `email`, or None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"a password needs at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"a password has at most {MAX_PASSWORD_LENGTH} characters"
    typed = password.strip().lower()
    if typed in (email.lower(), email.lower().partition("@")[0]):
        return "a password must not be the email address"
    return None


def check_password(password: str, email: str) -> None:
    problem = password_problem(password, email)
    if problem is not None:
        raise PasswordRejected(problem)


def throttled(
    failures: int | None,
    window_started_at: datetime | None,
    now: datetime,
    *,
    limit: int = LOGIN_MAX_FAILURES,
    window: timedelta = LOGIN_WINDOW,
) -> float | None:
    """Seconds until logins for an address are accepted again, or None when they are now:
    `limit` failures within the window that began at the first of them close it until its end."""
    if failures is None or window_started_at is None or failures < limit:
        return None
    left = (window_started_at + window - now).total_seconds()
    return left if left > 0 else None


def session_problem(
    *,
    expires_at: datetime,
    revoked_at: datetime | None,
    last_seen_at: datetime,
    user_status: str,
    now: datetime,
    idle: timedelta,
) -> str | None:
    """Why a session is no longer good (revoked, expired, idle, user removed), or None."""
    if revoked_at is not None:
        return "revoked"
    if user_status != "active":
        return "user removed"
    if now >= expires_at:
        return "expired"
    if now >= last_seen_at + idle:
        return "idle"
    return None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# -- passwords ----------------------------------------------------------------------------------


@cache
def _dummy_hash(parameters: tuple[int, int, int, int, int]) -> str:
    """A hash nobody's password matches, made with the hasher's parameters (so that verifying
    against it costs what verifying a real one does)."""
    return HASHER.hash(secrets.token_urlsafe(32))


def _parameters() -> tuple[int, int, int, int, int]:
    h = HASHER
    return (h.time_cost, h.memory_cost, h.parallelism, h.hash_len, h.salt_len)


def _verify(stored: str | None, password: str) -> bool:
    """Verify once, always: against the user's hash, or the dummy one when there is none."""
    try:
        return HASHER.verify(stored or _dummy_hash(_parameters()), password)
    except (VerificationError, InvalidHashError):
        return False


# -- commands (a tenant's store) ----------------------------------------------------------------


def _tenant(store: EventStore) -> str:
    if store.tenant is None:
        raise UsageError("users belong to a tenant: act for one (--tenant)")
    return store.tenant


def _locked_user(w: inline.Writer, tenant: str, email: str) -> tuple[str, dict[str, Any] | None]:
    """Lock the tenant's users (its tenants row: user changes of one tenant go one at a time)
    and the active user of `email`; returns the subject and the user's row, if any."""
    w.conn.execute(q.LOCK_TENANT, (tenant,))
    subject = w.store.subject(w.conn, email)
    with w.conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.LOCK_USER, (subject,)).fetchone()
    return subject, row


def _found(row: dict[str, Any] | None, email: str) -> dict[str, Any]:
    if row is None:
        raise NotFoundError(f"no user {email} (see `mailflow users list`)")
    return row


def _refuse_last_owner(conn: psycopg.Connection, role: str, email: str) -> None:
    if role != "owner":
        return
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.COUNT_OWNERS).fetchone()
    if row is not None and row["owners"] <= 1:
        raise ConflictError(f"{email} is the tenant's only owner; make another user owner first")


def _revoke_user_sessions(w: inline.Writer, user_id: str, reason: str, md: Metadata) -> int:
    with w.conn.cursor(row_factory=dict_row) as cur:
        ended = cur.execute(q.REVOKE_USER_SESSIONS, {"user_id": user_id, "at": datetime.now(UTC)}).fetchall()
    if ended:
        w.record(
            [
                (user_stream(user_id), SessionRevoked(session_id=s["id"], user_id=user_id, reason=reason).to_new(md))
                for s in ended
            ]
        )
    return len(ended)


def add(store: EventStore, email: str, password: str, role: str, *, actor: str | None = None) -> User:
    """A new user of the store's tenant; ConflictError if the address is one already."""
    tenant = _tenant(store)
    email = address(email)
    check_role(role)
    check_password(password, email)
    hashed = HASHER.hash(password)  # slow on purpose: before the transaction, not in it
    user_id = str(uuid.uuid4())
    with inline.writing(store) as w:
        subject, row = _locked_user(w, tenant, email)
        if row is not None:
            raise ConflictError(f"{email} is a user already (change it with `users role` or `users passwd`)")
        (sealed,) = personal.seal_many(w.conn, tenant, [(subject, {"email": email})])
        event = UserAdded(user_id=user_id, subject=subject, sealed=sealed, role=role)
        w.record([(user_stream(user_id), event.to_new(Metadata(actor=actor)))])
        w.conn.execute(q.PUT_PASSWORD, {"tenant": tenant, "id": user_id, "hash": hashed})
    return User(user_id, tenant, email, role)


def set_password(store: EventStore, email: str, password: str, *, actor: str | None = None) -> int:
    """A new password for the user; every session they had ends. Returns how many did."""
    tenant = _tenant(store)
    email = address(email)
    check_password(password, email)
    hashed = HASHER.hash(password)
    md = Metadata(actor=actor)
    with inline.writing(store) as w:
        _, row = _locked_user(w, tenant, email)
        user_id = str(_found(row, email)["id"])
        w.record([(user_stream(user_id), UserPasswordChanged(user_id=user_id).to_new(md))])
        w.conn.execute(q.PUT_PASSWORD, {"tenant": tenant, "id": user_id, "hash": hashed})
        return _revoke_user_sessions(w, user_id, "password changed", md)


def set_role(store: EventStore, email: str, role: str, *, actor: str | None = None) -> str:
    """Give the user another role (at once, in every open session); returns the previous one.
    The tenant's only owner keeps the role until another user is owner."""
    tenant = _tenant(store)
    email = address(email)
    check_role(role)
    with inline.writing(store) as w:
        _, row = _locked_user(w, tenant, email)
        found = _found(row, email)
        previous = str(found["role"])
        if previous == role:
            return previous
        _refuse_last_owner(w.conn, previous, email)
        user_id = str(found["id"])
        event = UserRoleChanged(user_id=user_id, role=role, previous_role=previous)
        w.record([(user_stream(user_id), event.to_new(Metadata(actor=actor)))])
    return previous


def remove(store: EventStore, email: str, *, actor: str | None = None) -> int:
    """The user can no longer log in, and their sessions end at once; returns how many did."""
    tenant = _tenant(store)
    email = address(email)
    md = Metadata(actor=actor)
    with inline.writing(store) as w:
        _, row = _locked_user(w, tenant, email)
        found = _found(row, email)
        _refuse_last_owner(w.conn, str(found["role"]), email)
        user_id = str(found["id"])
        ended = _revoke_user_sessions(w, user_id, "user removed", md)
        w.record([(user_stream(user_id), UserRemoved(user_id=user_id).to_new(md))])
        w.conn.execute(q.DELETE_PASSWORD, (user_id,))
    return ended


def listing(conn: psycopg.Connection, *, include_removed: bool = False) -> list[ListedUser]:
    """The tenant's users (a connection in its scope), active ones first."""
    with conn.cursor(row_factory=dict_row) as cur:
        return [ListedUser(**r) for r in cur.execute(q.LIST_USERS, {"all": include_removed}).fetchall()]


def unknown_login_failures(conn: psycopg.Connection) -> int:
    """Failed logins for addresses that are no user's (guesses), since each one's last success."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.UNKNOWN_LOGIN_FAILURES).fetchone()
    return int(row["failures"]) if row else 0


# -- logging in (an operator's or the tenant's store) --------------------------------------------


def _scoped(store: EventStore, tenant: str) -> EventStore:
    """The store acting for `tenant`, whatever store was given: logging in and out is not a
    change a suspension refuses (a suspended tenant's users can still read its data)."""
    return store.for_tenant(tenant)


def _typed_address(raw: str) -> str:
    """What a login form's address names: the canonical address, or the text as typed."""
    try:
        return normalize_email(raw)
    except EmailNotValidError:
        return raw.strip().lower()


def _attempt(
    store: EventStore, tenant: str, email: str, password: str, lifetime: timedelta | None
) -> SessionGrant | User | None:
    try:
        check_tenant_id(tenant)
    except UsageError:
        _verify(None, password)
        return None
    scoped = _scoped(store, tenant)
    typed = _typed_address(email)
    with inline.reading(scoped) as conn, conn.cursor(row_factory=dict_row) as cur:
        status = cur.execute(q.TENANT_FOR_LOGIN, (tenant,)).fetchone()
        if status is None or status["status"] == "erased":
            candidate = None
            subject = None
        else:
            subject = scoped.subject(conn, typed)
            gate = cur.execute(q.LOGIN_THROTTLE, (subject,)).fetchone()
            assert gate is not None
            wait = throttled(gate["failures"], gate["window_started_at"], gate["now"])
            if wait is not None:
                raise LoginThrottled(
                    "too many failed logins for this address; try again later", retry_after=int(wait) + 1
                )
            candidate = cur.execute(q.LOGIN_CANDIDATE, (subject,)).fetchone()
    stored = candidate["hash"] if candidate is not None else None
    good = _verify(stored, password) and stored is not None
    if subject is None:  # no such tenant: nothing to record, nobody to count against
        return None
    assert candidate is not None or not good
    rehashed = HASHER.hash(password) if good and HASHER.check_needs_rehash(stored or "") else None
    md = Metadata(actor=LOGIN_ACTOR)
    with inline.writing(scoped) as w:
        if good:  # and still so: not removed, nor given another password, since it was read
            with w.conn.cursor(row_factory=dict_row) as cur:
                now = cur.execute(q.LOGIN_CANDIDATE_LOCKED, (subject,)).fetchone()
            good = now is not None and candidate is not None and now["id"] == candidate["id"] and now["hash"] == stored
        if not good:
            user_id = str(candidate["id"]) if candidate is not None else None
            failed = UserLoginFailed(subject=subject, user_id=user_id)
            w.record([(user_stream(user_id) if user_id else login_stream(subject), failed.to_new(md))])
            return None
        assert candidate is not None
        user = User(str(candidate["id"]), tenant, str(candidate["email"]), str(candidate["role"]))
        if rehashed is not None:
            w.conn.execute(q.REHASH_PASSWORD, {"id": user.id, "new": rehashed, "old": stored})
        grant = _open_session(w, user, lifetime) if lifetime is not None else None
        event = UserLoggedIn(user_id=user.id, subject=subject, session_id=grant.id if grant else None)
        w.record([(user_stream(user.id), event.to_new(md))])
    return grant if grant is not None else user


def authenticate(store: EventStore, tenant: str, email: str, password: str) -> User | None:
    """The user of `tenant` with this address and password, or None - in the same time
    whether the address is a user's or not. Records UserLoggedIn or UserLoginFailed;
    LoginThrottled after too many failures for the address."""
    found = _attempt(store, tenant, email, password, None)
    assert not isinstance(found, SessionGrant)
    return found


def log_in(store: EventStore, tenant: str, email: str, password: str, *, lifetime: timedelta) -> SessionGrant | None:
    """authenticate(), and a browser session opened in the same transaction (its id in
    UserLoggedIn), good for at most `lifetime`."""
    found = _attempt(store, tenant, email, password, lifetime)
    assert not isinstance(found, User)
    return found


# -- browser sessions -------------------------------------------------------------------------


def _open_session(w: inline.Writer, user: User, lifetime: timedelta) -> SessionGrant:
    token = secrets.token_urlsafe(32)
    session_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    expires_at = now + lifetime
    w.conn.execute(
        q.INSERT_SESSION,
        {
            "tenant": user.tenant,
            "id": session_id,
            "user_id": user.id,
            "token_hash": token_hash(token),
            "at": now,
            "expires_at": expires_at,
        },
    )
    return SessionGrant(session_id, token, user, expires_at)


def session_for(store: EventStore, tenant: str, token: str, *, idle: timedelta) -> ActiveSession | None:
    """The session whose cookie carries `token`, if it is still good (not revoked, expired or
    idle, its user not removed); its last_seen_at moves on (at most once a minute)."""
    try:
        check_tenant_id(tenant)
    except UsageError:
        return None
    now = datetime.now(UTC)
    with inline.reading(_scoped(store, tenant)) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.SESSION_BY_TOKEN, (token_hash(token),)).fetchone()
        if row is None:
            return None
        problem = session_problem(
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            last_seen_at=row["last_seen_at"],
            user_status=row["status"],
            now=now,
            idle=idle,
        )
        if problem is not None:
            return None
        cur.execute(q.TOUCH_SESSION, {"id": row["id"], "at": now, "every": SESSION_TOUCH_EVERY})
    return ActiveSession(
        row["id"], tenant, row["user_id"], row["email"], row["role"], row["created_at"], row["expires_at"], now
    )


def end_session(store: EventStore, tenant: str, session_id: str, *, reason: str = "logout") -> bool:
    """Revoke one session (SessionRevoked); False if it was revoked already."""
    with inline.writing(_scoped(store, tenant)) as w, w.conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q.REVOKE_SESSION, {"id": session_id, "at": datetime.now(UTC)}).fetchone()
        if row is None:
            return False
        user_id = str(row["user_id"])
        event = SessionRevoked(session_id=session_id, user_id=user_id, reason=reason)
        w.record([(user_stream(user_id), event.to_new(Metadata(actor=LOGIN_ACTOR)))])
    return True


def forget_ended_sessions(conn: psycopg.Connection, *, days: int = 7) -> int:
    """Delete every tenant's sessions that ended `days` ago or more (an operator's connection;
    the cleanup duty). Until then an ended session's row says why it ended."""
    return conn.execute(q.FORGET_ENDED_SESSIONS, {"days": days}).rowcount


# -- erasure: an erased person is no user any more ----------------------------------------------


@personal.on_erasure
def _forget(conn: psycopg.Connection, tenant: str, subjects: Sequence[str] | None) -> None:
    """The user rows, passwords and sessions of erased people (subjects None: the whole
    tenant's). A rebuild does not bring them back: their sealed addresses no longer open."""
    params = {"tenant": tenant, "subjects": list(subjects) if subjects is not None else None}
    conn.execute(q.ERASE_USERS, params)
    conn.execute(q.ERASE_LOGIN_FAILURES, params)


# -- the inline projection -------------------------------------------------------------------


def _user_added(conn: psycopg.Connection, d: dict[str, Any], at: datetime, tenant: str) -> None:
    (opened,) = personal.open_many(conn, tenant, [(d["subject"], d["sealed"])])
    if opened is None:  # the person was erased since: no user row
        return
    conn.execute(
        q.INSERT_USER,
        {
            "tenant": tenant,
            "id": d["user_id"],
            "subject": d["subject"],
            "email": opened["email"],
            "role": d["role"],
            "at": at,
        },
    )


def _role_changed(conn: psycopg.Connection, d: dict[str, Any], at: datetime, tenant: str) -> None:
    conn.execute(q.SET_USER_ROLE, {"tenant": tenant, "id": d["user_id"], "role": d["role"], "at": at})


def _password_changed(conn: psycopg.Connection, d: dict[str, Any], at: datetime, tenant: str) -> None:
    conn.execute(q.TOUCH_USER, {"tenant": tenant, "id": d["user_id"], "at": at})


def _removed(conn: psycopg.Connection, d: dict[str, Any], at: datetime, tenant: str) -> None:
    conn.execute(q.REMOVE_USER, {"tenant": tenant, "id": d["user_id"], "at": at})


def _logged_in(conn: psycopg.Connection, d: dict[str, Any], at: datetime, tenant: str) -> None:
    conn.execute(q.USER_LOGGED_IN, {"tenant": tenant, "id": d["user_id"], "at": at})
    conn.execute(q.CLEAR_LOGIN_FAILURES, {"tenant": tenant, "subject": d["subject"]})


def _login_failed(conn: psycopg.Connection, d: dict[str, Any], at: datetime, tenant: str) -> None:
    if d.get("user_id"):
        conn.execute(q.USER_LOGIN_FAILED, {"tenant": tenant, "id": d["user_id"], "at": at})
    conn.execute(q.COUNT_LOGIN_FAILURE, {"tenant": tenant, "subject": d["subject"], "at": at, "window": LOGIN_WINDOW})


Apply = Callable[[psycopg.Connection, dict[str, Any], datetime, str], None]


def _per_event(fn: Apply) -> inline.Handler:
    def apply(conn: psycopg.Connection, events: list[Envelope]) -> None:
        for env in events:
            if env.metadata.tenant is None:  # the store stamps every event
                raise ValueError(f"event {env.id} ({env.type}) has no tenant")
            fn(conn, env.data, env.recorded_at, env.metadata.tenant)

    return apply


PROJECTION = inline.register(
    inline.InlineProjection(
        "users",
        "users of the browser pages, their roles and failed-login counts (inline)",
        ("users", "login_failures"),
        {
            "UserAdded": _per_event(_user_added),
            "UserRoleChanged": _per_event(_role_changed),
            "UserPasswordChanged": _per_event(_password_changed),
            "UserRemoved": _per_event(_removed),
            "UserLoggedIn": _per_event(_logged_in),
            "UserLoginFailed": _per_event(_login_failed),
        },
    )
)
