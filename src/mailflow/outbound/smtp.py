"""Outbound room: one SMTP mail transaction (MAIL, RCPT, DATA) on an open aiosmtplib session.

aiosmtplib's sendmail() parses both addresses again with email.utils, twice, which costs
about 50 us a message for a VERP return path: a tenth of a worker's time. The addresses
here were validated when they were stored (contacts, senders) or built (VERP), so this
sends the commands through aiosmtplib's public execute_command() and data() instead,
keeping what sendmail() does besides: SIZE when offered (RFC 1870), SMTPUTF8 for
internationalised addresses (RFC 6531), and RSET after a refusal so the session can be
reused.
"""

from __future__ import annotations

import aiosmtplib
from aiosmtplib import SMTPResponse

_FORBIDDEN = frozenset("<>\r\n \t")


def check_address(address: str) -> str:
    """An address that can go between <> in MAIL or RCPT; ValueError otherwise."""
    if not address or "@" not in address or not _FORBIDDEN.isdisjoint(address):
        raise ValueError(f"{address!r} cannot be used as an SMTP envelope address")
    return address


async def greet(client: aiosmtplib.SMTP) -> None:
    """EHLO (HELO for a server that refuses it) on a new session, as sendmail() would."""
    if client.is_ehlo_or_helo_needed:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            if not client.is_connected:
                raise
            await client.helo()


async def transact(client: aiosmtplib.SMTP, mail_from: str, rcpt_to: str, data: bytes) -> SMTPResponse:
    """Send one message to one recipient; returns the reply to the end of DATA.

    A refusal raises aiosmtplib's SMTPSenderRefused, SMTPRecipientRefused or SMTPDataError
    (all SMTPResponseException, with the server's code and text) after an RSET; a server
    without SMTPUTF8 for a non-ASCII address raises SMTPNotSupported before sending anything.
    """
    await greet(client)
    utf8 = not (mail_from.isascii() and rcpt_to.isascii())
    if utf8 and not client.supports_extension("smtputf8"):
        raise aiosmtplib.SMTPNotSupported("the server does not support SMTPUTF8, needed for a non-ASCII address")
    encoding = "utf-8" if utf8 else "ascii"
    options = [b"SIZE=%d" % len(data)] if client.supports_extension("size") else []
    if utf8:
        options.append(b"SMTPUTF8")
    reply = await client.execute_command(b"MAIL", b"FROM:<" + mail_from.encode(encoding) + b">", *options)
    if reply.code != 250:
        await _reset(client)
        raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, mail_from)
    reply = await client.execute_command(b"RCPT", b"TO:<" + rcpt_to.encode(encoding) + b">")
    if reply.code not in (250, 251):
        await _reset(client)
        raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt_to)
    try:
        return await client.data(data)
    except aiosmtplib.SMTPResponseException:
        await _reset(client)
        raise


async def _reset(client: aiosmtplib.SMTP) -> None:
    """Clear the envelope after a refusal; a session that cannot is closed, not reused."""
    try:
        reply = await client.execute_command(b"RSET")
        if reply.code == 250:
            return
    except (aiosmtplib.SMTPException, OSError):
        pass
    client.close()
