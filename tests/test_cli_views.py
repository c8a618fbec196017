"""The read side as a user sees it: `events tail`, `jobs`, `send --wait`, `queues` and
`campaigns` print what is true, fit 80 columns, and take the ids they print."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mailflow.consumers import inline
from mailflow.errors import UserError
from mailflow.events import NewEvent
from mailflow.events.envelope import Metadata
from mailflow.outbound import campaigns, segments, sending, templates
from mailflow.outbound.events import JobCompleted, JobFailed, JobQueued, JobRetryScheduled, JobStarted
from mailflow.outbound.views import id_range, short_ids, sla_verdict

from .conftest import run_cli
from .test_cli import one_line_error
from .test_outbound_pipeline import load_contacts, setup_catalog

pytestmark = pytest.mark.process

RELAY = "smtp://127.0.0.1:2525?tls=none"
LONG_REPLY = "451 4.3.0 " + "the receiving server is temporarily unable to take this message " * 3


def narrow(env: dict[str, str]) -> dict[str, str]:
    return dict(env, COLUMNS="80", LINES="40")


def fits_80(text: str) -> None:
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert too_long == [], f"lines wider than 80 columns: {too_long}"


def record_job_events(store, job_id: str, *events) -> None:
    """Move a job along the state graph through the one write path, as queuer and worker do."""
    md = Metadata(correlation_id=job_id)
    inline.record(store, [(f"job-{job_id}", e.to_new(md)) for e in events])


def started(job_id: str, attempt: int = 1):
    lease = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    return [
        JobQueued(job_id=job_id, queue_seq=attempt),
        JobStarted(job_id=job_id, attempt=attempt, worker="w1", lease_until=lease),
    ]


def retrying(job_id: str):
    due = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    return [*started(job_id), JobRetryScheduled(job_id=job_id, attempt=1, code=451, reply=LONG_REPLY, due_at=due)]


def create_job(store, job_id: str, email: str, priority: str = "high") -> None:
    with inline.writing(store) as w:
        created = sending.job_to(
            w,
            email,
            {},
            job_id=job_id,
            idempotency_key=f"test:{job_id}",
            priority=priority,
            sender="tx",
            template="reset",
        )
        w.record([(f"job-{job_id}", created.to_new(Metadata(correlation_id=job_id)))])


# -- events tail -------------------------------------------------------------------------------


def test_tail_by_type_or_stream_shows_the_last_n_matching_events_in_position_order(env, store):
    for i in range(3):
        store.append("rare", [NewEvent("Rare", {"i": i})])
    for i in range(30):
        store.append(f"common-{i}", [NewEvent("Common", {"i": i})])
    store.sync()  # another test's open transaction on the server may still hold positions back
    by_type = run_cli(env, "events", "tail", "--type", "Rare", "-n", "2", "--json")
    assert by_type.returncode == 0, by_type.stderr
    assert [json.loads(x)["data"]["i"] for x in by_type.stdout.splitlines()] == [1, 2]
    by_stream = run_cli(env, "events", "tail", "--stream", "rare", "-n", "5", "--json")
    assert [json.loads(x)["position"] for x in by_stream.stdout.splitlines()] == [1, 2, 3]
    human = run_cli(env, "events", "tail", "--type", "Rare", "--type", "Common", "-n", "3")
    assert [line.split()[0] for line in human.stdout.splitlines()] == ["31", "32", "33"]


# -- send --wait -------------------------------------------------------------------------------


def test_send_wait_exits_non_zero_unless_the_message_was_accepted(env, store):
    setup_catalog(store, RELAY)
    args = ("send", "--sender", "tx", "--template", "reset", "--vars", '{"name": "A", "code": 1}')
    queued = run_cli(env, *args, "--to", "a@example.net", "--idempotency-key", "k-retry", "--json")
    assert queued.returncode == 0, queued.stderr  # without --wait: queued is success
    job = json.loads(queued.stdout)["job_id"]
    record_job_events(store, job, *retrying(job))
    res = run_cli(env, *args, "--to", "a@example.net", "--idempotency-key", "k-retry", "--wait", "0.3")
    assert res.returncode == 1
    assert "not been accepted yet" in res.stdout + res.stderr and "retry" in res.stdout + res.stderr
    as_json = run_cli(env, *args, "--to", "a@example.net", "--idempotency-key", "k-retry", "--wait", "0.2", "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["state"] == "retry"

    waiting, _ = sending.send_transactional(
        store,
        sender="tx",
        template="reset",
        to="p@example.net",
        variables={"name": "P", "code": 2},
        idempotency_key="k-pending",
    )
    res = run_cli(env, *args, "--to", "p@example.net", "--idempotency-key", "k-pending", "--wait", "0.3")
    assert res.returncode == 1 and "pending" in res.stdout + res.stderr

    failed, _ = sending.send_transactional(
        store,
        sender="tx",
        template="reset",
        to="f@example.net",
        variables={"name": "F", "code": 3},
        idempotency_key="k-failed",
    )
    record_job_events(
        store,
        failed,
        *started(failed),
        JobFailed(job_id=failed, attempt=1, code=550, reply="550 5.1.1 no such user", kind="bad_mailbox"),
    )
    res = run_cli(env, *args, "--to", "f@example.net", "--idempotency-key", "k-failed", "--wait", "5")
    assert res.returncode == 1 and "failed" in res.stdout and "5.1.1" in res.stdout

    done, _ = sending.send_transactional(
        store,
        sender="tx",
        template="reset",
        to="d@example.net",
        variables={"name": "D", "code": 4},
        idempotency_key="k-done",
    )
    record_job_events(store, done, *started(done), JobCompleted(job_id=done, attempt=1, code=250, reply="250 2.0.0 ok"))
    res = run_cli(env, *args, "--to", "d@example.net", "--idempotency-key", "k-done", "--wait", "5", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["state"] == "completed"


# -- queues ------------------------------------------------------------------------------------


def test_queues_misses_the_sla_while_a_waiting_job_is_older_than_it_and_fits_80_columns(env, store, db):
    setup_catalog(store, RELAY)
    fast, _ = sending.send_transactional(
        store, sender="tx", template="reset", to="fast@example.net", variables={"name": "F", "code": 1}
    )
    record_job_events(store, fast, *started(fast), JobCompleted(job_id=fast, attempt=1, code=250, reply="250 ok"))
    old, _ = sending.send_transactional(
        store, sender="tx", template="reset", to="old@example.net", variables={"name": "O", "code": 2}
    )
    db.execute(
        "UPDATE jobs SET created_at = now() - interval '2 minutes', due_at = now() - interval '2 minutes' WHERE id = %s",
        (old,),
    )
    stats = {r["priority"]: r for r in json.loads(run_cli(env, "queues", "--json").stdout)}
    assert stats["high"]["latency_p99_s"] < 30  # the one sent message was fast ...
    assert stats["high"]["within_sla"] is False  # ... but one has waited for two minutes
    assert stats["high"]["oldest_waiting_s"] >= 120
    assert stats["normal"]["within_sla"] is None  # no traffic: no verdict
    human = run_cli(narrow(env), "queues")
    assert human.returncode == 0, human.stderr
    fits_80(human.stdout)
    for word in ("priority", "pending", "retry", "queued", "active", "completed", "failed"):
        assert word in human.stdout.split(), f"{word!r} is cut: {human.stdout}"
    high = [line for line in human.stdout.splitlines() if line.startswith("high") and "SLA" in line]
    assert len(high) == 1 and "MISSED" in high[0], human.stdout


# -- jobs --------------------------------------------------------------------------------------


def test_jobs_list_has_a_header_and_unique_short_ids_that_jobs_show_accepts(env, store):
    setup_catalog(store, RELAY)
    ids = [
        "0193aaaa-bb01-7000-8000-000000000001",
        "0193aaaa-bb02-7000-8000-000000000002",
        "0193aaaa-cc03-7000-8000-000000000003",
    ]
    for i, jid in enumerate(ids):
        create_job(store, jid, f"user{i}@example.net")
    res = run_cli(narrow(env), "jobs", "list")
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert header.split()[:3] == ["id", "state", "priority"]
    shown = [row.split()[0] for row in rows]
    assert len(shown) == 3 and len(set(shown)) == 3
    assert all(8 <= len(s) < 36 for s in shown), shown
    assert sorted(next(j for j in ids if j.startswith(s)) for s in shown) == sorted(ids)
    fits_80(res.stdout)
    assert json.loads(run_cli(env, "jobs", "list", "--json").stdout)[0]["id"] in ids  # --json keeps full ids
    one = run_cli(env, "jobs", "show", shown[0], "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["job"]["id"].startswith(shown[0])
    ambiguous = run_cli(env, "jobs", "show", "0193aaaa")
    assert ambiguous.returncode == 2 and "0193aaaa" in one_line_error(ambiguous)
    assert run_cli(env, "jobs", "show", "0193aaaacc").returncode == 0  # hex without the dash works too
    missing = run_cli(env, "jobs", "show", "ffffffff")
    assert missing.returncode == 5 and "ffffffff" in one_line_error(missing)


def test_jobs_show_prints_history_as_short_lines_and_keeps_the_full_data_in_json(env, store):
    setup_catalog(store, RELAY)
    jid = "0193aaaa-bb01-7000-8000-000000000001"
    create_job(store, jid, "someone.with.a.long.address@example.net")
    record_job_events(store, jid, *retrying(jid))
    res = run_cli(narrow(env), "jobs", "show", jid)
    assert res.returncode == 0, res.stderr
    fits_80(res.stdout)
    lines = res.stdout.splitlines()
    retry = next(line for line in lines if "JobRetryScheduled" in line)
    assert "451" in retry and "attempt 1" in retry and "{" not in retry
    assert any("JobStarted" in line and "w1" in line for line in lines)
    full = json.loads(run_cli(env, "jobs", "show", jid, "--json").stdout)
    assert [e["type"] for e in full["history"]] == ["JobCreated", "JobQueued", "JobStarted", "JobRetryScheduled"]
    assert full["history"][-1]["data"]["reply"] == LONG_REPLY
    assert full["job"]["state"] == "retry" and full["job"]["last_reply"] == LONG_REPLY


def test_job_filters_take_only_known_states_and_priorities_and_help_lists_them(env, store):
    setup_catalog(store, RELAY)
    create_job(store, str(uuid.uuid4()), "hi@example.net", priority="high")
    create_job(store, str(uuid.uuid4()), "lo@example.net", priority="low")
    bogus = run_cli(env, "jobs", "list", "--state", "bogus")
    assert bogus.returncode == 2 and "pending" in one_line_error(bogus) and "retry" in one_line_error(bogus)
    bogus = run_cli(env, "jobs", "list", "--priority", "urgent")
    assert bogus.returncode == 2 and "normal" in one_line_error(bogus)
    low = json.loads(run_cli(env, "jobs", "list", "--priority", "low", "--json").stdout)
    assert [j["email"] for j in low] == ["lo@example.net"]
    pending = json.loads(run_cli(env, "jobs", "list", "--state", "pending", "--json").stdout)
    assert len(pending) == 2
    helptext = run_cli(env, "jobs", "list", "--help").stdout
    assert "pending|queued|active|completed|failed|retry" in helptext and "high|normal|low" in helptext


# -- campaigns ---------------------------------------------------------------------------------


def test_starting_a_campaign_of_an_empty_segment_is_one_error_line_and_not_already_started(env, store):
    setup_catalog(store, RELAY)
    templates.save(store, templates.Template("news", "News", "<p>Hello</p>"))
    segments.define(store, "belgian", {"attributes.country": "BE"})
    campaigns.create(store, name="empty", sender="tx", template="news", segment="belgian")
    res = run_cli(env, "campaigns", "start", "empty")
    assert res.returncode == 2
    assert "segment 'belgian' has no active, unsuppressed contact" in one_line_error(res)
    assert "already" not in res.stdout + res.stderr
    load_contacts(store, 1, extra="be@example.net,B,BE\n")
    first = run_cli(env, "campaigns", "start", "empty")
    assert first.returncode == 0 and "1 recipient(s)" in first.stdout and "already" not in first.stdout
    again = run_cli(env, "campaigns", "start", "empty")
    assert again.returncode == 0 and "already started" in again.stdout


def test_campaigns_list_fits_80_columns_with_short_ids_that_commands_accept(env, store):
    setup_catalog(store, RELAY)
    templates.save(store, templates.Template("news", "News", "<p>Hello</p>"))
    segments.define(store, "everyone-in-the-netherlands", {"attributes.country": "NL"})
    names = ["spring-sale-for-returning-2026", "autumn"]
    cids = [
        campaigns.create(store, name=n, sender="tx", template="news", segment="everyone-in-the-netherlands")
        for n in names
    ]
    res = run_cli(narrow(env), "campaigns", "list")
    assert res.returncode == 0, res.stderr
    fits_80(res.stdout)
    header, *rows = res.stdout.splitlines()
    assert header.split()[0] == "id" and "status" in header.split()
    assert len(rows) == 2
    for cid, name in zip(cids, names):
        row = next(r for r in rows if name in r)
        short = row.split()[0]
        assert 8 <= len(short) < 36 and cid.startswith(short) and "draft" in row
        status = run_cli(env, "campaigns", "status", short, "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["id"] == cid


# -- decisions, without servers ----------------------------------------------------------------


def test_short_ids_are_one_length_of_at_least_8_long_enough_to_tell_the_listed_ids_apart():
    far = ["0193aaaa-0000-7000-8000-000000000001", "0193bbbb-0000-7000-8000-000000000002"]
    assert set(short_ids(far).values()) == {"0193aaaa", "0193bbbb"}
    near = [
        "0193aaaa-bb01-7000-8000-000000000001",
        "0193aaaa-bb02-7000-8000-000000000002",
        "0193aaaa-cc03-7000-8000-000000000003",
    ]
    assert sorted(short_ids(near).values()) == ["0193aaaa-bb01", "0193aaaa-bb02", "0193aaaa-cc03"]
    dash = ["0193aaaa-1000-7000-8000-000000000001", "0193aaaa-2000-7000-8000-000000000002"]
    assert sorted(short_ids(dash).values()) == ["0193aaaa-1", "0193aaaa-2"]  # never ends on the dash
    assert short_ids([]) == {}


def test_an_id_prefix_is_the_range_of_ids_that_start_with_it_with_or_without_dashes():
    assert (
        id_range("0193aaaa-bb")
        == id_range("0193AAAABB")
        == (uuid.UUID("0193aaaa-bb00-0000-0000-000000000000"), uuid.UUID("0193aaaa-bbff-ffff-ffff-ffffffffffff"))
    )
    with pytest.raises(UserError):
        id_range("not-hex")


def test_the_sla_is_missed_by_slow_sends_or_by_work_that_waits_too_long():
    assert sla_verdict(30, p99_s=1.0, oldest_waiting_s=None) is True
    assert sla_verdict(30, p99_s=1.0, oldest_waiting_s=120.0) is False  # sent ones were fast, one waits
    assert sla_verdict(30, p99_s=45.0, oldest_waiting_s=2.0) is False
    assert sla_verdict(30, p99_s=None, oldest_waiting_s=5.0) is True
    assert sla_verdict(30, p99_s=None, oldest_waiting_s=None) is None  # no traffic: no verdict


def test_version_and_help_are_plain_text_that_shows_flags_without_a_value(env):
    version = run_cli(env, "--version")
    assert version.returncode == 0 and version.stdout.startswith("mailflow ")
    helped = run_cli(env, "jobs", "list", "--help")
    assert helped.returncode == 0
    assert "--json" in helped.stdout and "<bool>" not in helped.stdout and "install-completion" not in helped.stdout
    assert max(len(line) for line in helped.stdout.splitlines()) <= 80
