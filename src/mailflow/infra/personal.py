"""Infra room: personal data in an immutable log - pseudonymous subjects, sealed values, shredding.

An address never appears in an event, a stream name or an idempotency key. Each person is a
*subject*: a keyed hash (HMAC-SHA256 under a random key kept encrypted in secret_settings,
over the tenant and the canonical address), the same for every letter case of the address.
What an event must say about the person - the address, the contact's attributes, a send's
variables - is *sealed*: encrypted (AES-256-GCM, bound to tenant and subject) under a key of
that subject alone, kept in `subject_keys`. Erasure deletes the subject's key (crypto-
shredding): every sealed value about the person, in the log, in the Redis copy of the log and
in every backup of the log, can no longer be read, while the events themselves - and so every
count and state built from them - stay as they were. A projection that meets a value it can no
longer open treats the person as erased.

The subject keys are stored in the clear: the read models next to them (contacts, jobs) hold
the same data in the clear, so encrypting the keys would protect nothing a database thief
could not read anyway; what the keys are for is being deletable. The subject hash needs the
master key (it is what keeps the log from being searched for an address by anyone holding
only a dump), so only processes with the keyring can name a subject from an address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets as pysecrets
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mailflow.errors import ConflictError
from mailflow.infra.vault import Keyring, Vault

SUBJECT_KEY_SETTING = "subject-key"
SEAL_VERSION = "s1"

INSERT_KEYS = """
INSERT INTO subject_keys (tenant, subject, key)
SELECT %s, u.subject, u.key FROM unnest(%s::text[], %s::bytea[]) AS u(subject, key)
ON CONFLICT (tenant, subject) DO NOTHING
"""
GET_KEYS = "SELECT subject, key FROM subject_keys WHERE tenant = %s AND subject = ANY(%s::text[])"
DELETE_KEYS = "DELETE FROM subject_keys WHERE tenant = %s AND subject = ANY(%s::text[])"
DELETE_TENANT_KEYS = "DELETE FROM subject_keys WHERE tenant = %s"
# Erased subjects: no new key is ever made for them, so nothing about them is sealed again.
ERASED = "SELECT subject FROM erased_subjects WHERE tenant = %s AND subject = ANY(%s::text[])"
RECORD_ERASED = """
INSERT INTO erased_subjects (tenant, subject) SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING
"""


class Erased(ConflictError):
    """An address whose person was erased: mailflow does not store or mail it again."""

    def __init__(self, count: int = 1) -> None:
        what = "this address was" if count == 1 else f"{count} of these addresses were"
        super().__init__(f"{what} erased on request; mailflow does not store or mail it again")
        self.count = count


def subject_of(pepper: bytes, tenant: str, email: str) -> str:
    """The subject of an address in a tenant: 32 hex digits, the same in any letter case.

    Migration 0011 computes the same function (it must never change: it names streams)."""
    message = f"{tenant}\n{email.strip().lower()}".encode()
    return hmac.new(pepper, message, hashlib.sha256).hexdigest()[:32]


class People:
    """Names subjects from addresses (needs the keyring once, for the pepper)."""

    def __init__(self, keyring: Keyring) -> None:
        self.vault = Vault(keyring)
        self._pepper: bytes | None = None

    def pepper(self, conn: psycopg.Connection) -> bytes:
        if self._pepper is None:
            self._pepper = self.vault.setting(conn, SUBJECT_KEY_SETTING)
        return self._pepper

    def subject(self, conn: psycopg.Connection, tenant: str, email: str) -> str:
        return subject_of(self.pepper(conn), tenant, email)


def _aad(tenant: str, subject: str) -> bytes:
    return f"{tenant}/{subject}".encode()


def seal(key: bytes, tenant: str, subject: str, value: dict[str, Any]) -> str:
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, orjson.dumps(value), _aad(tenant, subject))
    return SEAL_VERSION + "." + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def unseal(key: bytes, tenant: str, subject: str, token: str) -> dict[str, Any] | None:
    """The sealed value, or None if it cannot be opened with this key (it was not sealed
    for this tenant and subject)."""
    version, _, body = token.partition(".")
    if version != SEAL_VERSION:
        return None
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    try:
        value = AESGCM(key).decrypt(raw[:12], raw[12:], _aad(tenant, subject))
    except InvalidTag:
        return None
    result: dict[str, Any] = orjson.loads(value)
    return result


def keys(conn: psycopg.Connection, tenant: str, subjects: Sequence[str], *, create: bool) -> dict[str, bytes]:
    """The subjects' keys; with `create`, a new random key for each subject that has none.

    Insert, then read: of two transactions creating one subject's key at once, the second
    waits for the first and then reads the key the first stored, so both seal with it."""
    wanted = sorted(set(subjects))
    if create and wanted:
        refuse_erased(conn, tenant, wanted)
        conn.execute(INSERT_KEYS, (tenant, wanted, [pysecrets.token_bytes(32) for _ in wanted]))
    return {s: bytes(k) for s, k in conn.execute(GET_KEYS, (tenant, wanted)).fetchall()}


def seal_many(conn: psycopg.Connection, tenant: str, items: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Seal each (subject, value) under its subject's key, creating keys as needed."""
    found = keys(conn, tenant, [s for s, _ in items], create=True)
    return [seal(found[s], tenant, s, v) for s, v in items]


def seal_kept(conn: psycopg.Connection, tenant: str, items: Sequence[tuple[str, dict[str, Any]]]) -> list[str | None]:
    """Like seal_many, but None for a subject erased on request instead of Erased: the
    record is kept, the person's values are not put in the log again."""
    try:
        return list(seal_many(conn, tenant, items))
    except Erased:
        gone = erased(conn, tenant, [s for s, _ in items])
        kept = [(s, v) for s, v in items if s not in gone]
        sealed = iter(seal_many(conn, tenant, kept))
        return [None if s in gone else next(sealed) for s, _ in items]


def open_many(
    conn: psycopg.Connection, tenant: str, items: Sequence[tuple[str, str | None]]
) -> list[dict[str, Any] | None]:
    """Open each (subject, sealed) pair: the value, or None where the subject was erased."""
    found = keys(conn, tenant, [s for s, t in items if t], create=False)
    out: list[dict[str, Any] | None] = []
    for subject, token in items:
        key = found.get(subject)
        out.append(unseal(key, tenant, subject, token) if key is not None and token else None)
    return out


def erased(conn: psycopg.Connection, tenant: str, subjects: Sequence[str]) -> set[str]:
    return {s for (s,) in conn.execute(ERASED, (tenant, list(subjects))).fetchall()}


def refuse_erased(conn: psycopg.Connection, tenant: str, subjects: Sequence[str]) -> None:
    found = erased(conn, tenant, subjects)
    if found:
        raise Erased(len(found))


# What a room keeps of people outside the log (the inbound room's raw messages) is deleted by
# a function it registers here: shred() and shred_tenant() call them in their transaction.
Forget = Callable[[psycopg.Connection, str, Sequence[str] | None], None]  # (conn, tenant, subjects or None: all)
_forgetters: list[Forget] = []


def on_erasure(forget: Forget) -> Forget:
    """Register what to delete when people are erased (subjects None: the whole tenant)."""
    _forgetters.append(forget)
    return forget


def shred(conn: psycopg.Connection, tenant: str, subjects: Sequence[str]) -> int:
    """Delete the subjects' keys - what was sealed for them can never be read again - and
    remember them as erased; what rooms keep of them elsewhere goes too (on_erasure).
    Returns how many keys there were."""
    conn.execute(RECORD_ERASED, (tenant, list(subjects)))
    for forget in _forgetters:
        forget(conn, tenant, subjects)
    return conn.execute(DELETE_KEYS, (tenant, list(subjects))).rowcount


def shred_tenant(conn: psycopg.Connection, tenant: str) -> int:
    """Delete every subject key of a tenant (erasing the tenant), and what rooms keep of its people."""
    for forget in _forgetters:
        forget(conn, tenant, None)
    return conn.execute(DELETE_TENANT_KEYS, (tenant,)).rowcount


def open_each(conn: psycopg.Connection, items: Sequence[tuple[str, str, str | None]]) -> list[dict[str, Any] | None]:
    """open_many for (tenant, subject, sealed) triples of several tenants (an operator's rebuild)."""
    by_tenant: dict[str, list[int]] = {}
    for i, (tenant, _, _) in enumerate(items):
        by_tenant.setdefault(tenant, []).append(i)
    out: list[dict[str, Any] | None] = [None] * len(items)
    for tenant, where in by_tenant.items():
        opened = open_many(conn, tenant, [(items[i][1], items[i][2]) for i in where])
        for i, value in zip(where, opened):
            out[i] = value
    return out
