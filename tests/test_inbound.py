"""Inbound mail, part 1: who may be mailed here (never an open relay), the limits and their SMTP
replies, STARTTLS, and a 250 only for a message committed - with group commits."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import socket
import threading
from email.message import EmailMessage

import aiosmtplib
import pytest

from mailflow.inbound.server import Limits, serve
from mailflow.infra.net import listen
from mailflow.mail import tokens

from .conftest import wait_until

pytestmark = pytest.mark.process

SECRET = b"inbound-test-key"


class Server:
    """`serve()` in a thread, as `mailflow inbound` runs it, on a free port."""

    def __init__(self, store, limits: Limits, tls=None, secret: bytes = SECRET, **options) -> None:
        self.stop = threading.Event()
        self.port: int | None = None
        ready = threading.Event()

        def on_ready(port: int) -> None:
            self.port = port
            ready.set()

        self.thread = threading.Thread(
            target=serve,
            args=(store, "127.0.0.1", 0, self.stop),
            kwargs=dict(
                limits=limits,
                secret=[secret],
                hostname="mx.test",
                tls=tls,
                listen=listen,
                reload_s=0.2,
                ready=on_ready,
                **options,
            ),
            daemon=True,
        )
        self.thread.start()
        assert ready.wait(20), "the inbound server did not start"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def server(operator_store, acme):
    s = Server(operator_store, Limits(max_message_bytes=64 * 1024, max_recipients=3, max_connections_per_ip=4))
    yield s
    s.close()


def message(to: str = "help@acme.example", body: str = "Hello\r\n", sender: str = "ann@sender.example") -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, to, "Hi"
    m.set_content(body)
    return m.as_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


async def transaction(port: int, mail_from: str, rcpts: list[str], data: bytes | None) -> list[tuple[int, str]]:
    """MAIL, each RCPT and DATA one by one, every reply kept (a refusal does not stop it)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    replies = []
    try:
        await client.ehlo(hostname="client.test")
        r = await client.execute_command(f"MAIL FROM:<{mail_from}>".encode())
        replies.append((r.code, r.message))
        for rcpt in rcpts:
            r = await client.execute_command(f"RCPT TO:<{rcpt}>".encode())
            replies.append((r.code, r.message))
        if data is not None:
            try:
                r = await client.data(data)
                replies.append((r.code, r.message))
            except aiosmtplib.SMTPResponseException as exc:
                replies.append((exc.code, exc.message))
    finally:
        client.close()
    return replies


def raw_session(port: int, commands: list[str], data: bytes) -> list[str]:
    """An SMTP session over a bare socket: the bytes go as given (no client repairs them)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")

        def reply() -> str:
            lines = [f.readline().decode()]
            while lines[-1][3:4] == "-":
                lines.append(f.readline().decode())
            return lines[-1].strip()

        replies = [reply()]
        for command in ["EHLO client.test", *commands]:
            sock.sendall(command.encode() + b"\r\n")
            replies.append(reply())
        sock.sendall(data + b".\r\n")
        replies.append(reply())
        sock.sendall(b"QUIT\r\n")
    return replies


def run(coro):
    return asyncio.run(coro)


def test_a_250_means_the_message_and_its_event_are_committed(server, db):
    raw = message()
    replies = run(transaction(server.port, "ann@sender.example", ["help@acme.example", "Help+x@acme.example"], raw))
    assert [c for c, _ in replies] == [250, 250, 250, 250]
    stored = db.execute("SELECT tenant, sha256, size, data, sender_subject FROM raw_messages").fetchall()
    assert len(stored) == 1
    tenant, sha, size, data, subject = stored[0]
    assert tenant == "default" and sha == hashlib.sha256(bytes(data)).hexdigest() and bytes(data) == raw
    [(etype, event)] = db.execute("SELECT type, data FROM events WHERE type = 'MessageReceived'").fetchall()
    assert event["sha256"] == sha and event["recipients"] == ["help@acme.example", "help+x@acme.example"]
    assert event["sender_subject"] == subject and event["sealed"].startswith("s1.")
    assert "ann@sender.example" not in json.dumps(event) and event["client_ip"] is None  # sealed, not in clear
    assert db.execute("SELECT recipients FROM inbound_messages").fetchone()[0] == event["recipients"]


def test_a_bounce_to_the_verp_address_of_a_job_is_accepted_for_its_tenant(operator_store, acme, db):
    from mailflow.outbound import sending

    from .test_outbound_pipeline import setup_catalog

    setup_catalog(acme, "smtp://127.0.0.1:9?tls=none")
    job_id, _ = sending.send_transactional(
        acme, sender="tx", template="reset", to="x@example.net", variables={"name": "X", "code": "1"}
    )
    s = Server(operator_store, Limits())
    try:
        verp = tokens.verp_address(SECRET, job_id, "example.org")  # the sender's domain
        forged = tokens.verp_address(b"not-the-key", job_id, "example.org")
        replies = run(transaction(s.port, "", [verp, forged], message(sender="MAILER-DAEMON@mx.example.net")))
    finally:
        s.close()
    assert [c for c, _ in replies] == [250, 250, 550, 250]
    event = db.execute("SELECT data, metadata->>'tenant' FROM events WHERE type = 'MessageReceived'").fetchone()
    assert event[1] == "default" and event[0]["recipients"] == [verp]
    assert event[0]["sender_subject"] is None and event[0]["client_ip"] == "127.0.0.1"  # a machine's bounce


def test_foreign_recipients_are_refused_even_with_a_local_sender(server, db):
    replies = run(
        transaction(
            server.port,
            "help@acme.example",  # MAIL FROM a local address does not make mailflow relay
            ["victim@foreign.example", "victim%foreign.example@acme.example", "@acme.example:v@foreign.example"],
            None,
        )
    )
    assert replies[0][0] == 250 and all(c == 550 and m.startswith("5.7.1") for c, m in replies[1:])
    assert db.execute("SELECT count(*) FROM raw_messages").fetchone()[0] == 0


def test_limits_answer_with_the_right_codes(server, db):
    too_many = run(transaction(server.port, "a@b.example", [f"help+u{i}@acme.example" for i in range(5)], None))
    assert [c for c, _ in too_many] == [250, 250, 250, 250, 452, 452]
    big = message(body="x" * 70_000 + "\r\n")
    assert run(transaction(server.port, "a@b.example", ["help@acme.example"], big))[-1][0] == 552
    bare = b"From: a@b.example\r\nSubject: x\r\n\r\nline one\nline two\r\n"  # clients would fix it: a socket
    assert raw_session(server.port, ["MAIL FROM:<a@b.example>", "RCPT TO:<help@acme.example>", "DATA"], bare)[
        -1
    ].startswith("550 5.6.0")
    long_line = b"From: a@b.example\r\n\r\n" + b"x" * 1200 + b"\r\n"
    assert raw_session(server.port, ["MAIL FROM:<a@b.example>", "RCPT TO:<help@acme.example>", "DATA"], long_line)[
        -1
    ].startswith("500")
    assert db.execute("SELECT count(*) FROM raw_messages").fetchone()[0] == 0


def test_connections_beyond_the_per_ip_limit_are_told_421(server):
    async def main():
        held = []
        for _ in range(4):
            c = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=False, timeout=5)
            await c.connect()
            held.append(c)
        extra = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=False, timeout=5)
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
            await extra.connect()
        for c in held:
            c.close()
        return refused.value.code

    assert run(main()) == 421


def test_starttls_works_with_the_self_signed_certificate(operator_store, acme, tmp_path, db):
    from mailflow.inbound import tls

    cert, key = tls.self_signed(tmp_path, "mx.test")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    s = Server(operator_store, Limits(), tls=tls.context(cert, key))
    try:

        async def main():
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=s.port, start_tls=False, timeout=10, validate_certs=False
            )
            await client.connect()
            await client.ehlo()
            assert client.supports_extension("starttls")
            await client.starttls()
            await client.sendmail("a@b.example", ["help@acme.example"], message())
            client.close()

        run(main())
    finally:
        s.close()
    assert db.execute("SELECT tls FROM inbound_messages").fetchone()[0] is True


def test_many_sessions_at_once_are_committed_in_group_commits(operator_store, acme, db):
    s = Server(operator_store, Limits(max_connections_per_ip=100))
    n = 60
    try:

        async def one(i: int):
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=s.port, start_tls=False, timeout=20)
            await client.connect()
            errors, _ = await client.sendmail(f"s{i}@sender.example", ["help@acme.example"], message(body=f"n{i}\r\n"))
            client.close()
            return errors

        async def main():
            return await asyncio.gather(*(one(i) for i in range(n)))

        assert run(main()) == [{}] * n
    finally:
        s.close()
    assert db.execute("SELECT count(*) FROM raw_messages").fetchone()[0] == n
    txids = db.execute("SELECT count(DISTINCT txid) FROM events WHERE type = 'MessageReceived'").fetchone()[0]
    assert txids < n  # some transactions held several messages


def test_mailflow_inbound_runs_as_a_process_and_exits_0_on_sigterm(procs, env, acme):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    p = procs.start("inbound", "--port", str(port), env=env)

    def up() -> bool:
        assert p.poll() is None, procs.log_of(p)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(up, 30, what="`mailflow inbound` to listen")
    replies = run(transaction(port, "a@b.example", ["help@acme.example", "x@foreign.example"], message()))
    assert [c for c, _ in replies] == [250, 250, 550, 250]
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0, procs.log_of(p)
    log = procs.log_of(p)
    assert '"event": "inbound.start"' in log and '"event": "inbound.stop"' in log


def test_a_message_sent_again_after_its_250_was_lost_is_stored_once(operator_store, acme, db):
    from mailflow.inbound.store import Incoming, write

    def incoming() -> Incoming:
        return Incoming({"default": ["help@acme.example"]}, message(), "ann@sender.example", "127.0.0.1", "c", False)

    [first] = write(operator_store, [incoming()])  # committed; the reply never reached the client
    [again, twice] = write(operator_store, [incoming(), incoming()])  # its retry, and a copy in one batch
    assert first == again == twice
    assert db.execute("SELECT count(*) FROM events WHERE type = 'MessageReceived'").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM inbound_messages").fetchone()[0] == 1


def test_kill_9_mid_stream_stores_every_message_exactly_once(procs, env, acme, db):
    """10 sessions send 1,000 messages; the server is killed with SIGKILL part-way and started
    again. Every message the client saw a 250 for is stored, and after the client's retries
    every message is stored exactly once (one that was committed but whose 250 was lost is
    recognised when it comes again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    n = 1000
    acked: set[int] = set()
    attempts = {"retries": 0}

    async def client(work: asyncio.Queue) -> None:
        smtp = None
        while True:
            try:
                i = work.get_nowait()
            except asyncio.QueueEmpty:
                break
            try:
                if smtp is None:
                    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
                    await smtp.connect()
                errors, _ = await smtp.sendmail(
                    f"s{i}@sender.example", ["help@acme.example"], message(body=f"m{i}\r\n")
                )
                assert errors == {}
                acked.add(i)
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                attempts["retries"] += 1
                work.put_nowait(i)  # not acknowledged: the client keeps it and tries again
                if smtp is not None:
                    smtp.close()
                smtp = None
                await asyncio.sleep(0.2)
        if smtp is not None:
            await smtp.quit()

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    server = procs.start("inbound", "--port", str(port), env=env)
    wait_until(up, 30, what="`mailflow inbound` to listen")

    async def main() -> None:
        work: asyncio.Queue = asyncio.Queue()
        for i in range(n):
            work.put_nowait(i)
        clients = [asyncio.create_task(client(work)) for _ in range(10)]
        current = server
        for at in sorted(random.sample(range(100, 900), 3)):  # three kills, at random moments
            while len(acked) < at:  # noqa: ASYNC110 - polling the client's progress
                await asyncio.sleep(0.005)
            current.kill()  # SIGKILL, with sessions in the middle of DATA
            current.wait(10)
            acked_then = set(acked)
            stored = db.execute("SELECT count(*) FROM inbound_messages").fetchone()[0]
            assert stored >= len(acked_then)  # a 250 was sent only for a committed message
            current = procs.start("inbound", "--port", str(port), env=env)
            await asyncio.to_thread(wait_until, up, 30, 0.05, "`mailflow inbound` to listen again")
        await asyncio.gather(*clients)

    run(main())
    assert acked == set(range(n)) and attempts["retries"] > 0
    rows = db.execute("SELECT count(*), count(DISTINCT sha256) FROM inbound_messages").fetchone()
    assert rows == (n, n), rows  # exactly once
    assert db.execute("SELECT count(*) FROM raw_messages").fetchone()[0] == n
    assert db.execute("SELECT count(*) FROM events WHERE type = 'MessageReceived'").fetchone()[0] == n
