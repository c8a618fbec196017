"""Infra room: secrets kept out of the log - encrypted at rest, referenced from events by id.

Relay passwords, DKIM private keys and every later secret (webhook signing secrets, API key
hashes, mailbox credentials) live only in the `secrets` table, encrypted with Fernet
(AES-128-CBC + HMAC-SHA256, from the `cryptography` package) under a key derived from the
master key. An event carries a `SecretRef`: the row's id and a fingerprint that tells two
secrets apart without revealing either.

The master key is a keyring, newest first: MAILFLOW_SECRET_KEY (comma-separated), or the
lines of MAILFLOW_SECRET_KEY_FILE, or of MAILFLOW_HOME/secret.key, created with mode 0600 on
first use. The newest key encrypts and signs links; every key decrypts and verifies, so
`mailflow secrets rotate-key` can re-encrypt row by row while processes keep running: a
process that meets a row under a key it does not have reads the key file again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets as pysecrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mailflow.errors import ConfigurationError, NotFoundError, UsageError

_FINGERPRINT_KEY = "fingerprint-key"

PUT = """
INSERT INTO secrets (id, tenant, kind, owner, ciphertext, key_id, fingerprint)
VALUES (%(id)s, %(tenant)s, %(kind)s, %(owner)s, %(ciphertext)s, %(key_id)s, %(fingerprint)s)
"""
GET = "SELECT ciphertext FROM secrets WHERE id = %s"
# Secrets of one owner (a sender) other than those still in use: replaced or deleted.
DROP_OTHERS = "DELETE FROM secrets WHERE tenant = %s AND owner = %s AND NOT (id = ANY(%s::uuid[]))"
LIST = """
SELECT id::text, kind, owner, key_id, fingerprint, created_at, rotated_at FROM secrets
ORDER BY owner, kind
"""
# Rows not yet under the current key, a batch at a time, for rotate().
STALE = "SELECT id, ciphertext FROM secrets WHERE key_id <> %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
REWRAP = "UPDATE secrets SET ciphertext = %s, key_id = %s, rotated_at = now() WHERE id = %s"
COUNT_STALE = "SELECT count(*) FROM secrets WHERE key_id <> %s"
GET_SETTING = "SELECT ciphertext FROM secret_settings WHERE name = %s"
PUT_SETTING = """
INSERT INTO secret_settings (name, ciphertext, key_id) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING
"""
STALE_SETTINGS = "SELECT name, ciphertext FROM secret_settings WHERE key_id <> %s FOR UPDATE"
REWRAP_SETTING = "UPDATE secret_settings SET ciphertext = %s, key_id = %s WHERE name = %s"


def _derive(key: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"mailflow/" + purpose).derive(key)


def key_id(key: bytes) -> str:
    """A short public name for a master key (which key encrypted a row)."""
    return _derive(key, b"key-id").hex()[:12]


@dataclass(frozen=True)
class SecretRef:
    """What an event carries instead of a secret."""

    id: str
    fingerprint: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "fingerprint": self.fingerprint}


class Keyring:
    """The master keys, newest first (see the module docstring for where they come from)."""

    def __init__(self, keys: list[bytes], path: Path | None = None) -> None:
        if not keys:
            raise ConfigurationError("the secret keyring is empty")
        self.keys = keys
        self.path = path
        self._lock = threading.Lock()
        self._fernet = MultiFernet([Fernet(base64.urlsafe_b64encode(_derive(k, b"secrets"))) for k in keys])

    @classmethod
    def load(cls, home: Path, configured: str | None = None, file: Path | None = None) -> Keyring:
        if configured:
            return cls([k.strip().encode() for k in configured.split(",") if k.strip()])
        path = file.expanduser() if file is not None else home.expanduser() / "secret.key"
        if file is None and not path.exists():
            _create_key_file(path)
        return cls(_read_key_file(path), path)

    @property
    def current_id(self) -> str:
        return key_id(self.keys[0])

    @property
    def signing_key(self) -> bytes:
        """The key that signs new VERP and unsubscribe tokens."""
        return self.keys[0]

    @property
    def verifying_keys(self) -> list[bytes]:
        """Every key: a link signed before a rotation still works."""
        return list(self.keys)

    def encrypt(self, plaintext: bytes) -> bytes:
        return self._fernet.encrypt(plaintext)

    def decrypt(self, token: bytes) -> bytes:
        try:
            return self._fernet.decrypt(token)
        except InvalidToken:
            if not self.reload():
                raise
            return self._fernet.decrypt(token)

    def rewrap(self, token: bytes) -> bytes:
        return self._fernet.rotate(token)

    def reload(self) -> bool:
        """Read the key file again (a rotation added a key); True if the keys changed."""
        if self.path is None or not self.path.exists():
            return False
        with self._lock:
            keys = _read_key_file(self.path)
            if keys == self.keys:
                return False
            fresh = Keyring(keys, self.path)
            self.keys, self._fernet = fresh.keys, fresh._fernet
            return True

    def add_key(self) -> str:
        """Put a new random key first in the key file (rotate-key --generate); returns its id."""
        if self.path is None:
            raise UsageError(
                "the keyring comes from MAILFLOW_SECRET_KEY: put a new key first in it "
                "(MAILFLOW_SECRET_KEY=new,old) on every process, then run rotate-key without --generate"
            )
        new = pysecrets.token_urlsafe(32).encode()
        _write_key_file(self.path, [new, *self.keys])
        self.reload()
        return key_id(new)

    def retire_old_keys(self) -> int:
        """Keep only the newest key in the key file; returns how many were dropped."""
        if self.path is None:
            raise UsageError("the keyring comes from MAILFLOW_SECRET_KEY: drop the old keys from it yourself")
        dropped = len(self.keys) - 1
        _write_key_file(self.path, self.keys[:1])
        self.reload()
        return dropped


def _read_key_file(path: Path) -> list[bytes]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the secret key file {path}: {exc.strerror}") from exc
    keys = [line.strip().encode() for line in lines if line.strip() and not line.startswith("#")]
    if not keys:
        raise ConfigurationError(f"the secret key file {path} holds no key")
    return keys


def _create_key_file(path: Path) -> None:
    """Two processes starting at once must end up with the same key: write a private
    temporary file, then link it into place only if no key exists yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pysecrets.token_urlsafe(32) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _write_key_file(path: Path, keys: list[bytes]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(k.decode() + "\n" for k in keys))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Vault:
    """Put, read, replace and re-encrypt secrets, on the caller's connection (and transaction)."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._fingerprint_key: bytes | None = None

    def put(self, conn: psycopg.Connection, *, tenant: str, kind: str, owner: str, plaintext: str) -> SecretRef:
        ref = SecretRef(str(uuid.uuid4()), self.fingerprint(conn, plaintext))
        conn.execute(
            PUT,
            {
                "id": ref.id,
                "tenant": tenant,
                "kind": kind,
                "owner": owner,
                "ciphertext": self.keyring.encrypt(plaintext.encode()),
                "key_id": self.keyring.current_id,
                "fingerprint": ref.fingerprint,
            },
        )
        return ref

    def get(self, conn: psycopg.Connection, secret_id: str) -> str:
        row = conn.execute(GET, (secret_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"secret {secret_id} is missing from the secrets table")
        try:
            return self.keyring.decrypt(bytes(row[0])).decode()
        except InvalidToken as exc:
            raise ConfigurationError(
                f"secret {secret_id} is encrypted under a key this process does not have "
                "(MAILFLOW_SECRET_KEY / MAILFLOW_SECRET_KEY_FILE)"
            ) from exc

    def keep_only(self, conn: psycopg.Connection, tenant: str, owner: str, ids: list[str]) -> None:
        """Delete the owner's other secrets (a replaced password leaves nothing behind)."""
        conn.execute(DROP_OTHERS, (tenant, owner, ids))

    def fingerprint(self, conn: psycopg.Connection, plaintext: str) -> str:
        """HMAC-SHA256 under a random key kept (encrypted) in the database: equal secrets
        have equal fingerprints, and the log alone cannot be used to guess a password."""
        if self._fingerprint_key is None:
            self._fingerprint_key = self.setting(conn, _FINGERPRINT_KEY)
        return "hmac-sha256:" + hmac.new(self._fingerprint_key, plaintext.encode(), hashlib.sha256).hexdigest()[:24]

    def setting(
        self, conn: psycopg.Connection, name: str, make: Callable[[], bytes] = lambda: pysecrets.token_bytes(32)
    ) -> bytes:
        """An installation-wide secret (created at random on first use), decrypted."""
        row = conn.execute(GET_SETTING, (name,)).fetchone()
        if row is None:
            conn.execute(PUT_SETTING, (name, self.keyring.encrypt(make()), self.keyring.current_id))
            row = conn.execute(GET_SETTING, (name,)).fetchone()
        assert row is not None
        try:
            return self.keyring.decrypt(bytes(row[0]))
        except InvalidToken as exc:
            raise ConfigurationError(
                f"the installation's {name} is encrypted under a master key this process does not have: give "
                "every process the same MAILFLOW_SECRET_KEY / MAILFLOW_SECRET_KEY_FILE"
            ) from exc

    def listing(self, conn: psycopg.Connection) -> list[dict[str, object]]:
        cols = ("id", "kind", "owner", "key_id", "fingerprint", "created_at", "rotated_at")
        return [dict(zip(cols, r)) for r in conn.execute(LIST).fetchall()]

    def stale(self, conn: psycopg.Connection) -> int:
        return int(conn.execute(COUNT_STALE, (self.keyring.current_id,)).fetchone()[0])  # type: ignore[index]

    def rotate(self, connect: Callable[[], psycopg.Connection], progress: Callable[[int], None] | None = None) -> int:
        """Re-encrypt every row under the newest key, a batch per transaction; returns how many."""
        done = 0
        current = self.keyring.current_id
        with connect() as conn:
            with conn.transaction():
                for name, token in conn.execute(STALE_SETTINGS, (current,)).fetchall():
                    conn.execute(REWRAP_SETTING, (self.keyring.rewrap(bytes(token)), current, name))
            while True:
                with conn.transaction():
                    rows = conn.execute(STALE, (current, 500)).fetchall()
                    for sid, token in rows:
                        conn.execute(REWRAP, (self.keyring.rewrap(bytes(token)), current, sid))
                if not rows:
                    return done
                done += len(rows)
                if progress is not None:
                    progress(done)


def dkim_fingerprint(public_der: bytes) -> str:
    """A DKIM key's public fingerprint: the SHA-256 of its SubjectPublicKeyInfo."""
    return "sha256:" + hashlib.sha256(public_der).hexdigest()[:24]
