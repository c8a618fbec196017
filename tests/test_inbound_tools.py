"""`mailflow inbound` against real SMTP clients: swaks for the refusals, limits and STARTTLS, and
postfix's smtp-source for a kill -9 in the middle of 5,000 messages over 10 sessions.

tests/test_inbound.py covers the same ground with aiosmtplib; here the clients are the ones
mail administrators use, so the server is proven against what real MTAs' clients send."""

from __future__ import annotations

import json
import queue
import random
import re
import select
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from .conftest import run_cli, wait_until
from .smtp_tools import Dropped, Inbound, RawSMTP, SmtpSource, local_dns, received, start_inbound, swaks, write

pytestmark = pytest.mark.process

MAILBOX = "help@acme.example"


@pytest.fixture
def inbound_env(env):
    with local_dns(env) as e:
        yield e


@pytest.fixture
def limited(procs, inbound_env, acme) -> Inbound:
    """`mailflow inbound` with small limits: 64 KiB messages, 3 recipients."""
    return start_inbound(procs, inbound_env, max_message_bytes=65536, max_recipients=3)


def stored(db) -> list[dict]:
    rows = db.execute(
        "SELECT m.id::text, m.recipients, m.helo, m.tls, r.data FROM inbound_messages m"
        " JOIN raw_messages r ON (r.tenant, r.sha256) = (m.tenant, m.sha256) ORDER BY m.received_at"
    ).fetchall()
    return [dict(zip(("id", "recipients", "helo", "tls", "data"), r)) for r in rows]


def test_swaks_mail_to_a_mailbox_is_stored_and_listed_as_the_cli_set_it_up(procs, inbound_env, db):
    for args in (("domains", "add", "acme.example"), ("mailboxes", "add", MAILBOX, "--name", "Help desk")):
        done = run_cli(inbound_env, *args)
        assert done.returncode == 0, done.stderr
    server = start_inbound(procs, inbound_env)
    t = swaks(server.port, "--body", "Where is my parcel?", to=f"{MAILBOX},Help+billing@ACME.example")
    assert t.exit_code == 0, t.output
    assert [r.code for r in t.of("RCPT")] == [250, 250]
    assert t.end_of_data().code == 250 and t.end_of_data().text.startswith("2.0.0"), t.output
    listed = json.loads(run_cli(inbound_env, "messages", "list", "--json", "--mailbox", MAILBOX).stdout)
    assert len(listed) == 1
    assert listed[0]["recipients"] == [MAILBOX, "help+billing@acme.example"]
    [row] = stored(db)
    assert (
        row["id"] == listed[0]["id"] and row["helo"] == "client.test" and b"Where is my parcel?" in bytes(row["data"])
    )


# Addresses that try to get mail through mailflow to somewhere else. RFC 5321 drops a source
# route, and what is left (a foreign address) decides.
ROUTED_ELSEWHERE = [
    "victim@foreign.example",
    "victim%foreign.example@acme.example",  # the percent hack
    "@acme.example:victim@foreign.example",  # a source route
    '"victim@foreign.example"@acme.example',  # a quoted local part
    "foreign.example!victim@acme.example",  # a bang path
]


@pytest.mark.parametrize("mail_from", ["help@acme.example", "ann@sender.example", "<>"])
def test_swaks_foreign_and_routed_recipients_are_refused_5_7_1_whoever_the_sender(limited, db, mail_from):
    """MAIL FROM a local mailbox does not make mailflow relay; nor does the null sender."""
    for rcpt in ROUTED_ELSEWHERE:
        t = swaks(limited.port, to=rcpt, mail_from=mail_from)
        assert f"RCPT TO:<{rcpt}>" in t.sent, t.output  # swaks sent the address as it is written
        assert t.of("MAIL")[0].code == 250, t.output
        [refused] = t.of("RCPT")
        assert refused.code == 550 and refused.text.startswith("5.7.1"), (rcpt, t.output)
        assert t.exit_code == 24 and not t.of("."), t.output  # "no RCPTs accepted": no DATA
    assert stored(db) == []


def test_swaks_to_an_unknown_address_at_an_inbound_domain_is_refused_5_1_1_whoever_the_sender(limited, db):
    for mail_from in ("ann@sender.example", "help@acme.example"):
        t = swaks(limited.port, to="nobody@acme.example", mail_from=mail_from)
        [refused] = t.of("RCPT")
        assert refused.code == 550 and refused.text.startswith("5.1.1"), t.output
    assert stored(db) == []


def test_swaks_over_size_gets_552_and_recipients_past_the_limit_get_452_4_5_3(limited, db, tmp_path):
    body = write(tmp_path / "big.txt", (b"y" * 76 + b"\n") * 900)  # 69 KB > 64 KiB
    t = swaks(limited.port, "--body", f"@{body}", "--suppress-data")
    assert t.end_of_data().code == 552, t.output
    rcpts = [f"help+{i}@acme.example" for i in range(5)]
    t = swaks(limited.port, to=",".join(rcpts))
    assert [r.code for r in t.of("RCPT")] == [250, 250, 250, 452, 452], t.output
    assert all(r.text.startswith("4.5.3") for r in t.of("RCPT")[3:]), t.output
    assert t.end_of_data().code == 250, t.output
    [row] = stored(db)
    assert row["recipients"] == rcpts[:3]


def test_swaks_bare_lf_gets_550_5_6_0_and_overlong_lines_get_500(limited, db, tmp_path):
    # --no-data-fixup: swaks sends the file as it is (no CRLF repair), so it ends with the dot itself.
    bare = write(tmp_path / "bare.eml", b"From: ann@sender.example\r\nSubject: x\r\n\r\nline one\nline two\r\n.\r\n")
    t = swaks(limited.port, "--data", f"@{bare}", "--no-data-fixup")
    assert t.end_of_data().code == 550 and t.end_of_data().text.startswith("5.6.0"), t.output
    long_line = write(
        tmp_path / "long.eml", b"From: ann@sender.example\r\nSubject: x\r\n\r\n" + b"x" * 1200 + b"\r\n.\r\n"
    )
    t = swaks(limited.port, "--data", f"@{long_line}", "--no-data-fixup", "--suppress-data")
    assert t.end_of_data().code == 500 and "too long" in t.end_of_data().text.lower(), t.output
    t = swaks(limited.port, to=f"{'h' * 600}@acme.example")  # a command line over 512 bytes
    [too_long] = t.of("RCPT")
    assert too_long.code == 500 and "too long" in too_long.text.lower(), t.output
    assert stored(db) == []


def test_swaks_starttls_works_with_the_self_signed_certificate_and_the_message_says_so(limited, db):
    t = swaks(limited.port, "--tls", "--body", "Over TLS")
    assert t.exit_code == 0, t.output
    assert [r.code for r in t.of("STARTTLS")] == [220] and "=== TLS started" in t.output, t.output
    assert t.end_of_data().code == 250, t.output
    [row] = stored(db)
    assert row["tls"] is True and b"Over TLS" in bytes(row["data"])


def trickle(port: int, every_s: float, for_s: float) -> tuple[tuple[int, str] | None, float]:
    """A sender that starts DATA and then sends one short line every `every_s` seconds: the
    server's reply (None if it closed the connection without one) and when it came."""
    with RawSMTP(port) as c:
        for line in ("EHLO slow.test", "MAIL FROM:<ann@sender.example>", f"RCPT TO:<{MAILBOX}>", "DATA"):
            c.command(line)
        t0 = time.monotonic()
        c.sock.sendall(b"Subject: slowly\r\n\r\n")
        while time.monotonic() - t0 < for_s:
            readable, _, _ = select.select([c.sock], [], [], every_s)
            if readable:
                try:
                    return c.reply(), time.monotonic() - t0
                except Dropped:
                    return None, time.monotonic() - t0
            try:
                c.sock.sendall(b"a line, at last\r\n")
            except OSError:
                return None, time.monotonic() - t0
    raise AssertionError(f"the server let a sender trickle for {for_s} s")


def test_a_slow_sender_is_told_421_4_4_2_when_its_data_takes_too_long(procs, inbound_env, acme, db):
    server = start_inbound(procs, inbound_env, data_timeout_s=1, timeout_s=5)
    reply, after = trickle(server.port, every_s=0.2, for_s=10)
    assert reply is not None and reply[0] == 421 and reply[1].startswith("4.4.2"), (reply, f"after {after:.1f} s")
    assert 0.9 < after < 4
    assert server.alive() and stored(db) == []


def test_a_session_idle_past_the_timeout_is_closed(procs, inbound_env, acme):
    server = start_inbound(procs, inbound_env, timeout_s=1)
    with RawSMTP(server.port) as idle:
        idle.command("EHLO idle.test")
        t0 = time.monotonic()
        with pytest.raises(Dropped):
            idle.reply()  # nothing is sent: the server closes the session
        assert 0.9 < time.monotonic() - t0 < 5
    assert server.alive()
    assert swaks(server.port).end_of_data().code == 250  # and it still serves a sender that keeps up


def stored_ids(db) -> set[str]:
    return {r[0] for r in db.execute("SELECT id::text FROM inbound_messages").fetchall()}


def assert_no_message_twice(db) -> int:
    """Every stored message is a different one (by content), with one event and one raw copy."""
    count, distinct = db.execute("SELECT count(*), count(DISTINCT (tenant, sha256)) FROM inbound_messages").fetchone()
    raw = db.execute("SELECT count(*) FROM raw_messages").fetchone()[0]
    events = db.execute("SELECT count(*) FROM events WHERE type = 'MessageReceived'").fetchone()[0]
    assert count == distinct == raw == events, (count, distinct, raw, events)
    return int(count)


def test_kill_9_while_smtp_source_sends_5000_messages_over_10_sessions_keeps_every_acknowledged_one_once(
    procs, inbound_env, acme, db, tmp_path
):
    """smtp-source (one process, 10 sessions that each send one message after another) is the
    client; its verbose log holds every reply it read, and mailflow's 250 names the message it
    stored, so each acknowledgement is counted by message. The server is killed with SIGKILL
    at a random moment; smtp-source, which does not retry, stops at the lost connection. Then:
    every message it read a 250 for is stored, each once; the only stored messages it did not
    read a 250 for are ones it had sent to the end when the server died (at most one per
    session); after the restart a second run sends the rest, and then it has read a 250 for
    all 5,000 and nothing is stored twice. (smtp-source makes each message different, with
    its process id and a counter in the Message-Id, so a message it sends again is a new
    one: that a retransmission of the same bytes is stored once is tested with per-message
    files below, and with aiosmtplib in test_inbound.py.)"""
    n, sessions = 5000, 10
    server = start_inbound(procs, inbound_env)
    common = ["-d", "-s", str(sessions), "-l", "1000", "-S", "Load", "-f", "ann@sender.example", "-t", MAILBOX]
    first = SmtpSource(server.port, tmp_path / "first.log", "-m", str(n), *common)
    kill_at = random.randint(1000, 4000)
    wait_until(
        lambda: first.proc.poll() is not None or received(db) >= kill_at,
        120,
        0.02,
        f"{kill_at} messages to be stored",
    )
    server.kill()  # sessions in the middle of DATA and of their commit
    assert first.wait(30) != 0 and any("lost connection" in line for line in first.lines()[-20:]), first.lines()[-20:]
    acked = first.acknowledged()
    assert len(set(acked)) == len(acked) and kill_at - 200 <= len(acked) < n  # each 250 names another message
    assert first.refusals() == []
    at_kill = stored_ids(db)
    assert set(acked) <= at_kill, "a message acknowledged with 250 is not stored"
    unacknowledged = at_kill - set(acked)  # committed, and the server died before its 250 was read
    assert len(unacknowledged) <= first.ends_of_data() - len(acked) <= sessions
    assert_no_message_twice(db)

    server.start()  # the same port
    rest = SmtpSource(server.port, tmp_path / "rest.log", "-m", str(n - len(acked)), *common)
    assert rest.wait(120) == 0, rest.lines()[-20:]
    acked_rest = rest.acknowledged()
    assert len(acked_rest) == n - len(acked) and not set(acked_rest) & set(acked) and rest.refusals() == []
    final = stored_ids(db)
    assert set(acked) | set(acked_rest) <= final
    assert final - set(acked) - set(acked_rest) == unacknowledged  # the second run stored none it did not hear of
    assert assert_no_message_twice(db) == n + len(unacknowledged)


def message_file(folder: Path, i: int) -> Path:
    return write(
        folder / f"{i}.eml",
        f"From: Ann <ann@sender.example>\nTo: {MAILBOX}\nSubject: Order {i}\nMessage-ID: <order-{i}@sender.example>\n"
        f"Date: Tue, 01 Dec 2026 12:00:00 +0000\n\nWhere is order {i}?\n".encode(),
    )


def stored_message_ids(db) -> Counter[str]:
    """How many times each Message-ID header is stored."""
    found: Counter[str] = Counter()
    for (data,) in db.execute("SELECT data FROM raw_messages").fetchall():
        m = re.search(rb"^Message-ID: <([^>]+)>", bytes(data), re.MULTILINE)
        assert m is not None
        found[m.group(1).decode()] += 1
    return found


def test_smtp_source_retrying_each_message_it_got_no_250_for_after_a_kill_9_stores_each_exactly_once(
    procs, inbound_env, acme, db, tmp_path
):
    """Like a real MTA's queue: 10 senders at a time, each message a file of its own sent by one
    smtp-source session (-F), and a message that got no 250 sent again, the same bytes, until
    it does. The server is killed with SIGKILL part-way: what is stored then is every message
    acknowledged so far plus at most ones whose session was under way at the kill; after the
    restart and the retries, each of the 1,000 is stored exactly once."""
    n = 1000
    files = [message_file(tmp_path, i) for i in range(n)]
    server = start_inbound(procs, inbound_env)
    work: queue.Queue[int] = queue.Queue()
    for i in range(n):
        work.put(i)
    acked: set[int] = set()
    running: set[int] = set()
    sends: Counter[int] = Counter()
    lock = threading.Lock()
    go = threading.Event()
    go.set()

    def sender() -> None:
        while len(acked) < n:
            go.wait()
            try:
                i = work.get(timeout=0.05)
            except queue.Empty:
                continue
            with lock:
                running.add(i)
                sends[i] += 1
            session = SmtpSource(server.port, tmp_path / f"{i}-{sends[i]}.log", "-m", "1", "-F", str(files[i]),
                                 "-f", "ann@sender.example", "-t", MAILBOX)  # fmt: skip
            session.wait(60)
            with lock:
                running.discard(i)
                if session.acknowledged():
                    acked.add(i)
                else:
                    work.put(i)  # no 250: the sender keeps it and tries again
            if i not in acked:
                time.sleep(0.05)

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    kill_at = random.randint(200, 700)
    wait_until(lambda: len(acked) >= kill_at, 120, 0.01, f"{kill_at} messages to be acknowledged")
    with lock:
        server.kill()
        go.clear()  # senders finish the session they are in (it fails), and start no new one
        under_way = set(running)
    wait_until(lambda: not running, 60, 0.01, "the sessions under way at the kill to end")
    stored_then = {int(mid.split("-")[1].split("@")[0]) for mid in stored_message_ids(db)}
    assert acked <= stored_then <= acked | under_way, (len(acked), len(stored_then), sorted(stored_then - acked))
    server.start()
    go.set()
    for t in threads:
        t.join(120)
    assert acked == set(range(n)) and sum(sends.values()) > n  # every message, some of them more than once
    assert stored_message_ids(db) == Counter({f"order-{i}@sender.example": 1 for i in range(n)})
    assert assert_no_message_twice(db) == n


def test_two_server_processes_share_the_port_each_commits_its_share_and_sigterm_stops_both(
    procs, inbound_env, acme, db, tmp_path
):
    """`mailflow inbound --processes 2` (MAILFLOW_INBOUND_PROCESSES): two servers on one port
    (SO_REUSEPORT), the kernel spreading smtp-source's ten sessions between them."""
    server = start_inbound(procs, inbound_env, processes=2)
    # the port answers once one of them listens; the sessions are spread from when both do
    wait_until(lambda: server.log().count('"inbound.start"') == 2, 30, what="both servers to listen")
    n = 1000
    source = SmtpSource(
        server.port, tmp_path / "s.log", "-m", str(n), "-d", "-s", "10", "-l", "1000", "-f", "ann@sender.example",
        "-t", MAILBOX,
    )  # fmt: skip
    assert source.wait(120) == 0, source.lines()[-20:]
    acked = source.acknowledged()
    assert len(set(acked)) == n and source.refusals() == []
    assert stored_ids(db) == set(acked)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log()
    committed = [int(m.group(1)) for m in re.finditer(r'"committed": (\d+)[^\n]*"inbound\.stop"', server.log())]
    assert len(committed) == 2 and min(committed) > 0 and sum(committed) == n, committed
