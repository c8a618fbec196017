"""Migrations: numbered files applied once, safe twice and from two processes at once."""

from __future__ import annotations

import threading
import uuid

import pytest

from mailflow.infra.migrate import load_migrations, migrate
from mailflow.infra.services import connect

pytestmark = pytest.mark.integration


def _fresh_db(pg_admin_url: str, prefix: str) -> tuple[str, str]:
    """A new empty database, named uniquely: other pytest sessions may share the server."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with connect(pg_admin_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    return name, psycopg.conninfo.make_conninfo(pg_admin_url, dbname=name)


def test_migrate_applies_every_file_once_and_is_a_no_op_the_second_time(pg_admin_url):
    name, url = _fresh_db(pg_admin_url, "mftest_migrate_twice")
    try:
        with connect(url) as conn:
            first = migrate(conn)
            second = migrate(conn)
            recorded = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
        assert first == [m.name for m in load_migrations()]
        assert second == []
        assert recorded == first
    finally:
        with connect(pg_admin_url) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_two_processes_migrating_at_once_apply_each_file_exactly_once(pg_admin_url):
    name, url = _fresh_db(pg_admin_url, "mftest_migrate_race")
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run():
        try:
            with connect(url) as conn:
                barrier.wait()
                results.append(migrate(conn))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    try:
        ts = [threading.Thread(target=run) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors
        applied = sorted(n for r in results for n in r)
        assert applied == sorted(m.name for m in load_migrations())
    finally:
        with connect(pg_admin_url) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
