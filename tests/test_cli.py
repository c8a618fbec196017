"""The `mailflow` CLI as a user runs it: human output, --json, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from mailflow.events import NewEvent
from mailflow.infra.services import connect

from .conftest import mailflow_cmd, run_cli, wait_until

pytestmark = pytest.mark.process


def one_line_error(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {res.stderr!r}"
    assert "Traceback" not in res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_append_then_show_stream_and_tail_round_trip_as_json(env, store):
    res = run_cli(env, "events", "append", "order-9", "OrderPlaced", "--data", '{"total": 42}', "--json")
    assert res.returncode == 0, res.stderr
    appended = json.loads(res.stdout)
    # The position is pending while any transaction on the server (another test's) is older.
    assert appended["position"] in (1, None) and appended["version"] == 1 and appended["data"] == {"total": 42}
    store.sync()
    shown = json.loads(run_cli(env, "events", "show", "1", "--json").stdout)
    assert shown == {**appended, "position": 1}
    run_cli(env, "events", "append", "order-9", "OrderShipped", "--data", "{}", "--expected-version", "1")
    store.sync()
    stream = json.loads(run_cli(env, "events", "stream", "order-9", "--json").stdout)
    assert [e["type"] for e in stream] == ["OrderPlaced", "OrderShipped"]
    tail = run_cli(env, "events", "tail", "--from", "1", "--json")
    assert [json.loads(line)["position"] for line in tail.stdout.splitlines()] == [1, 2]
    only = run_cli(env, "events", "tail", "--from", "1", "--type", "OrderShipped", "--json")
    assert [json.loads(line)["type"] for line in only.stdout.splitlines()] == ["OrderShipped"]
    human = run_cli(env, "events", "tail")
    assert "order-9@2" in human.stdout and "OrderShipped" in human.stdout


def test_a_stale_expected_version_is_one_line_and_exit_code_4(env):
    run_cli(env, "events", "append", "acct", "Opened", "--data", "{}")
    res = run_cli(env, "events", "append", "acct", "Opened", "--data", "{}", "--expected-version", "0")
    assert res.returncode == 4
    line = one_line_error(res)
    assert "'default/acct'" in line and "expected version 0" in line and "nothing was written" in line


def test_bad_json_data_is_one_line_and_nothing_is_written(env, db_url):
    res = run_cli(env, "events", "append", "x", "T", "--data", "{not json")
    assert res.returncode != 0
    assert "--data is not valid JSON" in one_line_error(res)
    res = run_cli(env, "events", "append", "x", "T", "--data", "[1, 2]")
    assert "must be a JSON object" in one_line_error(res)
    with connect(db_url) as c:
        assert c.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_unreachable_database_names_the_url_with_the_password_masked(env):
    bad = dict(env, MAILFLOW_DATABASE_URL="postgresql://bob:s3cret@127.0.0.1:1/nowhere")
    res = run_cli(bad, "events", "tail")
    assert res.returncode == 3
    line = one_line_error(res)
    assert "postgresql://bob:***@127.0.0.1:1/nowhere" in line and "s3cret" not in res.stderr


def test_unreachable_redis_names_the_url_with_the_password_masked(env):
    bad = dict(env, MAILFLOW_REDIS_URL="redis://:hunter2@127.0.0.1:1/0")
    res = run_cli(bad, "dlq", "list")
    assert res.returncode == 3
    line = one_line_error(res)
    assert "redis://:***@127.0.0.1:1/0" in line and "hunter2" not in res.stderr


def test_a_malformed_database_url_is_one_clear_line(env):
    res = run_cli(dict(env, MAILFLOW_DATABASE_URL="postgresql://[::1"), "events", "tail")
    assert res.returncode != 0
    assert "PostgreSQL" in one_line_error(res)


def test_an_unmigrated_configured_database_asks_for_migrate_then_migrate_is_idempotent(env, pg_admin_url):
    name = f"mftest_empty_{uuid.uuid4().hex[:8]}"
    with connect(pg_admin_url) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        e = dict(env, MAILFLOW_DATABASE_URL=psycopg.conninfo.make_conninfo(pg_admin_url, dbname=name))
        res = run_cli(e, "events", "tail")
        assert res.returncode != 0 and "mailflow migrate" in one_line_error(res)
        first = run_cli(e, "migrate", "--json")
        assert first.returncode == 0 and len(json.loads(first.stdout)["applied"]) >= 3
        second = run_cli(e, "migrate")
        assert second.returncode == 0 and "up to date" in second.stdout
        assert run_cli(e, "events", "tail").returncode == 0
    finally:
        with connect(pg_admin_url) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_unknown_projection_and_missing_event_are_one_line_errors(env):
    res = run_cli(env, "projections", "rebuild", "nope")
    assert "unknown projection 'nope'" in one_line_error(res)
    res = run_cli(env, "events", "show", "99")
    assert res.returncode == 5 and "no event at position 99" in one_line_error(res)


def test_rebuild_then_stats_and_projection_lag(env, store):
    for i in range(5):
        run_cli(env, "events", "append", f"c-{i}", "Clicked" if i % 2 else "Opened", "--data", "{}")
    store.sync()  # another test's open transaction on the server may still hold positions back
    before = json.loads(run_cli(env, "projections", "list", "--json").stdout)
    ec = next(p for p in before if p["name"] == "event_counts")
    assert (ec["checkpoint"], ec["head"], ec["lag"]) == (0, 5, 5)
    rebuilt = run_cli(env, "projections", "rebuild", "event_counts", "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout)["applied"] == 5
    stats = json.loads(run_cli(env, "events", "stats", "--json").stdout)
    assert {r["type"]: r["total"] for r in stats["rows"]} == {"Opened": 3, "Clicked": 2}
    assert stats["lag"] == 0
    human = run_cli(env, "projections", "rebuild", "event_counts")
    assert human.returncode == 0 and "rebuilt event_counts: 5 event(s) applied" in human.stdout


def test_embedded_default_starts_shared_services_and_stops_them(tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MAILFLOW_")}
    e["MAILFLOW_HOME"] = str(tmp_path / "home")
    try:
        res = run_cli(e, "events", "append", "hello", "Greeted", "--data", '{"who": "world"}', timeout=180)
        assert res.returncode == 0, res.stderr
        status = {s["name"]: s for s in json.loads(run_cli(e, "services", "status", "--json").stdout)}
        assert status["postgres"]["running"] and status["redis"]["running"]
        assert status["postgres"]["mode"] == "embedded"
        # A second process shares the same servers and sees the event.
        again = json.loads(run_cli(e, "events", "show", "1", "--json").stdout)
        assert again["data"] == {"who": "world"}
    finally:
        stopped = json.loads(run_cli(e, "services", "stop", "--json").stdout)
    assert all(not s["running"] for s in stopped)


def test_tail_follow_prints_new_events_as_they_commit_and_stops_on_sigterm(env, store):
    store.append("before", [NewEvent("Old", {})])
    p = subprocess.Popen(
        mailflow_cmd("events", "tail", "--follow", "--json", "--type", "New"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: [lines.append(json.loads(x)) for x in p.stdout], daemon=True)
    reader.start()
    try:
        time.sleep(1.0)  # let it start and print the (filtered-out) backlog
        for i in range(3):
            store.append(f"live-{i}", [NewEvent("New", {"i": i}), NewEvent("Other", {})])
        wait_until(lambda: len(lines) == 3, timeout=15, what="three followed events")
        assert [e["data"]["i"] for e in lines] == [0, 1, 2]
        assert [e["position"] for e in lines] == [2, 4, 6]
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0


def test_usage_errors_and_bad_settings_are_one_line_with_exit_code_2(env):
    res = run_cli(env, "events", "append")
    assert res.returncode == 2 and "Missing argument" in one_line_error(res)
    res = run_cli(env, "events", "tail", "--from", "0")
    assert res.returncode == 2 and "--from" in one_line_error(res)
    res = run_cli(dict(env, MAILFLOW_CONSUMER_BATCH_SIZE="lots"), "events", "tail")
    assert res.returncode == 2 and "MAILFLOW_CONSUMER_BATCH_SIZE" in one_line_error(res)


def test_contacts_segments_and_templates_from_the_command_line(env, tmp_path):
    csv_file = tmp_path / "people.csv"
    csv_file.write_text("email,first_name,country\nann@example.org,Ann,NL\nnope,X,NL\nbo@example.org,Bo,BE\n")
    rep = json.loads(run_cli(env, "contacts", "import", str(csv_file), "--json").stdout)
    assert (rep["imported"], rep["created"]) == (2, 2)
    assert [(r["line"], r["value"]) for r in rep["rejected"]] == [(3, "nope")]
    seg = run_cli(env, "segments", "create", "dutch", "--filter", '{"attributes.country": "NL"}', "--json")
    assert json.loads(seg.stdout)["count"] == 1
    pv = json.loads(run_cli(env, "segments", "preview", "dutch", "--json").stdout)
    assert [c["email"] for c in pv["contacts"]] == ["ann@example.org"]
    bad = run_cli(env, "segments", "create", "x", "--filter", '{"attributes.country": {"$like": "N%"}}')
    assert bad.returncode == 2 and "unknown operator '$like'" in one_line_error(bad)
    (tmp_path / "hi.html").write_text("<p>Hi {{ first_name }}</p>\n<p>{{ coupon }}</p>")
    assert (
        run_cli(
            env, "templates", "create", "hi", "--subject", "Hi {{ first_name }}", "--html", str(tmp_path / "hi.html")
        ).returncode
        == 0
    )
    ok = json.loads(
        run_cli(
            env, "templates", "render", "hi", "--contact", "ann@example.org", "--vars", '{"coupon": "X1"}', "--json"
        ).stdout
    )
    assert ok["subject"] == "Hi Ann" and "<p>X1</p>" in ok["html"]
    err = run_cli(env, "templates", "render", "hi", "--contact", "ann@example.org")
    assert err.returncode == 2
    assert one_line_error(err) == "error: template 'hi' html line 2: undefined variable 'coupon'"


def test_demo_runs_the_outbound_pipeline_and_every_job_finishes(env):
    res = run_cli(env, "demo", "--contacts", "120", "--transactional", "5", "--json", timeout=240)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["ok"] is True and summary["recipients"] == 120
    states = summary["states"]
    assert states["completed"] + states["failed"] == 125
    assert all(states[s] == 0 for s in ("pending", "queued", "active", "retry"))
    # One worker is killed mid-send: only messages it had in flight may have gone out twice.
    kill = next(f for f in summary["faults"] if f["kind"] == "worker killed")
    assert kill["exit"] == "killed by SIGKILL" and summary["duplicates"] <= kill["jobs_in_flight"]
    assert any(f["kind"] == "job streams lost" for f in summary["faults"])
    assert summary["events"] >= 4 * 125  # created, queued, started, finished at least
    # Every failed job, campaign or transactional, is explained by a reason.
    assert sum(f["count"] for f in summary["failures"]) == states["failed"]
    # One reader is erased after the run: no row names them, the counts stay, a send is refused.
    erased = summary["erasure"]
    assert erased["rows_naming_before"] > 0 and erased["rows_naming_after"] == 0
    assert erased["counts_unchanged"] is True and erased["send_after"].startswith("refused")
    # Mail comes back to mailflow inbound: a signed question, one the catch-all route takes; a
    # spoofed p=reject From and a relay attempt are refused, a p=quarantine one is held.
    inbound = summary["inbound"]
    assert [r["code"] for r in inbound["replies"]] == [250, 250, 550, 250, 550]
    assert inbound["stored_for_mailbox"] == 2  # the question and the held spoof: the refused one is not stored
    by_state = {(m["state"], m["dmarc"]) for m in inbound["messages"]}
    assert ("quarantined", "fail") in by_state and ("routed", "pass") in by_state
    question = next(m for m in inbound["messages"] if m["dkim"] == ["pass"] and m["to"] == inbound["mailbox"])
    assert question["mailboxes"] == [inbound["mailbox"]] and question["spf"] == "pass"
    # The loop closes: the recipients' servers and people answer; each answer is classified and
    # applied - three hard bounces and a complaint suppress, the soft and delayed ones do not,
    # the two repliers are stopped, the auto-replies are not replies.
    back = inbound["came_back"]
    got = [(a["what"], a["code"], a["kind"], a["hard"]) for a in back["answers"]]
    assert [g[1] for g in got] == [250] * 10, got
    assert [g[2] for g in got] == ["bounce"] * 4 + [
        "delayed",
        "complaint",
        "auto_reply",
        "auto_reply",
        "reply",
        "reply",
    ]
    assert [g[3] for g in got[:4]] == [True, True, True, False]
    assert back["suppressed"] == 4 and back["stopped_for_repliers"] == 2 and back["alerts"] == 1
    assert back["came_back"]["bounced_hard"] == 3 and back["came_back"]["replied"] == 2
    assert back["threads"] == 2
    # A webhook endpoint subscribed to bounce, complaint, auto_reply and reply got each (not the
    # delayed DSN), signed: the receiver verified every signature with `standardwebhooks`.
    (hook,) = back["webhooks"]
    assert hook["received"] == 9 and hook["verified"] == 9


def test_a_csv_that_is_not_utf8_is_one_line_naming_the_line(env, tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("email,name\nann@example.org,Ann\nbo@example.org,Bj\xf6rn\n".encode("latin-1"))
    res = run_cli(env, "contacts", "import", str(bad))
    assert res.returncode == 2
    assert "not UTF-8 text (line 3)" in one_line_error(res)


def test_a_command_group_without_a_command_shows_help_and_no_error_line(env):
    res = run_cli(env, "events")
    assert "Usage" in res.stdout + res.stderr and "error:" not in res.stderr
