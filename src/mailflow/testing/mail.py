"""Testing: mail that comes back, as real servers write it - DSNs in a few MTAs' formats, an ARF
complaint, out-of-office answers and human replies - for the demo, the benchmarks and the tests.

Each builder answers one of mailflow's messages: give it what that message carried (its
Message-ID, its VERP return path, its From and To) and it returns the bytes a remote server or
person would send back. The formats follow what Postfix, Exim and Gmail actually send (see the
corpus in ../shared/corpus for the originals); nothing here is parsed by mailflow's code.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

CRLF = "\r\n"


@dataclass(frozen=True)
class Sent:
    """What one of mailflow's messages carried, as the other side saw it."""

    message_id: str  # <job@domain>
    return_path: str  # bounces+<token>@domain
    sender: str  # From address
    to: str
    subject: str = "News"


def _date() -> str:
    return format_datetime(datetime.now(UTC))


def _mid(domain: str) -> str:
    return f"<{uuid.uuid4().hex}@{domain}>"


def _lines(*lines: str) -> bytes:
    return (CRLF.join(lines) + CRLF).encode()


def _original_headers(sent: Sent) -> list[str]:
    return [
        f"Return-Path: <{sent.return_path}>",
        f"From: {sent.sender}",
        f"To: {sent.to}",
        f"Subject: {sent.subject}",
        f"Message-ID: {sent.message_id}",
    ]


def postfix_dsn(sent: Sent, status: str = "5.1.1", reply: str = "550", diagnostic: str = "") -> bytes:
    """A Postfix delivery status notification (RFC 3464), as its bounce daemon writes it."""
    host = sent.to.rpartition("@")[2]
    text = diagnostic or {
        "5.1.1": f"<{sent.to}>: Recipient address rejected: User unknown in virtual mailbox table",
        "4.2.2": f"<{sent.to}>: Mailbox full, try again later",
        "5.7.1": "Service unavailable; Client host [192.0.2.10] blocked using zen.spamhaus.org",
    }.get(status, "delivery failed")
    action = "failed" if status.startswith("5") else "delayed"
    boundary = f"B{uuid.uuid4().hex[:12]}"
    return _lines(
        "Return-Path: <>",
        f"Date: {_date()}",
        "From: MAILER-DAEMON@mx.remote.example (Mail Delivery System)",
        f"To: {sent.return_path}",
        "Subject: Undelivered Mail Returned to Sender"
        if action == "failed"
        else "Subject: Delayed Mail (still being retried)",
        f"Message-ID: {_mid('mx.remote.example')}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "This is the mail system at host mx.remote.example.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients.",
        "",
        f"<{sent.to}>: host mx.{host}[198.51.100.7] said: {reply} {status} {text}",
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; mx.remote.example",
        f"Arrival-Date: {_date()}",
        "",
        f"Final-Recipient: rfc822; {sent.to}",
        f"Original-Recipient: rfc822;{sent.to}",
        f"Action: {action}",
        f"Status: {status}",
        f"Remote-MTA: dns; mx.{host}",
        f"Diagnostic-Code: smtp; {reply} {status} {text}",
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "",
        *_original_headers(sent),
        "",
        f"--{boundary}--",
    )


def exim_bounce(sent: Sent, reply: str = "550", text: str = "No Such User Here") -> bytes:
    """Exim's own (not RFC 3464) bounce: the failed address and the remote answer in the text,
    the original message quoted after a separator."""
    host = sent.to.rpartition("@")[2]
    return _lines(
        "Return-path: <>",
        f"Date: {_date()}",
        "From: Mail Delivery System <Mailer-Daemon@relay.remote.example>",
        f"To: {sent.return_path}",
        "Subject: Mail delivery failed: returning message to sender",
        f"Message-Id: {_mid('relay.remote.example')}",
        "X-Failed-Recipients: " + sent.to,
        "Auto-Submitted: auto-replied",
        "",
        "This message was created automatically by mail delivery software.",
        "",
        "A message that you sent could not be delivered to one or more of its",
        "recipients. This is a permanent error. The following address(es) failed:",
        "",
        f"  {sent.to}",
        f"    SMTP error from remote mail server after RCPT TO:<{sent.to}>:",
        f"    host mx.{host} [198.51.100.8]: {reply} {text}",
        "",
        "------ This is a copy of the message, including all the headers. ------",
        "",
        *_original_headers(sent),
        "",
        "Hello from the campaign.",
    )


def gmail_bounce(sent: Sent) -> bytes:
    """Gmail's 'Delivery Status Notification (Failure)': a DSN with Google's text."""
    boundary = f"G{uuid.uuid4().hex[:12]}"
    return _lines(
        "Return-Path: <>",
        f"Date: {_date()}",
        "From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>",
        f"To: {sent.return_path}",
        "Subject: Delivery Status Notification (Failure)",
        f"Message-ID: {_mid('mx.google.com')}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; boundary="{boundary}"; report-type=delivery-status',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=UTF-8",
        "",
        f"** Address not found **\r\n\r\nYour message wasn't delivered to {sent.to} because the address "
        "couldn't be found, or is unable to receive mail.",
        "",
        "The response from the remote server was:",
        f"550 5.1.1 The email account that you tried to reach does not exist. {sent.to}",
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; googlemail.com",
        "",
        f"Final-Recipient: rfc822; {sent.to}",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550-5.1.1 The email account that you tried to reach does not exist.",
        "",
        f"--{boundary}",
        "Content-Type: message/rfc822",
        "",
        *_original_headers(sent),
        "",
        "Hello from the campaign.",
        "",
        f"--{boundary}--",
    )


def arf_complaint(sent: Sent, feedback_type: str = "abuse", to: str = "") -> bytes:
    """An ARF (RFC 5965) abuse report from a mailbox provider's feedback loop."""
    boundary = f"A{uuid.uuid4().hex[:12]}"
    return _lines(
        f"Date: {_date()}",
        "From: Feedback Loop <fbl@provider.example>",
        f"To: {to or sent.return_path}",
        "Subject: Abuse report",
        f"Message-ID: {_mid('provider.example')}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "This is an email abuse report for an email message received from IP 192.0.2.10.",
        "",
        f"--{boundary}",
        "Content-Type: message/feedback-report",
        "",
        f"Feedback-Type: {feedback_type}",
        "User-Agent: ProviderFBL/1.0",
        "Version: 1",
        "Source-IP: 192.0.2.10",
        f"Original-Mail-From: <{sent.return_path}>",
        f"Original-Rcpt-To: <{sent.to}>",
        f"Arrival-Date: {_date()}",
        "",
        f"--{boundary}",
        "Content-Type: message/rfc822",
        "",
        *_original_headers(sent),
        "",
        "Hello from the campaign.",
        "",
        f"--{boundary}--",
    )


def out_of_office(sent: Sent, language: str = "en") -> bytes:
    """An RFC 3834 automatic answer from the recipient's mailbox."""
    subject = {"en": "Out of Office: ", "de": "Abwesenheitsnotiz: ", "fr": "Absence du bureau : "}[language]
    body = {
        "en": "I am out of the office until Monday and will answer when I am back.",
        "de": "Ich bin bis Montag nicht im Büro und antworte nach meiner Rückkehr.",
        "fr": "Je suis absent du bureau jusqu'à lundi.",
    }[language]
    return CRLF.join(
        [
            f"From: {sent.to}",
            f"To: {sent.sender}",
            f"Subject: {subject}{sent.subject}",
            f"Date: {_date()}",
            f"Message-ID: {_mid(sent.to.rpartition('@')[2])}",
            f"In-Reply-To: {sent.message_id}",
            f"References: {sent.message_id}",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            "",
            body,
            "",
        ]
    ).encode()


def reply(sent: Sent, text: str, *, references: bool = True, sender: str = "", subject: str = "") -> bytes:
    """A person's answer, with the quoted original below it (and, unless `references` is
    false, In-Reply-To and References, which some clients drop)."""
    who = sender or sent.to
    headers = [
        f"From: {who}",
        f"To: {sent.sender}",
        f"Subject: {subject or 'Re: ' + sent.subject}",
        f"Date: {_date()}",
        f"Message-ID: {_mid(who.rpartition('@')[2])}",
    ]
    if references:
        headers += [f"In-Reply-To: {sent.message_id}", f"References: {sent.message_id}"]
    quoted = [f"On {_date()}, {sent.sender} wrote:", "> Hello from the campaign.", ">", "> -- ", "> The team"]
    body = [text, "", "-- ", "Sent from my phone", "", *quoted]
    return CRLF.join([*headers, "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "", *body, ""]).encode()
