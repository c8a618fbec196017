"""Malformed mail never crashes `mailflow inbound` or a consumer: each message gets an SMTP
error or is stored (and marked malformed), and the server goes on answering the next sender.

The messages go over a bare socket (tests/smtp_tools.py's RawSMTP), byte for byte: a client
library would repair line ends and dot-stuffing, and these must arrive as broken as they are."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import pytest

from mailflow.runtime.supervisor import pipeline_parts

from .conftest import wait_until
from .smtp_tools import Dropped, Inbound, RawSMTP, as_sent, free_port, local_dns, received, start_inbound

pytestmark = pytest.mark.process

MAILBOX = "help@acme.example"
HEAD = b"From: Ann <ann@sender.example>\r\nTo: help@acme.example\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
GOOD = HEAD + b"Subject: A good one\r\nMessage-ID: <good@sender.example>\r\n\r\nAll is well.\r\n"


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes


def nested_rfc822(depth: int) -> bytes:
    """A message in a message in ..., `depth` message/rfc822 parts deep."""
    message = b"From: inner@sender.example\r\nSubject: the innermost\r\n\r\nAt the bottom.\r\n"
    for level in range(depth, 0, -1):
        head = HEAD if level == 1 else b"From: ann@sender.example\r\n"
        wrapper = f"Subject: level {level}\r\nMIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n"
        message = head + wrapper.encode() + message
    return message


def garbage(rng: random.Random, size: int) -> bytes:
    """8-bit bytes of every value but CR and LF, in lines of 76."""
    raw = bytes(b for b in rng.randbytes(size * 2) if b not in (10, 13))[:size]
    return b"\r\n".join(raw[i : i + 76] for i in range(0, len(raw), 76)) + b"\r\n"


def cases() -> list[Case]:
    rng = random.Random(10)
    ten_mb = 10 * 1024 * 1024
    fold = b"\r\n " + b"a" * 76
    return [
        Case("no headers", b"This message has no header at all, only a body.\r\nAnd a second line.\r\n"),
        Case("empty", b""),
        Case(
            "a first line that is not a header",
            b"this line is not a header\r\n" + HEAD + b"Subject: x\r\n\r\nbody\r\n",
        ),
        Case(
            "broken MIME boundaries",
            HEAD + b"Subject: boundaries\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
            b"--outer\r\nContent-Type: multipart/alternative\r\n\r\nno boundary parameter at all\r\n"
            b'--outer\r\nContent-Type: multipart/related; boundary="never-used"\r\n\r\n'
            b"--not-the-boundary\r\nContent-Type: text/plain\r\n\r\nlost\r\n"
            b"--outer\r\nContent-Type: text/plain\r\n\r\nand the outer part is never closed\r\n",
        ),
        Case(
            "8-bit garbage, NUL and lone CR, in headers and body",
            HEAD + b"Subject: \xff\xfe\x80 caf\xe9 \x00 nul\r\nX-Gar\xc3\x28bage: a\rb\r\n\r\n" + garbage(rng, 20_000),
        ),
        Case(
            "invalid encodings",
            b"From: =?utf-8?B?!!!not*base64!!!?= <ann@sender.example>\r\nTo: help@acme.example\r\n"
            b"Subject: =?x-no-such-charset?Q?caf=E9?= =?utf-8?Q?broken=ZZ?= =?utf-8?B?w6k?=\r\n"
            b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"SGVsbG8*&^%$#@!===not=base64=\r\nQQ\r\n"
            b"--b\r\nContent-Type: text/plain; charset=x-no-such-charset\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9 =ZZ =\r\n"
            b"--b\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            b"\xc3\x28 \xff\xfe <b>invalid utf-8 in a 7bit part</b>\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: x-bogus\r\n\r\n"
            b"????\r\n--b--\r\n",
        ),
        Case("message/rfc822 nested ten deep", nested_rfc822(10)),
        Case(
            "a 10 MB header, folded",
            HEAD + b"Subject: big header\r\nX-Big: start" + fold * (ten_mb // len(fold)) + b"\r\n\r\nbody\r\n",
        ),
        Case(
            "a 10 MB header on one line",
            HEAD + b"Subject: big header\r\nX-Big: " + b"b" * ten_mb + b"\r\n\r\nbody\r\n",
        ),
    ]


@pytest.fixture
def inbound_env(env):
    with local_dns(env) as e:
        yield e


def stored_as(db, reply_text: str) -> tuple[dict, bytes] | None:
    """The inbound_messages row and the raw copy of the message a 250 names."""
    found = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", reply_text)
    if found is None:
        return None
    rows = db.execute(
        "SELECT m.*, r.data AS raw FROM inbound_messages m"
        " JOIN raw_messages r ON (r.tenant, r.sha256) = (m.tenant, m.sha256) WHERE m.id = %s",
        (found.group(0),),
    )
    cols = [c.name for c in rows.description or []]
    row = rows.fetchone()
    if row is None:
        return None
    message = dict(zip(cols, row))
    return message, bytes(message.pop("raw"))


def defects_of(db, message: dict) -> tuple[list[str], list[str]]:
    """What the server found wrong with a stored message, as inbound_messages.defects and as the
    `defects` of its MessageReceived event (the read model and the log must agree)."""
    [(event,)] = db.execute(
        "SELECT data FROM events WHERE type = 'MessageReceived' AND data->>'message_id' = %s", (str(message["id"]),)
    ).fetchall()
    return list(message["defects"]), list(event["defects"])


def send(port: int, data: bytes) -> tuple[int, str] | str:
    """The reply to the end of the message, or how the session failed."""
    try:
        with RawSMTP(port, timeout=120) as c:
            replies = [c.command("EHLO client.test"), *c.send("ann@sender.example", [MAILBOX], data)]
    except Dropped:
        return "the connection was dropped"
    except OSError as exc:
        return f"the connection failed: {exc}"
    if any(code != 250 for code, _ in replies[:-1]):
        return f"the envelope was refused: {replies}"
    return replies[-1]


def problems_with(server: Inbound, db, case: Case) -> list[str]:
    """What is wrong with how the server took this message (nothing, if it is right)."""
    before = received(db)
    reply = send(server.port, case.data)
    found = []
    if isinstance(reply, str):
        found.append(f"{case.name}: {reply}")
    else:
        code, text = reply
        new = received(db) - before
        if code == 250:
            copy = stored_as(db, text)
            if copy is None or new != 1:
                found.append(f"{case.name}: 250 {text}, but {new} messages were stored and none by that id")
            elif not copy[1].endswith(as_sent(case.data)):  # the server may put a trace header in front
                found.append(f"{case.name}: 250, but the stored copy is not the message sent")
            elif [] in defects_of(db, copy[0]):  # each of these is malformed
                found.append(f"{case.name}: stored, but not marked malformed: {defects_of(db, copy[0])}")
        elif not 500 <= code < 600:
            found.append(f"{case.name}: {code} {text} (a message is answered 250 or 5xx)")
        elif text.startswith("Error: ("):  # aiosmtpd's answer when a handler raised
            found.append(f"{case.name}: the handler crashed: {code} {text}")
        elif new:
            found.append(f"{case.name}: refused with {code} {text}, but stored")
    if not server.alive():
        return [*found, f"{case.name}: the server died:\n{server.log()}"]
    after = send(server.port, GOOD)
    if not (isinstance(after, tuple) and after[0] == 250):
        found.append(f"{case.name}: the next good message got {after}")
    elif (good := stored_as(db, after[1])) is None or defects_of(db, good[0]) != ([], []):
        found.append(f"{case.name}: the next good message is not stored as well-formed: {good}")
    return found


def test_each_malformed_message_gets_250_or_5xx_and_the_server_answers_the_next_one_with_250(
    procs, inbound_env, acme, db
):
    server = start_inbound(procs, inbound_env)
    problems = [p for case in cases() for p in problems_with(server, db, case)]
    assert problems == [], "\n".join(problems)
    assert server.alive()


GARBAGE_COMMANDS = [
    b"MAIL FROM:<\xff\xfe@sender.example>",
    b"MAIL FROM:<ann@sender.example> BODY=\xc3\x28",
    b"RCPT TO:<\xc3\x28@acme.example>",
    b"\x00\x01\x02 \xff garbage",
]


def test_8_bit_garbage_in_a_command_gets_a_5xx_and_the_session_goes_on(procs, inbound_env, acme):
    server = start_inbound(procs, inbound_env)
    for command in GARBAGE_COMMANDS:
        with RawSMTP(server.port) as c:
            c.command("EHLO client.test")
            if command.startswith(b"RCPT"):
                assert c.command("MAIL FROM:<ann@sender.example>")[0] == 250
            code, text = c.command(command)
            assert 500 <= code < 600 and not text.startswith("Error: ("), (command, code, text)
            assert c.command("RSET")[0] == 250
            assert c.send("ann@sender.example", [MAILBOX], GOOD)[-1][0] == 250, command
    assert server.alive()


def test_the_consumers_take_the_stored_malformed_messages_without_a_dead_letter_or_a_restart(
    procs, inbound_env, acme, db, operator_rt
):
    """`mailflow up` runs every consumer over the MessageReceived events of the malformed
    messages: each consumer reaches the head of the log, with no dead letter, and no child of
    `up` is restarted (a consumer that crashed on one would be)."""
    from mailflow.runtime.projections import lag

    server = start_inbound(procs, inbound_env)
    replies = [send(server.port, case.data) for case in cases()]
    stored = received(db)
    assert stored == sum(1 for r in replies if isinstance(r, tuple) and r[0] == 250) >= 5, replies
    consumers = [args[1] for _, args in pipeline_parts() if args[0] == "consume"]
    up = procs.start("up", env=dict(inbound_env, MAILFLOW_INBOUND_PORT=str(free_port())))

    def caught_up() -> bool:
        assert up.poll() is None, procs.log_of(up)[-3000:]
        rows = {r.name: r for r in lag(operator_rt)}
        return all(c in rows and rows[c].lag == 0 for c in consumers)

    wait_until(caught_up, 60, 0.2, f"the consumers {consumers} to reach the head of the log")
    rows = {r.name: r for r in lag(operator_rt)}
    assert all(rows[c].dead_letters == 0 for c in consumers), {c: rows[c] for c in consumers}
    log = procs.log_of(up)
    assert '"supervisor.child_exited"' not in log and '"supervisor.child_failed"' not in log, log[-3000:]
    counted = db.execute("SELECT sum(count) FROM event_counts WHERE type = 'MessageReceived'").fetchone()[0]
    assert counted == stored  # the consumer did count each of them
