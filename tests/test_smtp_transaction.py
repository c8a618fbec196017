"""One SMTP transaction without aiosmtplib's sendmail(): MAIL/RCPT/DATA against a real aiosmtpd server."""

from __future__ import annotations

import asyncio
import socket

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller

from mailflow.outbound import smtp

pytestmark = pytest.mark.integration

MESSAGE = b"Subject: hi\r\nMessage-ID: <1@example.org>\r\n\r\n.leading dot\r\nbody\r\n"


class Recorder:
    """Refuses the MAIL FROM, RCPT TO or DATA of addresses that ask for it; records the rest."""

    def __init__(self) -> None:
        self.mail_options: list[list[str]] = []
        self.accepted: list[tuple[str, list[str], bytes]] = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mail_options.append(mail_options)
        if address.startswith("refused"):
            return "550 5.7.1 sender refused"
        envelope.mail_from, envelope.mail_options = address, mail_options
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if envelope.rcpt_tos[0].startswith("spam"):
            return "554 5.6.0 content rejected"
        self.accepted.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 queued as 42"


@pytest.fixture(params=[True, False], ids=["smtputf8", "ascii-only"])
def server(request):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handler = Recorder()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=request.param)
    controller.start()
    try:
        yield handler, port, request.param
    finally:
        controller.stop()


def run(port: int, steps):
    async def main():
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
        await client.connect()
        try:
            return [await step(client) for step in steps]
        finally:
            client.close()

    return asyncio.run(main())


async def outcome(coro):
    try:
        reply = await coro
        return ("ok", reply.code, reply.message)
    except aiosmtplib.SMTPResponseException as exc:
        return (type(exc).__name__, exc.code, exc.message)
    except aiosmtplib.SMTPNotSupported as exc:
        return ("SMTPNotSupported", None, str(exc))


def test_each_refusal_is_raised_with_the_servers_reply_and_the_session_stays_usable(server):
    handler, port, _ = server
    send = lambda mail_from, rcpt: lambda c: outcome(smtp.transact(c, mail_from, rcpt, MESSAGE))  # noqa: E731
    results = run(
        port,
        [
            send("refused@example.org", "ann@example.net"),
            send("bounces@example.org", "nobody@example.net"),
            send("bounces@example.org", "spam@example.net"),
            send("bounces@example.org", "ann@example.net"),  # same session, after three refusals
        ],
    )
    assert [r[:2] for r in results] == [
        ("SMTPSenderRefused", 550),
        ("SMTPRecipientRefused", 550),
        ("SMTPDataError", 554),
        ("ok", 250),
    ]
    assert "5.1.1" in results[1][2] and "queued as 42" in results[3][2]
    [(mail_from, rcpts, content)] = handler.accepted
    assert (mail_from, rcpts) == ("bounces@example.org", ["ann@example.net"])
    assert content == MESSAGE  # dot-stuffing undone by the server: the bytes arrive as built


def test_size_is_declared_and_internationalised_addresses_need_smtputf8(server):
    handler, port, utf8_offered = server
    results = run(port, [lambda c: outcome(smtp.transact(c, "bounces@example.org", "jörg@example.net", MESSAGE))])
    if utf8_offered:
        assert results[0][0] == "ok"
        assert handler.mail_options[-1] == [f"SIZE={len(MESSAGE)}", "SMTPUTF8"]
    else:
        assert results[0][0] == "SMTPNotSupported"
        assert handler.mail_options == []  # nothing was sent for it
    run(port, [lambda c: outcome(smtp.transact(c, "bounces@example.org", "ann@example.net", MESSAGE))])
    assert handler.mail_options[-1] == [f"SIZE={len(MESSAGE)}"]


@pytest.mark.parametrize(
    "address", ["", "no-at-sign", "a b@example.net", "a@example.net>\r\nRCPT TO:<x@y", "<a@example.net>"]
)
def test_addresses_that_would_break_the_envelope_are_refused_before_sending(address):
    with pytest.raises(ValueError, match="envelope address"):
        smtp.check_address(address)


def test_an_urgent_message_gets_the_next_free_session_before_earlier_waiters(server):
    from mailflow.outbound.senders import parse_relay_url
    from mailflow.outbound.worker import RelayPool

    _, port, _ = server

    async def main():
        pool = RelayPool(parse_relay_url(f"smtp://127.0.0.1:{port}?tls=none&timeout=5"), size=1)
        order = []
        held = await pool.acquire()

        async def wait_turn(name, urgent):
            client = await pool.acquire(urgent=urgent)
            order.append(name)
            await asyncio.sleep(0.01)
            await pool.release(client, True)

        waiters = [asyncio.create_task(wait_turn(f"normal-{i}", False)) for i in range(3)]
        await asyncio.sleep(0.05)
        waiters.append(asyncio.create_task(wait_turn("urgent", True)))
        await asyncio.sleep(0.05)
        await pool.release(held, True)
        await asyncio.wait_for(asyncio.gather(*waiters), 5)
        await pool.close()
        return order

    assert asyncio.run(main()) == ["urgent", "normal-0", "normal-1", "normal-2"]
