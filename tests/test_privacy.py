"""Erasure: after a campaign to an address and `mailflow contacts erase` of it, the address (in
any letter case) and what was known about the person are in no pg_dump line and no Redis
value; rebuilding every projection keeps them absent; the campaign's counts are unchanged;
a later import, campaign or transactional send to the address is refused. The same for a
whole tenant. And the pieces: subjects, sealing, migration 0011."""

from __future__ import annotations

import json
import uuid

import orjson
import pytest

from mailflow.infra import personal
from mailflow.infra.migrate import load_migrations, migrate
from mailflow.infra.services import connect
from mailflow.infra.vault import Keyring
from mailflow.testing.sink import SinkServer

from .conftest import _with_db, run_cli, wait_until
from .test_secrets import ok, pg_dump, redis_values

pytestmark = pytest.mark.process

ANN = "ann.quirke@example.net"
ATTRIBUTE = "Zebulon-Quaxley"  # a value only Ann's contact has: personal data goes with her


def campaign_counts(db_url: str) -> dict[str, int]:
    with connect(db_url) as c:
        return dict(c.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())


def leaks(text: str) -> list[str]:
    low = text.lower()
    return [s for s in (ANN.lower(), ATTRIBUTE.lower(), "tx-code-4471") if s in low]


def test_an_erased_address_is_nowhere_its_counts_stay_and_it_is_never_mailed_again(
    env, procs, rt, db_url, r, prefix, tmp_path
):
    people = ["email,name", f"{ANN.upper()},{ATTRIBUTE}"] + [f"p{i}@example.net,P{i}" for i in range(4)]
    (tmp_path / "people.csv").write_text("\n".join(people) + "\n")
    (tmp_path / "body.txt").write_text("Hello {{ name }} {{ code | default('-') }}")
    with SinkServer() as server:
        relay = f"smtp://127.0.0.1:{server.port}?tls=none&timeout=5"
        for args in (
            ("senders", "add", "news", "--from", "news@example.org", "--relay", relay),
            ("contacts", "import", str(tmp_path / "people.csv")),
            ("segments", "create", "all", "--filter", "{}"),
            ("templates", "create", "hello", "--subject", "Hi", "--text", str(tmp_path / "body.txt")),
            ("campaigns", "create", "spring", "--sender", "news", "--template", "hello", "--segment", "all"),
            ("campaigns", "start", "spring"),
            (
                "send",
                "--sender",
                "news",
                "--template",
                "hello",
                "--to",
                "Ann.Quirke@Example.net",
                "--vars",
                '{"code": "TX-CODE-4471", "name": "Ann"}',
            ),
        ):
            ok(run_cli(env, *args))
        workers = [procs.start(name) for name in ("relay", "queuer", "worker")]

        def finished() -> bool:
            return campaign_counts(db_url).get("completed", 0) == 6

        wait_until(finished, 60, what="6 messages accepted")
        assert sum(to.lower() == ANN for _, to in server.sink.envelopes) == 2
        before = campaign_counts(db_url)
        campaign_before = json.loads(ok(run_cli(env, "campaigns", "status", "spring", "--json")))
        assert leaks(pg_dump(db_url))  # before erasure the read models hold Ann: the check can see her

        refused = run_cli(env, "contacts", "erase", ANN)  # not on a terminal: needs --yes
        assert refused.returncode == 2 and "--yes" in refused.stderr
        erased = json.loads(ok(run_cli(env, "contacts", "erase", "ANN.Quirke@example.NET", "--yes", "--json")))
        assert erased == {"email": ANN, "contact": True, "jobs": 2, "cancelled": 0, "already": False}

        def published() -> bool:  # the relay has put ContactErased in Redis too
            return any(b"ContactErased" in v for v in redis_values(r, prefix))

        wait_until(published, 30, what="the relay to publish ContactErased")
        for p in workers:
            p.terminate()
            p.wait(30)

    def nowhere(when: str) -> None:
        dump = pg_dump(db_url)
        assert "p0@example.net" in dump and "ContactsImported" in dump  # the dump is the real thing
        assert leaks(dump) == [], f"{when}: in the pg_dump"
        values = b"\n".join(redis_values(r, prefix)).decode("utf-8", "replace")
        assert "ContactsImported" in values and "JobCreated" in values  # Redis holds the log's copy
        assert leaks(values) == [], f"{when}: in a Redis value"

    nowhere("after the erasure")
    with rt.connect() as c:  # shredded: what the log holds about her can never be opened again
        subject = rt.store.subject(c, ANN)
        sealed = [
            t
            for (t,) in c.execute(
                "SELECT data->>'sealed' FROM events WHERE data->>'subject' = %s AND data->>'sealed' IS NOT NULL",
                (subject,),
            )
        ]
        assert len(sealed) == 2 and personal.open_many(c, "default", [(subject, t) for t in sealed]) == [None, None]

    def tables() -> dict[str, list]:
        with connect(db_url) as c:
            return {
                t: c.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                for t in ("contacts", "jobs", "suppressions")
            }

    live = tables()
    for row in json.loads(ok(run_cli(env, "projections", "list", "--json"))):
        ok(run_cli(env, "projections", "rebuild", row["name"], "--json", timeout=120))
    nowhere("after rebuilding every projection")
    assert tables() == live  # a rebuild gives the same rows (the contact ids too) as the live writes
    assert campaign_counts(db_url) == before
    campaign_after = json.loads(ok(run_cli(env, "campaigns", "status", "spring", "--json")))
    assert campaign_after["jobs"] == campaign_before["jobs"]

    # Never mailed again: not by a send, not by an import (so not by a later campaign), and
    # the suppression cannot be lifted. Erasing again is not an error.
    send = run_cli(
        env, "send", "--sender", "news", "--template", "hello", "--to", ANN.upper(), "--vars", '{"name": "A"}'
    )
    assert send.returncode == 4 and len(send.stderr.strip().splitlines()) == 1 and "erased" in send.stderr
    again = json.loads(ok(run_cli(env, "contacts", "import", str(tmp_path / "people.csv"), "--json")))
    assert again["created"] == 0 and [x["reason"] for x in again["rejected"]] == [
        "erased on request: mailflow does not store this address again"
    ]
    lift = run_cli(env, "suppressions", "remove", ANN)
    assert lift.returncode == 4 and "erased" in lift.stderr
    listed = ok(run_cli(env, "suppressions", "list"))
    assert "(erased" in listed and ANN not in listed
    assert json.loads(ok(run_cli(env, "contacts", "erase", ANN, "--yes", "--json")))["already"] is True
    assert run_cli(env, "contacts", "show", ANN).returncode == 5
    [erasure] = json.loads(ok(run_cli(env, "events", "stream", f"contact-{ANN.upper()}", "--json")))
    assert erasure["type"] == "ContactErased" and erasure["data"] == {"subject": subject, "jobs": 2}
    nowhere("after the refused attempts")


def test_erasing_ends_unsent_jobs_and_a_tenant_can_be_erased_whole(env, db_url, r, prefix, tmp_path):
    (tmp_path / "people.csv").write_text("email,name\n" + "".join(f"t{i}@acme.example,Name{i}\n" for i in range(30)))
    (tmp_path / "body.txt").write_text("Hello {{ name }}")
    ok(run_cli(env, "tenants", "create", "acme"))
    acme = dict(env, MAILFLOW_TENANT="acme")
    relay = "smtp://mailer:hunter2-acme@127.0.0.1:9?tls=none"
    for args in (
        ("senders", "add", "news", "--from", "news@acme.example", "--relay", relay),
        ("contacts", "import", str(tmp_path / "people.csv")),
        ("segments", "create", "all", "--filter", "{}"),
        ("templates", "create", "hello", "--subject", "Hi", "--text", str(tmp_path / "body.txt")),
        ("campaigns", "create", "c1", "--sender", "news", "--template", "hello", "--segment", "all"),
        ("campaigns", "start", "c1"),  # no queuer runs: every job stays pending
    ):
        ok(run_cli(acme, *args))
    # One person first: their pending job ends as failed, the others wait.
    one = json.loads(ok(run_cli(acme, "contacts", "erase", "T3@acme.example", "--yes", "--json")))
    assert one["jobs"] == 1 and one["cancelled"] == 1
    assert campaign_counts(db_url) == {"pending": 29, "failed": 1}

    assert run_cli(env, "tenants", "erase", "acme", "--yes").returncode == 4  # suspend it first
    ok(run_cli(env, "tenants", "suspend", "acme"))
    res = json.loads(ok(run_cli(env, "tenants", "erase", "acme", "--yes", "--json")))
    assert res == {"tenant": "acme", "status": "erased", "people": 29}
    assert campaign_counts(db_url) == {"failed": 30}  # the counts add up; nothing is left to send
    dump = pg_dump(db_url)
    assert "news@acme.example" in dump  # the tenant's own settings stay
    found = [f"t{i}@acme.example" for i in range(30) if f"t{i}@acme.example" in dump.lower()]
    assert found == [] and "Name7" not in dump and "hunter2-acme" not in dump
    assert json.loads(ok(run_cli(env, "tenants", "show", "acme", "--json")))["status"] == "erased"
    assert run_cli(env, "tenants", "resume", "acme").returncode == 4
    assert run_cli(acme, "contacts", "import", str(tmp_path / "people.csv")).returncode == 4


# -- the pieces -----------------------------------------------------------------------------------


def test_a_subject_is_the_same_in_every_letter_case_and_differs_between_tenants():
    pepper = b"k" * 32
    assert personal.subject_of(pepper, "default", "Ann@Example.NET") == personal.subject_of(
        pepper, "default", "ann@example.net"
    )
    assert personal.subject_of(pepper, "default", "ann@example.net") != personal.subject_of(
        pepper, "acme", "ann@example.net"
    )
    assert personal.subject_of(pepper, "default", "ann@example.net") != personal.subject_of(
        b"j" * 32, "default", "ann@example.net"
    )


def test_a_sealed_value_opens_only_with_its_key_for_its_tenant_and_subject():
    key = b"\x01" * 32
    token = personal.seal(key, "default", "s1", {"email": "ann@example.net"})
    assert "ann" not in token
    assert personal.unseal(key, "default", "s1", token) == {"email": "ann@example.net"}
    assert personal.unseal(b"\x02" * 32, "default", "s1", token) is None
    assert personal.unseal(key, "default", "s2", token) is None  # moved to another subject: refused
    assert personal.unseal(key, "acme", "s1", token) is None


def test_migration_0011_computes_subjects_as_the_code_does():
    mig = next(m for m in load_migrations() if m.number == 11)
    scope: dict = {}
    exec(compile(mig.sql, mig.name, "exec"), scope)
    for tenant, email in (("default", "Ann@Example.net"), ("acme", "x+y@z.example")):
        assert scope["subject_of"](b"p" * 32, tenant, email) == personal.subject_of(b"p" * 32, tenant, email)


def test_migration_0011_takes_addresses_out_of_events_stored_before(pg_admin_url, tmp_path):
    name = f"mftest_mig_{uuid.uuid4().hex[:8]}"
    with connect(pg_admin_url) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(pg_admin_url, name)
    folder = tmp_path / "upto10"
    folder.mkdir()
    for m in load_migrations():
        if m.number <= 10:
            (folder / m.name).write_text(m.sql)
    job = str(uuid.uuid4())
    old = [
        (
            "default/contact-import-1",
            "ContactsImported",
            {"source": "a.csv", "contacts": [{"email": "ann@example.net", "attributes": {"name": "Ann Q"}, "line": 2}]},
        ),
        (
            "default/contact-ann@example.net",
            "ContactStatusChanged",
            {"email": "ann@example.net", "status": "bounced", "reason": "550 <Ann@Example.net> unknown"},
        ),
        (
            f"default/job-{job}",
            "JobCreated",
            {
                "job_id": job,
                "idempotency_key": "campaign:c1:ann@example.net",
                "priority": "normal",
                "email": "ann@example.net",
                "sender": "news",
                "template": "t",
                "variables": {"code": "code X1!"},
                "campaign_id": None,
            },
        ),
    ]
    try:
        with connect(url) as conn:
            migrate(conn, folder, keyring=Keyring.load(tmp_path / "home"))
            for stream, etype, data in old:
                conn.execute("INSERT INTO streams VALUES (%s, 1) ON CONFLICT DO NOTHING", (stream,))
                conn.execute(
                    "INSERT INTO events (id, stream, version, type, schema, data, metadata) VALUES "
                    '(gen_random_uuid(), %s, 1, %s, 1, %s, \'{"tenant": "default"}\')',
                    (stream, etype, orjson.dumps(data).decode()),
                )
            conn.execute(
                "INSERT INTO contacts (tenant, email, attributes, status) VALUES ('default', 'ann@example.net', "
                "'{\"name\": \"Ann Q\"}', 'bounced')"
            )
            conn.execute(
                "INSERT INTO jobs (id, tenant, idempotency_key, priority, email, domain, sender, template, due_at) "
                "VALUES (%s, 'default', 'campaign:c1:ann@example.net', 'normal', 'ann@example.net', 'example.net', "
                "'news', 't', now())",
                (job,),
            )
            with pytest.raises(Exception, match="run `mailflow migrate`"):
                migrate(conn)
            keyring = Keyring.load(tmp_path / "home")
            assert migrate(conn, keyring=keyring)[0] == "0011_personal_data_out_of_the_log.py"
            stored = " ".join(
                str(x) for row in conn.execute("SELECT stream, data::text FROM events").fetchall() for x in row
            )
            assert "ann@example.net" not in stored.lower() and "Ann Q" not in stored and "code X1!" not in stored
            subject = personal.People(keyring).subject(conn, "default", "ann@example.net")
            assert f"default/contact-{subject}" in stored and f"campaign:c1:{subject}" in stored
            assert "550 <recipient> unknown" in stored
            # What was sealed opens with the subject's key, so projections rebuild as before.
            sealed = conn.execute("SELECT data->>'sealed' FROM events WHERE type = 'JobCreated'").fetchone()[0]
            assert personal.open_many(conn, "default", [(subject, sealed)]) == [
                {"email": "ann@example.net", "variables": {"code": "code X1!"}}
            ]
            rows = conn.execute("SELECT subject FROM contacts UNION ALL SELECT subject FROM jobs").fetchall()
            assert rows == [(subject,), (subject,)]
            assert conn.execute("SELECT idempotency_key FROM jobs").fetchone()[0] == f"campaign:c1:{subject}"
            assert conn.execute("SELECT events FROM log_rewrites WHERE migration LIKE '0011%'").fetchone()[0] == 3
    finally:
        with connect(pg_admin_url) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
