"""The `threads` inline projection with PostgreSQL (inbound/threads_projection.py): classified
mail threaded with the campaign message it answers, one thread per job and person, never
across mailboxes or tenants, a guarded subject fallback, a rebuild equal to the incremental
tables, erasure, and `mailflow threads` as a user sees it."""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from mailflow.consumers import inline
from mailflow.errors import NotFoundError
from mailflow.events.envelope import Metadata
from mailflow.inbound import threads_projection as tp
from mailflow.inbound.events import (
    AutoReplyReceived,
    BounceDetected,
    ClassifiedRecipient,
    OtherReceived,
    ReplyReceived,
)
from mailflow.infra import personal
from mailflow.mail.message_ids import message_id
from mailflow.outbound import campaigns, contacts, segments, templates
from mailflow.outbound.contacts import import_csv_text
from mailflow.outbound.events import JobCompleted, JobQueued, JobStarted
from mailflow.outbound.senders import Sender
from mailflow.outbound.sending import save_sender
from mailflow.tenants import registry

pytestmark = pytest.mark.integration

NEWS = "news@example.org"
HELP = "help@acme.example"
TABLES = ("threads", "thread_messages", "thread_ids")


@pytest.fixture
def world(rt, acme):
    """A campaign `spring` from news@example.org to ann and bob, Ann's job sent."""
    save_sender(rt.store, Sender("news", NEWS, "News", "smtp://127.0.0.1:9?tls=none"))
    templates.save(rt.store, templates.Template("news", "Spring news", "<p>Hello</p>", "Hello"))
    import_csv_text(rt.store, "email,name\nann@example.net,Ann\nbob@example.net,Bob\n")
    segments.define(rt.store, "all", {})
    cid = campaigns.create(rt.store, name="spring", sender="news", template="news", segment="all")
    campaigns.start(rt.store, cid)
    w = World(rt, cid)
    w.send(w.job("ann@example.net"))
    return w


class World:
    def __init__(self, rt, cid: str) -> None:
        self.rt, self.store, self.cid = rt, rt.store, cid

    def job(self, email: str) -> str:
        with self.rt.connect() as conn:
            subject = self.store.subject(conn, email)
            row = conn.execute("SELECT id::text FROM jobs WHERE campaign_id = %s AND subject = %s", (self.cid, subject))
            return row.fetchone()[0]

    def send(self, job_id: str) -> None:
        lease = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
        events = [
            JobQueued(job_id=job_id, queue_seq=1),
            JobStarted(job_id=job_id, attempt=1, worker="w1", lease_until=lease),
            JobCompleted(job_id=job_id, attempt=1, code=250, reply="250 2.0.0 queued"),
        ]
        inline.record(self.store, [(f"job-{job_id}", e.to_new(Metadata(correlation_id=job_id))) for e in events])

    def threads(self, **filters) -> list[dict]:
        with self.rt.connect() as conn:
            return tp.list_threads(conn, **filters)

    def thread(self, ref: str) -> dict:
        with self.rt.connect() as conn:
            return tp.thread(conn, ref)

    def thread_of(self, mid: str) -> str:
        with self.rt.connect() as conn:
            return conn.execute("SELECT thread_id::text FROM thread_messages WHERE message_id = %s", (mid,)).fetchone()[
                0
            ]


def receive(
    store,
    kind=ReplyReceived,
    *,
    sender: str = "ann@example.net",
    subject: str = "Re: Spring news",
    text: str = "",
    mailbox: str = NEWS,
    job: str | None = None,
    found_by: str = "",
    own: str | None = None,
    reply_to: str = "",
    refs: tuple[str, ...] = (),
    **extra,
) -> str:
    """Record one classified message as the classifier does: the From named by subject, the
    From, subject line and text sealed under that subject's key."""
    mid = str(uuid.uuid4())
    with inline.writing(store) as w:
        who = store.subject(w.conn, sender)
        [sealed] = personal.seal_many(
            w.conn, store.tenant, [(who, {"sender": sender, "subject": subject, "text": text})]
        )
        event = kind(
            message_id=mid,
            mailbox=mailbox,
            job_id=job,
            found_by=found_by,
            header_message_id=own if own is not None else f"<{mid}@mail.example.net>",
            in_reply_to=reply_to,
            references=list(refs),
            correspondent=who,
            sealed=sealed,
            **extra,
        )
        w.record([(f"inbound-message-{mid}", event.to_new(Metadata(correlation_id=mid)))])
    return mid


def own_id(mid: str) -> str:
    return f"<{mid}@mail.example.net>"


def snapshot(db) -> dict[str, list]:
    return {t: sorted(map(str, db.execute(f"SELECT * FROM {t}").fetchall())) for t in TABLES}


# -- the Done-when cases ----------------------------------------------------------------------


def test_two_people_replying_to_the_same_campaign_message_end_in_two_threads(world):
    ann_job = world.job("ann@example.net")
    sent = message_id(ann_job, "example.org")
    ann = receive(world.store, job=ann_job, found_by="in_reply_to", reply_to=sent, refs=(sent,))
    # Ann forwarded the campaign to Bob, who answers the same message.
    bob = receive(world.store, sender="bob@example.net", job=ann_job, found_by="in_reply_to", reply_to=sent)
    assert world.thread_of(ann) != world.thread_of(bob)
    listed = world.threads(job=ann_job)
    assert sorted(t["sender"] for t in listed) == ["ann@example.net", "bob@example.net"]
    assert all(t["counts"]["reply"] == 1 and t["messages"] == 1 for t in listed)


def test_a_reply_whose_client_dropped_references_still_joins_its_thread_by_mailflows_own_links(world):
    ann_job = world.job("ann@example.net")
    sent = message_id(ann_job, "example.org")
    first = receive(world.store, job=ann_job, found_by="in_reply_to", reply_to=sent, refs=(sent,))
    # No References, no In-Reply-To: the classifier found the job by the reply address.
    bare = receive(world.store, job=ann_job, found_by="reply_address", subject="Another question", text="And...?")
    away = receive(
        world.store, AutoReplyReceived, job=ann_job, found_by="verp", subject="Out of office", why="auto-submitted"
    )
    assert world.thread_of(first) == world.thread_of(bare) == world.thread_of(away)
    [thread] = world.threads()
    assert (thread["messages"], thread["counts"]["reply"], thread["counts"]["auto_reply"]) == (3, 2, 1)


# -- the rules ---------------------------------------------------------------------------


def test_a_thread_anchored_at_a_job_shows_the_job_first_then_its_messages_in_order(world):
    ann_job = world.job("ann@example.net")
    sent = message_id(ann_job, "example.org")
    reply = receive(world.store, job=ann_job, reply_to=sent, refs=(sent,), text="Yes, Tuesday works.\n\nAnn")
    away = receive(world.store, AutoReplyReceived, job=ann_job, found_by="verp", subject="Out of office")
    t = world.thread(world.thread_of(reply))
    assert t["job"]["job_id"] == ann_job and t["job"]["campaign"] == "spring" and t["job"]["sent_at"] is not None
    assert [(m["message_id"], m["kind"]) for m in t["items"]] == [(reply, "reply"), (away, "auto_reply")]
    assert t["items"][0]["text"] == "Yes, Tuesday works.\n\nAnn" and t["items"][1]["text"] is None
    assert (t["sender"], t["subject"]) == ("ann@example.net", "Re: Spring news")


def test_a_follow_up_to_a_reply_whose_references_name_only_the_reply_joins_the_same_thread(world):
    ann_job = world.job("ann@example.net")
    sent = message_id(ann_job, "example.org")
    reply = receive(world.store, job=ann_job, reply_to=sent, refs=(sent,))
    follow = receive(world.store, mailbox=HELP, reply_to=own_id(reply), refs=(own_id(reply),))  # names no job
    assert world.thread_of(follow) == world.thread_of(reply)
    assert world.thread(world.thread_of(reply))["job_id"] == ann_job


def test_a_message_that_links_two_threads_merges_them(world):
    question = receive(world.store, mailbox=HELP, subject="Question")
    orphan = receive(world.store, mailbox=HELP, subject="Re: lost", refs=("<lost@mail.example.net>",))
    assert world.thread_of(question) != world.thread_of(orphan)
    receive(world.store, mailbox=HELP, refs=(own_id(question), "<lost@mail.example.net>"))
    assert world.thread_of(question) == world.thread_of(orphan)
    [merged] = world.threads()
    assert merged["id"] == world.thread_of(question) and merged["messages"] == 3


def test_a_reply_that_arrives_before_its_parent_is_threaded_with_it(world):
    parent_id = "<parent@mail.example.net>"
    child = receive(world.store, mailbox=HELP, refs=(parent_id,))
    parent = receive(world.store, mailbox=HELP, own=parent_id, subject="Question")
    assert world.thread_of(child) == world.thread_of(parent)


def test_different_mailboxes_and_different_tenants_never_join(world, operator_store):
    question = receive(world.store, mailbox=HELP, subject="Question")
    elsewhere = receive(world.store, mailbox="sales@acme.example", refs=(own_id(question),))
    assert world.thread_of(question) != world.thread_of(elsewhere)

    registry.create(operator_store, "other")
    other = operator_store.for_tenant("other")
    theirs = receive(other, mailbox=HELP, refs=(own_id(question),), subject="Question")
    with world.rt.connect() as conn:
        rows = conn.execute("SELECT count(*) FROM thread_messages").fetchone()[0]
        with pytest.raises(NotFoundError):
            tp.find(conn, _thread_of_tenant(operator_store, "other", theirs))
    assert rows == 2  # the default tenant sees only its own


def _thread_of_tenant(operator_store, tenant: str, mid: str) -> str:
    with inline.reading(operator_store.for_tenant(tenant)) as conn:
        return conn.execute("SELECT thread_id::text FROM thread_messages WHERE message_id = %s", (mid,)).fetchone()[0]


def test_the_subject_fallback_joins_the_same_correspondents_follow_up_but_not_another_persons(world):
    first = receive(world.store, OtherReceived, mailbox=HELP, subject="Order 42 is late")
    again = receive(world.store, OtherReceived, mailbox=HELP, subject="RE: Order 42 is late")
    bob = receive(world.store, OtherReceived, mailbox=HELP, subject="Re: Order 42 is late", sender="bob@example.net")
    assert world.thread_of(first) == world.thread_of(again) != world.thread_of(bob)


def test_a_bounce_about_a_job_is_in_the_thread_with_the_person_it_bounced(world):
    ann_job = world.job("ann@example.net")
    sent = message_id(ann_job, "example.org")
    reply = receive(world.store, job=ann_job, reply_to=sent, refs=(sent,))
    with inline.writing(world.store) as w:
        ann = world.store.subject(w.conn, "ann@example.net")
    bounce = receive(
        world.store,
        BounceDetected,
        sender="mailer-daemon@mx.example.net",
        subject="Undelivered Mail Returned to Sender",
        mailbox="bounces+token@example.org",
        job=ann_job,
        found_by="verp",
        recipients=[ClassifiedRecipient(subject=ann, status="5.2.2", reason="mailboxfull")],
    )
    assert world.thread_of(bounce) == world.thread_of(reply)


def test_a_reclassified_message_is_counted_once_as_its_new_kind(world):
    mid = receive(world.store, OtherReceived, mailbox=HELP, subject="Hello")
    with inline.writing(world.store) as w:
        [row] = w.conn.execute("SELECT data FROM events WHERE type = 'OtherReceived'").fetchall()
        again = ReplyReceived(**{**row[0], "reclassified": True})
        w.record([(f"inbound-message-{mid}", again.to_new())])
    [t] = world.threads()
    assert t["messages"] == 1 and t["counts"]["reply"] == 1 and t["counts"]["other"] == 0


def test_two_writers_placing_linked_messages_at_once_take_turns_and_end_in_one_thread(world):
    parent_id = "<parent@mail.example.net>"
    done = threading.Event()
    placed: list[str] = []
    with inline.writing(world.store) as w:
        first = _record(w, world.store, own=parent_id)

        def answer() -> None:
            placed.append(receive(world.store, mailbox=HELP, refs=(parent_id,)))
            done.set()

        writer = threading.Thread(target=answer)
        writer.start()
        assert not done.wait(0.5)  # it waits for the first transaction's threads
    writer.join(10)
    assert done.is_set() and world.thread_of(first) == world.thread_of(placed[0])


def _record(w, store, *, own: str) -> str:
    mid = str(uuid.uuid4())
    who = store.subject(w.conn, "ann@example.net")
    [sealed] = personal.seal_many(w.conn, store.tenant, [(who, {"sender": "ann@example.net", "subject": "Q"})])
    event = ReplyReceived(message_id=mid, mailbox=HELP, header_message_id=own, correspondent=who, sealed=sealed)
    w.record([(f"inbound-message-{mid}", event.to_new())])
    return mid


# -- rebuild and erasure ---------------------------------------------------------------------


def _conversations(world, operator_store) -> None:
    ann_job, bob_job = world.job("ann@example.net"), world.job("bob@example.net")
    sent = message_id(ann_job, "example.org")
    reply = receive(world.store, job=ann_job, reply_to=sent, refs=(sent,), text="Count me in")
    receive(world.store, sender="bob@example.net", job=ann_job, reply_to=sent)
    receive(world.store, job=ann_job, found_by="reply_address", subject="Re: Spring news")
    receive(world.store, mailbox=HELP, refs=(own_id(reply),))
    receive(world.store, sender="bob@example.net", job=bob_job, found_by="verp", subject="Re: Spring news")
    child = receive(world.store, mailbox=HELP, refs=("<p@mail.example.net>",))
    receive(world.store, mailbox=HELP, own="<p@mail.example.net>", subject="Order 7")
    receive(world.store, OtherReceived, mailbox=HELP, subject="Re: order 7")
    receive(world.store, mailbox=HELP, refs=(own_id(child), "<q@mail.example.net>"))
    registry.create(operator_store, "other")
    receive(operator_store.for_tenant("other"), mailbox=HELP, refs=(own_id(reply),))


def test_a_rebuild_gives_the_threads_the_incremental_path_made(world, operator_store, db, env, monkeypatch, capsys):
    _conversations(world, operator_store)
    before = snapshot(db)
    assert len(before["threads"]) == 5  # Ann and Bob on Ann's job, Bob on his, the help desk's, the other tenant's
    applied = tp.PROJECTION.rebuild(operator_store)
    assert applied == 10
    assert snapshot(db) == before
    code, _, err = cli(env, monkeypatch, capsys, "projections", "rebuild", "threads")
    assert code == 0, err
    assert snapshot(db) == before


def test_erasing_a_correspondent_leaves_no_address_in_the_threads_tables_even_after_a_rebuild(
    world, operator_store, db
):
    _conversations(world, operator_store)
    reply = db.execute("SELECT message_id::text FROM thread_messages WHERE kind = 'reply' ORDER BY at LIMIT 1")
    thread_id = world.thread_of(reply.fetchone()[0])
    contacts.erase(world.store, "ann@example.net")
    for _ in range(2):
        dump = json.dumps(snapshot(db))
        assert "ann@example.net" not in dump
        ann_rows = db.execute(
            "SELECT count(*) FROM thread_messages m JOIN threads t ON t.id = m.thread_id "
            "WHERE m.sealed IS NOT NULL AND t.id = %s",
            (thread_id,),
        ).fetchone()[0]
        assert ann_rows == 0
        t = world.thread(thread_id)
        assert t["sender"] is None and all(m["erased"] and m["text"] is None for m in t["items"])
        tp.PROJECTION.rebuild(operator_store)  # and the rebuild does not bring it back
    assert world.threads(mailbox=HELP)  # Bob's and the others' threads are still there


# -- the command line --------------------------------------------------------------------------


def cli(env, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`mailflow ARGS` in this process, as cli.main() runs it: (exit code, stdout, stderr)."""
    from mailflow import cli as entry
    from mailflow.commands import base

    for k in [k for k in os.environ if k.startswith("MAILFLOW_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("MAILFLOW_"):
            monkeypatch.setenv(k, v)
    base.state.settings = None
    logging_before = structlog.get_config()  # the command binds its log lines to this test's captured stderr
    try:
        with pytest.raises(SystemExit) as exited:
            entry.main(list(args))
    finally:
        structlog.configure(**logging_before)  # later tests must not write to a closed capture
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_threads_show_prints_the_job_then_each_message_with_a_replys_text_in_80_columns(
    world, env, monkeypatch, capsys, operator_store
):
    ann_job = world.job("ann@example.net")
    sent = message_id(ann_job, "example.org")
    long_text = "Yes, Tuesday works for me. " * 8 + "\n\nAnn"
    reply = receive(world.store, job=ann_job, reply_to=sent, refs=(sent,), text=long_text)
    receive(world.store, AutoReplyReceived, job=ann_job, found_by="verp", subject="Out of office")
    thread_id = world.thread_of(reply)

    code, listed, _ = cli(env, monkeypatch, capsys, "threads", "list")
    assert code == 0 and thread_id[:8] in listed and "ann@example.net" in listed and "1 reply" in listed

    code, shown, err = cli(env, monkeypatch, capsys, "threads", "show", thread_id[:8])
    assert code == 0, err
    lines = shown.splitlines()
    assert max(len(line) for line in lines) <= 80
    sent_line = next(i for i, line in enumerate(lines) if " sent " in line)
    reply_line = next(i for i, line in enumerate(lines) if " reply " in line)
    auto_line = next(i for i, line in enumerate(lines) if " auto-reply " in line)
    assert sent_line < reply_line < auto_line
    assert lines[sent_line].endswith(f"job {ann_job}")
    assert lines[sent_line + 1] == f"    campaign spring ({world.cid})"
    assert lines[reply_line + 1].startswith("    Yes, Tuesday works for me.")
    assert "    Ann" in lines

    code, as_json, _ = cli(env, monkeypatch, capsys, "threads", "show", thread_id, "--json")
    doc = json.loads(as_json)
    assert (
        code == 0 and doc["job"]["job_id"] == ann_job and [m["kind"] for m in doc["items"]] == ["reply", "auto_reply"]
    )
    assert doc["items"][0]["text"] == long_text

    code, out, err = cli(env, monkeypatch, capsys, "threads", "show", "00000000")
    assert (code, out) == (5, "") and err.startswith("error: no thread 00000000") and len(err.splitlines()) == 1

    registry.create(operator_store, "other")
    theirs = receive(operator_store.for_tenant("other"), mailbox=HELP, subject="Theirs")
    code, _, err = cli(env, monkeypatch, capsys, "threads", "show", _thread_of_tenant(operator_store, "other", theirs))
    assert code == 5 and err.startswith("error: no thread")
