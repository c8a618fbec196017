"""The catalogue's lifecycle (issue #8): reactivating contacts, CSV dialects, deleting
segments, templates and senders, DKIM records, service URLs, template files from stdin."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess

import dkim
import pytest

from mailflow.config import load_settings
from mailflow.errors import ConfigurationError, ConflictError, NotFoundError, UserError
from mailflow.infra.services import connect
from mailflow.outbound import campaigns, contacts, mime, segments, senders, sending, suppressions, templates
from mailflow.outbound.contacts import import_csv_text, parse_csv
from mailflow.outbound.senders import Sender
from mailflow.outbound.templates import Rendered
from mailflow.testing.sink import Sink, SinkServer

from .conftest import mailflow_cmd, run_cli
from .test_cli import one_line_error
from .test_outbound_pipeline import run_pipeline, setup_catalog, states

pytestmark = pytest.mark.process

pytestmark = pytest.mark.process


def job_state(db_url: str, job_id: str) -> tuple[str, str | None]:
    with connect(db_url) as c:
        return c.execute("SELECT state, last_reply FROM jobs WHERE id = %s", (job_id,)).fetchone()


# -- 1. reactivating a contact ------------------------------------------------------------------


def test_a_bounced_contact_stays_blocked_after_unsuppressing_and_is_sent_to_once_reactivated(rt, settings, db_url):
    settings = settings.model_copy(update={"queuer_interval_s": 0.02})
    sink = Sink()
    with SinkServer(sink) as server:
        setup_catalog(rt.store, server.url)
        import_csv_text(rt.store, "email,name\nbob@example.net,Bob\n")
        # What a 5.1.1 reply records: a suppression and a bounced contact.
        suppressions.add(rt.store, "bob@example.net", reason="bounce", detail="550 5.1.1", contact_status="bounced")

        removed = suppressions.remove(rt.store, "bob@example.net")
        assert removed.contact_status == "bounced"  # the command tells the user it is still blocked
        first, _ = sending.send_transactional(
            rt.store, sender="tx", template="reset", to="bob@example.net", variables={"name": "Bob", "code": 1}
        )
        run_pipeline(rt, settings, lambda: states(db_url).get("bob@example.net") in ("completed", "failed"))
        assert job_state(db_url, first) == ("failed", "contact is bounced")

        suppressions.add(rt.store, "bob@example.net", reason="bounce", contact_status="bounced")
        contacts.reactivate(rt.store, "Bob@Example.net", reason="mailbox fixed, ticket 42", actor="alice")
        second, _ = sending.send_transactional(
            rt.store, sender="tx", template="reset", to="bob@example.net", variables={"name": "Bob", "code": 2}
        )
        run_pipeline(rt, settings, lambda: job_state(db_url, second)[0] in ("completed", "failed"))
    assert job_state(db_url, second)[0] == "completed"
    assert sink.delivered_to() == {"bob@example.net": 1}
    with connect(db_url) as c:
        assert c.execute("SELECT status FROM contacts WHERE email = 'bob@example.net'").fetchone()[0] == "active"
        assert c.execute("SELECT count(*) FROM suppressions").fetchone()[0] == 0
        data, metadata = c.execute("SELECT data, metadata FROM events WHERE type = 'ContactReactivated'").fetchone()
    assert data["reason"] == "mailbox fixed, ticket 42" and data["previous_status"] == "bounced"
    assert data["suppression"] == "bounce" and metadata["actor"] == "alice"


def test_reactivating_an_active_unsuppressed_contact_or_an_unknown_one_is_refused(store):
    import_csv_text(store, "email\nann@example.org\n")
    with pytest.raises(ConflictError, match="already active"):
        contacts.reactivate(store, "ann@example.org", reason="why not", actor="alice")
    with pytest.raises(NotFoundError, match="no contact"):
        contacts.reactivate(store, "nobody@example.org", reason="x", actor="alice")
    with pytest.raises(UserError, match="reason"):
        contacts.reactivate(store, "ann@example.org", reason="  ", actor="alice")


def test_contacts_show_update_and_reactivate_from_the_command_line(env, store, tmp_path):
    (tmp_path / "c.csv").write_text("email,plan\ncy@example.org,free\n")
    assert run_cli(env, "contacts", "import", str(tmp_path / "c.csv")).returncode == 0
    res = run_cli(
        env,
        "contacts",
        "update",
        "cy@example.org",
        "--attr",
        "plan=pro",
        "--attr",
        "age=40",
        "--attrs",
        '{"vip": true}',
        "--json",
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["attributes"] == {"plan": "pro", "age": 40, "vip": True}
    assert run_cli(env, "suppressions", "add", "cy@example.org", "--reason", "complaint").returncode == 0
    shown = json.loads(run_cli(env, "contacts", "show", "cy@example.org", "--json").stdout)
    assert shown["status"] == "active" and shown["suppression"]["reason"] == "complaint"
    assert shown["jobs"] == {}

    # A bounced contact: removing the suppression alone says it is still blocked.
    res = run_cli(env, "contacts", "reactivate", "cy@example.org", "--reason", "asked us by phone")
    assert res.returncode == 0 and "suppression (complaint) lifted" in res.stdout
    suppressions.add(store, "cy@example.org", reason="bounce", contact_status="bounced")  # as a 5.1.1 reply does
    res = run_cli(env, "suppressions", "remove", "cy@example.org")
    assert res.returncode == 0 and "still bounced" in res.stdout and "contacts reactivate" in res.stdout
    res = run_cli(env, "contacts", "reactivate", "cy@example.org")
    assert res.returncode == 2 and "--reason" in one_line_error(res)
    res = run_cli(
        dict(env, MAILFLOW_ACTOR="ops-bob"),
        "contacts",
        "reactivate",
        "cy@example.org",
        "--reason",
        "new mailbox",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {
        "email": "cy@example.org",
        "status": "active",
        "previous_status": "bounced",
        "suppression_lifted": None,
        "actor": "ops-bob",
    }
    shown = run_cli(env, "contacts", "show", "cy@example.org")
    assert "active" in shown.stdout and "pro" in shown.stdout
    missing = run_cli(env, "contacts", "show", "nobody@example.org")
    assert missing.returncode == 5 and "no contact" in one_line_error(missing)
    bad = run_cli(env, "contacts", "update", "cy@example.org", "--attr", "novalue")
    assert bad.returncode == 2 and "k=v" in one_line_error(bad)


# -- 2. CSV dialects ----------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [";", "\t", "|", ","])
def test_semicolon_tab_and_pipe_separated_files_import_like_comma_separated_ones(delimiter):
    text = delimiter.join(["email", "name", "city"]) + "\n"
    text += delimiter.join(["ann@example.org", "Ann", '"Den Haag"']) + "\n"
    text += delimiter.join(["bo@example.org", "Bo", "Gent"]) + "\n"
    rows = list(parse_csv(io.StringIO(text)))
    assert [(r.email, r.attributes) for r in rows] == [
        ("ann@example.org", {"name": "Ann", "city": "Den Haag"}),
        ("bo@example.org", {"name": "Bo", "city": "Gent"}),
    ]


def test_a_comma_file_with_semicolons_in_its_values_stays_comma_separated():
    text = "email,note\nann@example.org,a; b; c\nbo@example.org,d;e\n" + "".join(
        f"u{i}@example.org,x\n" for i in range(200)
    )  # longer than the sniffed sample
    rows = list(parse_csv(io.StringIO(text)))
    assert rows[0].attributes == {"note": "a; b; c"} and rows[1].attributes == {"note": "d;e"}
    assert len(rows) == 202 and rows[-1].line == 203


def test_a_semicolon_file_is_imported_from_the_command_line(env, tmp_path):
    (tmp_path / "excel.csv").write_text(
        "\ufeffemail;first_name;country\r\nann@example.org;Ann;NL\r\n", encoding="utf-8"
    )
    res = run_cli(env, "contacts", "import", str(tmp_path / "excel.csv"), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["created"] == 1
    shown = json.loads(run_cli(env, "contacts", "show", "ann@example.org", "--json").stdout)
    assert shown["attributes"] == {"first_name": "Ann", "country": "NL"}


# -- 3. deleting segments, templates and senders; DKIM records -------------------------------------


def _catalogue(store) -> None:
    sending.save_sender(store, Sender("news", "news@example.org", "News", "smtp://127.0.0.1:2525?tls=none"))
    templates.save(store, templates.Template("spring", "Spring", "<p>hi</p>"))
    segments.define(store, "all", {})
    import_csv_text(store, "email\nann@example.org\n")


def _catalogue_names(db_url: str) -> dict[str, list[str]]:
    with connect(db_url) as c:
        return {
            t: [n for (n,) in c.execute(f"SELECT name FROM {t} ORDER BY name")]
            for t in ("segments", "templates", "senders")
        }


def test_what_an_unfinished_campaign_uses_cannot_be_deleted_and_the_error_names_it(store, db_url):
    _catalogue(store)
    cid = campaigns.create(store, name="spring-2026", sender="news", template="spring", segment="all")
    for delete, name in ((segments.delete, "all"), (templates.delete, "spring"), (sending.delete_sender, "news")):
        with pytest.raises(ConflictError, match="campaign 'spring-2026'"):
            delete(store, name)
    assert _catalogue_names(db_url) == {"segments": ["all"], "templates": ["spring"], "senders": ["news"]}
    campaigns.cancel(store, cid)
    segments.delete(store, "all")
    templates.delete(store, "spring")
    sending.delete_sender(store, "news")
    assert _catalogue_names(db_url) == {"segments": [], "templates": [], "senders": []}
    with pytest.raises(NotFoundError, match="no template named 'spring'"):
        templates.delete(store, "spring")


def test_deletes_updates_and_reactivations_replay_to_the_same_tables(store, db_url, env):
    _catalogue(store)
    templates.save(store, templates.Template("autumn", "Autumn", "<p>hi</p>"))
    segments.delete(store, "all")
    templates.delete(store, "spring")
    sending.delete_sender(store, "news")
    segments.define(store, "all", {"status": "active"})
    contacts.update(store, "ann@example.org", {"plan": "pro", "age": 3}, actor="alice")
    contacts.update(store, "ann@example.org", {"age": None}, actor="alice")
    suppressions.add(store, "ann@example.org", reason="bounce", contact_status="bounced")
    contacts.reactivate(store, "ann@example.org", reason="fixed", actor="alice")
    assert _catalogue_names(db_url) == {"segments": ["all"], "templates": ["autumn"], "senders": []}

    def rows():  # every column, the event timestamps included
        with connect(db_url) as c:
            return {
                t: c.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("contacts", "suppressions", "segments", "templates", "senders")
            }

    before = rows()
    assert [(r[1], r[2], r[3]) for r in before["contacts"]] == [("ann@example.org", {"plan": "pro"}, "active")]
    assert before["suppressions"] == []
    res = run_cli(env, "projections", "rebuild", "catalog", "--json")
    assert res.returncode == 0, res.stderr
    assert rows() == before
    with connect(db_url) as c:
        assert segments.load(c, "all") == {"status": "active"}


def _dkim_key() -> str:
    return subprocess.run(["openssl", "genrsa", "2048"], capture_output=True, check=True).stdout.decode()


def test_the_published_dkim_record_verifies_the_senders_signatures(rt, store):
    pem = _dkim_key()
    relay = "smtp://127.0.0.1:2525?tls=none"
    sending.save_sender(store, Sender("signed", "news@example.org", "", relay, "mf1", pem), rt.vault)
    with store.pool.connection() as conn:
        published = senders.dkim_record(sending.load_sender(conn, "signed"))  # from the kept public key
        s = sending.load_sender(conn, "signed", vault=rt.vault)  # the private key, as a worker reads it
    rec = senders.dkim_record(s)
    assert published == rec
    assert rec.name == "mf1._domainkey.example.org" and rec.value.startswith("v=DKIM1; k=rsa; p=")
    assert rec.zone_line() == f'mf1._domainkey.example.org TXT "{rec.value}"'
    out = mime.build(job_id="j1", sender=s, to="a@example.net", rendered=Rendered("S", "<p>x</p>", "x"), secret=b"k")
    assert dkim.verify(
        out.data, dnsfunc=lambda name, timeout=5: rec.value.encode() if name == b"mf1._domainkey.example.org." else None
    )
    # The same key as openssl derives.
    der = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"], input=pem.encode(), capture_output=True, check=True
    ).stdout
    assert rec.value.endswith("p=" + base64.b64encode(der).decode())


def test_senders_dkim_record_and_deletes_from_the_command_line(env, tmp_path):
    key = tmp_path / "dkim.pem"
    key.write_text(_dkim_key())
    assert (
        run_cli(
            env,
            "senders",
            "add",
            "signed",
            "--from",
            "news@example.org",
            "--relay",
            "smtp://127.0.0.1:2525?tls=none",
            "--dkim-selector",
            "mf1",
            "--dkim-key",
            str(key),
        ).returncode
        == 0
    )
    assert (
        run_cli(
            env, "senders", "add", "plain", "--from", "news@example.org", "--relay", "smtp://127.0.0.1:2525?tls=none"
        ).returncode
        == 0
    )
    res = run_cli(env, "senders", "dkim-record", "signed")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith('mf1._domainkey.example.org TXT "v=DKIM1; k=rsa; p=MII')
    as_json = json.loads(run_cli(env, "senders", "dkim-record", "signed", "--json").stdout)
    assert as_json["name"] == "mf1._domainkey.example.org" and as_json["type"] == "TXT"
    assert "PRIVATE" not in res.stdout + json.dumps(as_json)
    res = run_cli(env, "senders", "dkim-record", "plain")
    assert res.returncode == 2 and "no DKIM key" in one_line_error(res)
    (tmp_path / "t.txt").write_text("hi")
    assert run_cli(env, "templates", "create", "t", "--subject", "S", "--text", str(tmp_path / "t.txt")).returncode == 0
    assert run_cli(env, "segments", "create", "all", "--filter", "{}").returncode == 0
    res = run_cli(env, "campaigns", "create", "c1", "--sender", "plain", "--template", "t", "--segment", "all")
    assert res.returncode == 0, res.stderr
    for noun, name in (("segments", "all"), ("templates", "t"), ("senders", "plain")):
        res = run_cli(env, noun, "delete", name)
        assert res.returncode == 4 and "campaign 'c1'" in one_line_error(res) and "draft" in res.stderr
    assert run_cli(env, "senders", "delete", "signed").returncode == 0
    res = run_cli(env, "senders", "delete", "signed")
    assert res.returncode == 5 and "no sender named 'signed'" in one_line_error(res)
    listed = json.loads(run_cli(env, "senders", "list", "--json").stdout)
    assert [s["name"] for s in listed] == ["plain"]


# -- 4. service URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,why",
    [
        ("notaurl", "connection string"),
        ("mysql://root@db/app", "postgresql://"),
        ("postgresql://", "no host and no database"),
        ("postgres://", "no host and no database"),
        ("", "empty"),
    ],
)
def test_a_malformed_database_url_is_a_settings_error_naming_the_variable(url, why):
    with pytest.raises(ConfigurationError, match=why) as exc:
        load_settings(database_url=url)
    assert str(exc.value).startswith("bad setting MAILFLOW_DATABASE_URL: ")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://db.example.org",
        "postgresql:///mailflow",
        "postgres://u:p@h:5433/d?sslmode=require",
        "postgresql://%2Fvar%2Frun%2Fpostgresql/mailflow",
        "host=127.0.0.1 port=5432 user=postgres dbname=mf",
        "dbname=mailflow",
    ],
)
def test_database_urls_and_conninfo_strings_naming_a_host_or_a_database_are_accepted(url):
    assert load_settings(database_url=url).database_url == url


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "redis://h:port/0", "unix://", ""])
def test_a_redis_url_needs_a_redis_scheme(url):
    with pytest.raises(ConfigurationError, match="MAILFLOW_REDIS_URL"):
        load_settings(redis_url=url)
    assert load_settings(redis_url="rediss://:pw@h:6380/1").redis_url
    assert load_settings(redis_url="unix:///run/redis.sock?db=2").redis_url


def test_malformed_service_urls_stop_the_cli_with_exit_code_2_and_the_password_masked(env):
    for url in ("notaurl", "mysql://root:s3cret@db/app", "postgresql://"):
        res = run_cli(dict(env, MAILFLOW_DATABASE_URL=url), "events", "tail")
        assert res.returncode == 2, res.stderr
        line = one_line_error(res)
        assert "MAILFLOW_DATABASE_URL" in line and "s3cret" not in line
    res = run_cli(dict(env, MAILFLOW_REDIS_URL="http://:hunter2@localhost:6379"), "dlq", "list")
    assert res.returncode == 2 and "MAILFLOW_REDIS_URL" in one_line_error(res) and "hunter2" not in res.stderr


def test_services_resolve_checks_urls_that_bypassed_validation(settings):
    from mailflow.infra.services import resolve

    with pytest.raises(ConfigurationError, match="MAILFLOW_DATABASE_URL"):
        resolve(settings.model_copy(update={"database_url": "postgresql://"}), start_embedded=False)


# -- 5. template bodies from stdin and process substitution ---------------------------------------


def test_template_bodies_come_from_stdin_or_a_pipe_that_is_not_a_regular_file(env, db_url):
    res = subprocess.run(
        mailflow_cmd("templates", "create", "piped", "--subject", "S", "--text", "-"),
        env=env,
        input="Hello {{ name }} from stdin\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    r, w = os.pipe()
    os.write(w, b"<p>Hello {{ name }} from a pipe</p>")
    os.close(w)
    try:
        res = subprocess.run(
            mailflow_cmd("templates", "create", "fd", "--subject", "S", "--html", f"/dev/fd/{r}"),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            pass_fds=(r,),
        )
    finally:
        os.close(r)
    assert res.returncode == 0, res.stderr
    with connect(db_url) as c:
        bodies = dict(c.execute("SELECT name, html || text FROM templates").fetchall())
    assert bodies == {"piped": "Hello {{ name }} from stdin\n", "fd": "<p>Hello {{ name }} from a pipe</p>"}
    res = run_cli(env, "templates", "create", "x", "--subject", "S", "--text", "/nonexistent/body.txt")
    assert res.returncode == 2 and "no such file: /nonexistent/body.txt" in one_line_error(res)
    res = run_cli(env, "templates", "create", "x", "--subject", "S", "--text", "-", "--html", "-")
    assert res.returncode == 2 and "stdin" in one_line_error(res)
