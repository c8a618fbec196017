"""Configuration room, schema: apply the numbered .sql files in migrations/ once each.

Each file runs in its own transaction and is recorded in schema_migrations. An advisory
lock makes two processes migrating at once take turns, so running twice is harmless.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg

from mailflow.errors import MailflowError
from mailflow.infra.locks import Lock

_MIGRATION_LOCK = Lock.MIGRATIONS
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.(sql|py)$")


@dataclass(frozen=True)
class Migration:
    """A .sql file (run as one script), or a .py file whose apply(conn, keyring) moves data
    that SQL cannot (encrypting secrets); either runs in one transaction."""

    number: int
    name: str
    sql: str

    def run(self, conn: psycopg.Connection, keyring: Any) -> None:
        if self.name.endswith(".sql"):
            conn.execute(self.sql.encode())
            return
        namespace: dict[str, Any] = {"__name__": f"mailflow_migration_{self.number:04d}"}
        exec(compile(self.sql, self.name, "exec"), namespace)
        namespace["apply"](conn, keyring)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """Installed wheels carry mailflow/migrations; a source checkout has migrations/ at the top."""
    packaged = resources.files("mailflow").joinpath("migrations")
    if packaged.is_dir():
        return Path(str(packaged))
    source = Path(__file__).resolve().parents[3] / "migrations"
    if source.is_dir():
        return source
    raise MailflowError("cannot find the migrations folder (reinstall mailflow)")


def load_migrations(folder: Path | None = None) -> list[Migration]:
    folder = folder or migrations_dir()
    found = []
    for path in sorted(folder.iterdir()):
        m = _NAME.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), path.name, path.read_text()))
    numbers = [m.number for m in found]
    if len(set(numbers)) != len(numbers):
        raise MailflowError(f"two migrations share a number in {folder}")
    return found


def applied(conn: psycopg.Connection) -> dict[str, str]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    return dict(conn.execute("SELECT name, checksum FROM schema_migrations").fetchall())


def migrate(conn: psycopg.Connection, folder: Path | None = None, *, keyring: Any = None) -> list[str]:
    """Apply pending migrations; return the names applied now (empty when up to date).

    `keyring` (infra.vault.Keyring) is for migrations that encrypt: without one, such a
    migration stops with a ConfigurationError if it has anything to encrypt."""
    todo = load_migrations(folder)
    done_now: list[str] = []
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   name text PRIMARY KEY,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        already = applied(conn)
        for mig in todo:
            if mig.name in already:
                if already[mig.name] != mig.checksum:
                    raise MailflowError(
                        f"migration {mig.name} changed after it was applied; add a new migration instead"
                    )
                continue
            with conn.transaction():
                mig.run(conn, keyring)
                conn.execute(
                    "INSERT INTO schema_migrations (name, checksum) VALUES (%s, %s)",
                    (mig.name, mig.checksum),
                )
            done_now.append(mig.name)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return done_now


def pending(conn: psycopg.Connection) -> list[str]:
    done = applied(conn)
    return [m.name for m in load_migrations() if m.name not in done]
