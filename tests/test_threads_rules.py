"""Threading decided without servers (inbound/threads.py): JWZ's containers, links and pruning,
then mailflow's rules - one thread per job and correspondent, never across tenants or
mailboxes, and a subject fallback that never joins two people."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mailflow.inbound.threads import (
    Message,
    from_event,
    job_thread_id,
    jwz,
    normalize_subject,
    threads,
)

pytestmark = pytest.mark.pure

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
JOB = "11111111-2222-4333-8444-555555555555"
SENT = f"<{JOB}@example.org>"  # the job's Message-ID (mail/message_ids.py)
ANN, BOB = "a" * 32, "b" * 32


def msg(
    name: str,
    minutes: float = 0,
    *,
    refs: tuple[str, ...] = (),
    reply_to: str = "",
    job: str | None = None,
    who: str | None = ANN,
    mailbox: str = "help@acme.example",
    subject: str | None = None,
    tenant: str = "acme",
    kind: str = "reply",
    own: str | None = None,
) -> Message:
    return Message(
        message_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}/{name}")),
        tenant=tenant,
        at=T0 + timedelta(minutes=minutes),
        mailbox=mailbox,
        kind=kind,
        header_message_id=f"<{name}@mail.example>" if own is None else own,
        in_reply_to=reply_to,
        references=refs,
        job_id=job,
        correspondent=who,
        subject_key=normalize_subject(subject) or None if subject is not None else None,
    )


def mid(name: str) -> str:
    return f"<{name}@mail.example>"


def tree(containers) -> list:
    """A root set as nested (message name or '-' for an empty container, [children]) pairs."""

    def name(c) -> str:
        return c.message.header_message_id.split("@")[0].strip("<") if c.message else "-"

    return sorted((name(c), tree(c.children)) for c in containers)


def groups(found) -> list[list[str]]:
    """Threads as lists of their messages' names, in order."""
    return sorted([m.header_message_id.split("@")[0].strip("<") for m in t.messages] for t in found)


# -- JWZ ----------------------------------------------------------------------------------


def test_a_reply_that_arrives_before_its_parent_is_put_under_it():
    parent = msg("p", 5)
    child = msg("c", 1, refs=(mid("p"),))
    assert tree(jwz([child, parent])) == [("p", [("c", [])])]


def test_a_missing_parent_keeps_its_children_together_under_an_empty_container_at_the_root():
    a = msg("a", 1, refs=(mid("lost"),))
    b = msg("b", 2, refs=(mid("lost"),))
    assert tree(jwz([a, b])) == [("-", [("a", []), ("b", [])])]


def test_an_empty_container_with_one_child_is_replaced_by_the_child():
    only = msg("a", 1, refs=(mid("lost"), mid("also-lost")))
    assert tree(jwz([only])) == [("a", [])]


def test_references_that_make_a_loop_are_not_linked():
    a = msg("a", 1, refs=(mid("b"),))
    b = msg("b", 2, refs=(mid("a"),))  # each claims the other as its parent
    c = msg("c", 3, refs=(mid("c"), mid("a")))  # and one references itself
    result = tree(jwz([a, b, c]))
    assert len(result) == 1  # one thread, no cycle (tree() would recurse forever)
    assert {n for n, _ in result} <= {"a", "b"}


def test_references_that_omit_the_middle_still_make_one_thread():
    root = msg("r", 0)
    middle = msg("m", 1, refs=(mid("r"),))
    late = msg("l", 2, refs=(mid("r"),), reply_to=mid("m"))  # References lost the middle; In-Reply-To has it
    assert tree(jwz([late, root, middle])) == [("r", [("m", [("l", [])])])]


def test_in_reply_to_is_the_parent_when_references_are_missing():
    root = msg("r", 0)
    answer = msg("a", 1, reply_to=mid("r"))
    assert tree(jwz([answer, root])) == [("r", [("a", [])])]


def test_two_messages_with_one_message_id_are_both_kept():
    one = msg("same", 1)
    two = msg("dup", 2, own=mid("same"))  # a broken client's, or a forged id
    roots = jwz([one, two])
    assert {r.message.message_id for r in roots if r.message} == {one.message_id, two.message_id}


# -- mailflow's rules ---------------------------------------------------------------------


def test_two_people_replying_to_one_campaign_message_are_two_threads():
    ann = msg("ann", 1, refs=(SENT,), job=JOB, who=ANN)
    bob = msg("bob", 2, refs=(SENT,), job=JOB, who=BOB)
    found = threads([ann, bob])
    assert groups(found) == [["ann"], ["bob"]]
    assert {t.thread_id for t in found} == {job_thread_id("acme", JOB, ANN), job_thread_id("acme", JOB, BOB)}
    assert all(t.job_id == JOB for t in found)


def test_a_reply_without_references_joins_its_thread_by_the_job_mailflow_found():
    first = msg("first", 1, refs=(SENT,), job=JOB)
    bare = msg("bare", 60, job=JOB)  # found by the VERP or reply address: the client kept no References
    assert groups(threads([first, bare])) == [["first", "bare"]]


def test_a_follow_up_that_references_only_the_reply_is_in_the_jobs_thread():
    reply = msg("reply", 1, refs=(SENT,), job=JOB)
    follow = msg("follow", 30, refs=(mid("reply"),))  # names no job: only the reply
    [thread] = threads([follow, reply])
    assert thread.job_id == JOB and groups([thread]) == [["reply", "follow"]]
    assert SENT in thread.ids


def test_someone_else_answering_a_reply_gets_their_own_thread_of_the_job():
    reply = msg("reply", 1, refs=(SENT,), job=JOB, who=ANN)
    cc = msg("cc", 5, refs=(mid("reply"),), who=BOB)
    found = threads([reply, cc])
    assert groups(found) == [["cc"], ["reply"]]
    assert {(t.job_id, t.correspondent) for t in found} == {(JOB, ANN), (JOB, BOB)}


def test_a_bounce_about_a_job_is_in_the_thread_with_the_person_it_is_about():
    data = {
        "message_id": str(uuid.uuid4()),
        "mailbox": "bounces+x@example.org",
        "job_id": JOB,
        "correspondent": "d" * 32,  # MAILER-DAEMON
        "recipients": [{"subject": ANN}],
    }
    bounce = from_event("BounceDetected", data, "acme", T0, "ignored")
    assert (bounce.kind, bounce.correspondent, bounce.subject_key) == ("bounce", ANN, None)
    reply = msg("reply", 1, refs=(SENT,), job=JOB)
    [thread] = threads([reply, bounce])
    assert thread.counts()["bounce"] == 1 and thread.counts()["reply"] == 1


def test_threads_never_join_across_tenants_or_mailboxes():
    here = msg("root", 0, tenant="acme")
    there = msg("answer", 1, refs=(mid("root"),), tenant="other")
    assert len(threads([here, there])) == 2
    desk = msg("q", 0, mailbox="help@acme.example")
    sales = msg("a", 1, refs=(mid("q"),), mailbox="sales@acme.example")
    assert len(threads([desk, sales])) == 2


def test_the_same_job_in_another_tenant_is_another_thread():
    a = msg("a", 1, refs=(SENT,), job=JOB, tenant="acme")
    b = msg("b", 2, refs=(SENT,), job=JOB, tenant="other")
    assert len(threads([a, b])) == 2


@pytest.mark.parametrize(
    "subject, normal",
    [
        ("Re: Order 42", "order 42"),
        ("RE[2]: Order 42", "order 42"),
        ("AW: Re: Fwd: Order 42", "order 42"),
        ("SV:Order  42", "order 42"),
        ("Antw: order 42", "order 42"),
        ("Re^3: Order 42", "order 42"),
        ("回复\uff1aOrder 42", "order 42"),  # a full-width colon
        ("Order 42: Re: details", "order 42: re: details"),
        ("Re: ", ""),
    ],
)
def test_subjects_are_compared_without_reply_and_forward_prefixes(subject, normal):
    assert normalize_subject(subject) == normal


def test_the_subject_fallback_joins_the_same_persons_follow_up_without_references():
    first = msg("first", 0, subject="Order 42")
    again = msg("again", 60 * 24, subject="Re: order 42")  # a day later, no References
    assert groups(threads([first, again])) == [["first", "again"]]


def test_the_subject_fallback_never_joins_another_person_another_mailbox_or_an_old_thread():
    first = msg("first", 0, subject="Order 42")
    bob = msg("bob", 10, subject="Re: Order 42", who=BOB)
    sales = msg("sales", 20, subject="Re: Order 42", mailbox="sales@acme.example")
    late = msg("late", 60 * 24 * 31, subject="Re: Order 42")  # 31 days after the thread's last message
    assert groups(threads([first, bob, sales, late])) == [["bob"], ["first"], ["late"], ["sales"]]


def test_the_window_counts_from_the_threads_last_message():
    first = msg("first", 0, subject="Order 42")
    answer = msg("answer", 60 * 24 * 20, refs=(mid("first"),), subject="Re: Order 42")
    late = msg("late", 60 * 24 * 45, subject="Re: Order 42")  # 45 days after the first, 25 after the last
    assert groups(threads([late, answer, first])) == [["first", "answer", "late"]]


def test_the_subject_fallback_joins_a_jobs_thread_only_for_its_own_correspondent():
    reply = msg("reply", 0, refs=(SENT,), job=JOB, subject="Re: Spring news")
    ann = msg("ann", 30, subject="Spring news")
    bob = msg("bob", 40, subject="Spring news", who=BOB)
    found = threads([reply, ann, bob])
    assert groups(found) == [["bob"], ["reply", "ann"]]
    assert next(t for t in found if t.job_id).correspondent == ANN


def test_a_message_with_references_is_never_moved_by_its_subject():
    first = msg("first", 0, subject="Order 42")
    other = msg("other", 5, refs=(mid("elsewhere"),), subject="Re: Order 42")
    assert len(threads([first, other])) == 2


def test_bounces_never_match_by_subject():
    data = {"message_id": str(uuid.uuid4()), "mailbox": "help@acme.example", "correspondent": "d" * 32}
    b1 = from_event("BounceDetected", data, "acme", T0, "undelivered mail")
    b2 = from_event("BounceDetected", {**data, "message_id": str(uuid.uuid4())}, "acme", T0, "undelivered mail")
    assert len(threads([b1, b2])) == 2


def test_a_reclassified_message_is_one_message_of_its_latest_kind():
    first = msg("m", 0, kind="other")
    again = msg("m", 0, kind="reply")
    [thread] = threads([first, again])
    assert thread.counts()["reply"] == 1 and thread.counts()["other"] == 0


# -- arrival order ------------------------------------------------------------------------


def _world() -> list[Message]:
    job2 = "99999999-2222-4333-8444-555555555555"
    sent2 = f"<{job2}@example.org>"
    return [
        msg("ann1", 1, refs=(SENT,), job=JOB, subject="Re: Spring"),
        msg("ann2", 2, refs=(SENT, mid("ann1")), job=JOB, subject="Re: Spring"),
        msg("ann3", 3, refs=(mid("ann2"),), subject="Re: Spring"),
        msg("ann4", 4, subject="Spring"),
        msg("bob1", 5, refs=(SENT,), job=JOB, who=BOB),
        msg("bob2", 6, refs=(mid("ann3"),), who=BOB),
        msg("cy1", 7, refs=(sent2,), job=job2, who="c" * 32),
        msg("q1", 8, who=BOB, subject="Question"),
        msg("q2", 9, refs=(mid("q1"),), who=ANN, subject="Re: Question"),
        msg("q3", 10, refs=(mid("q2"), mid("q1")), who=BOB, subject="Re: Question"),
        msg("q4", 11, who=BOB, subject="Question"),
        msg("loop1", 12, refs=(mid("loop2"),)),
        msg("loop2", 13, refs=(mid("loop1"),)),
        msg("lost1", 14, refs=(mid("gone"),), who=BOB),
        msg("lost2", 15, refs=(mid("gone"), mid("lost1")), who=BOB),
        msg("x", 16, mailbox="sales@acme.example", refs=(mid("q1"),)),
        msg("t2", 17, tenant="other", refs=(mid("q1"),)),
        msg("dup", 18, own=mid("q1")),
    ]


def _canonical(found) -> list[tuple]:
    return sorted((t.thread_id, tuple(m.message_id for m in t.messages), t.job_id) for t in found)


@pytest.mark.parametrize("seed", range(25))
def test_the_threads_do_not_depend_on_the_order_messages_arrive_in(seed):
    world = _world()
    expected = _canonical(threads(world))
    shuffled = world[:]
    random.Random(seed).shuffle(shuffled)
    assert _canonical(threads(shuffled)) == expected
    assert sum(len(t) for _, t, _ in expected) == len(world)


def test_the_world_is_threaded_as_the_rules_say():
    found = threads(_world())
    assert groups(found) == [
        ["ann1", "ann2", "ann3", "ann4"],  # the job's thread with Ann, her reference-less follow-up too
        ["bob1", "bob2"],  # Bob's own thread of the same job, though he answered Ann's mail
        ["cy1"],
        ["loop1", "loop2"],
        ["lost1", "lost2"],
        ["q1"],  # "dup": a second message with q1's Message-ID is not q1
        ["q1", "q2", "q3", "q4"],  # JWZ's thread of two people; q4 by subject (Bob's, like q1)
        ["t2"],  # another tenant
        ["x"],  # another mailbox
    ]
