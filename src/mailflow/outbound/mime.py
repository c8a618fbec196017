"""Outbound room: turn a rendered template into the bytes sent over SMTP.

A multipart/alternative message (text, then HTML) or a single text part, each UTF-8 in
quoted-printable (7-bit clean); a Message-ID derived from the job id (stable across
retries, so replies and bounces can be matched to the job); a VERP return path; RFC 8058
one-click List-Unsubscribe headers on campaign mail; and a DKIM signature when the sender
has a key.

The encoding is the standard library's email package: headers folded and RFC 2047-encoded
by its compat32 policy and Header class, bodies by its quoted-printable codec, addresses
and dates by email.utils. Only the fixed MIME skeleton around them is written here,
because flattening a Message object tree costs three times as much, and this runs once
per recipient. tests/test_mime_senders.py checks that the bytes equal what the email
package's own MIME classes and BytesGenerator produce for the same message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email import quoprimime
from email.header import Header
from email.policy import Compat32
from email.utils import format_datetime, formataddr
from html import unescape

import dkim

from mailflow.mail import tokens
from mailflow.mail.message_ids import message_id
from mailflow.outbound.senders import Sender
from mailflow.outbound.smtp import check_address
from mailflow.outbound.templates import Rendered


class _SmtpCompat32(Compat32):
    """compat32 with CRLF, and a short plain ASCII header written as is.

    Compat32 folds every header through email.header.Header, which is most of the cost of
    a message; a value that is ASCII, has no line break and fits in one line folds to
    itself, so it skips that work. Anything else is folded by Compat32 as before.
    """

    def fold_binary(self, name: str, value) -> bytes:
        if (
            type(value) is str
            and value.isascii()
            and len(name) + len(value) + 2 <= (self.max_line_length or 998)
            and "\n" not in value
            and "\r" not in value
            and value == value.strip()
        ):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


SMTP_COMPAT = _SmtpCompat32(linesep="\r\n")
SIGNED_HEADERS = [
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
]


@dataclass(frozen=True)
class Outgoing:
    """What the SMTP session needs: envelope sender and recipient, and the message bytes."""

    mail_from: str
    rcpt_to: str
    data: bytes
    message_id: str


def unsubscribe_token(secret: bytes, email: str, campaign_id: str) -> str:
    return tokens.sign(secret, f"{campaign_id}:{email}")


PART_HEADERS = {
    subtype: b"".join(
        SMTP_COMPAT.fold_binary(name, value)
        for name, value in (
            ("MIME-Version", "1.0"),
            ("Content-Type", f'text/{subtype}; charset="utf-8"'),
            ("Content-Transfer-Encoding", "quoted-printable"),
        )
    )
    for subtype in ("plain", "html")
}


def _qp(body: str) -> bytes:
    """UTF-8 text as a quoted-printable body with CRLF line ends (the email package's codec)."""
    return quoprimime.body_encode(body.encode("utf-8").decode("latin-1")).replace("\n", "\r\n").encode("ascii")


def _header(value: str) -> str | Header:
    return value if value.isascii() else Header(value, "utf-8")


def build(
    *,
    job_id: str,
    sender: Sender,
    to: str,
    rendered: Rendered,
    secret: bytes,
    campaign_id: str | None = None,
    unsubscribe_base_url: str | None = None,
    now: datetime | None = None,
) -> Outgoing:
    text = rendered.text or _text_from_html(rendered.html)
    if rendered.html:
        boundary = _boundary(job_id, text, rendered.html)
        headers: list[tuple[str, str | Header]] = [
            ("Content-Type", f'multipart/alternative; boundary="{boundary}"'),
            ("MIME-Version", "1.0"),
        ]
        body = b"".join(
            (
                b"--",
                boundary.encode(),
                b"\r\n",
                PART_HEADERS["plain"],
                b"\r\n",
                _qp(text),
                b"\r\n--",
                boundary.encode(),
                b"\r\n",
                PART_HEADERS["html"],
                b"\r\n",
                _qp(rendered.html),
                b"\r\n--",
                boundary.encode(),
                b"--\r\n",
            )
        )
    else:
        headers = [
            ("MIME-Version", "1.0"),
            ("Content-Type", 'text/plain; charset="utf-8"'),
            ("Content-Transfer-Encoding", "quoted-printable"),
        ]
        body = _qp(text)
    mid = message_id(job_id, sender.domain)
    headers += [
        ("From", formataddr((sender.from_name or "", sender.from_email), "utf-8")),
        ("To", to),
        ("Subject", _header(rendered.subject)),
        ("Date", format_datetime(now or datetime.now(UTC))),
        ("Message-ID", mid),
    ]
    if campaign_id is not None:
        token = unsubscribe_token(secret, to, campaign_id)
        targets = [f"<mailto:unsubscribe+{token}@{sender.domain}>"]
        if unsubscribe_base_url:
            targets.insert(0, f"<{unsubscribe_base_url.rstrip('/')}/{token}>")
            headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        headers.append(("List-Unsubscribe", ", ".join(targets)))
        headers.append(("X-Mailflow-Campaign", campaign_id))
    data = b"".join(SMTP_COMPAT.fold_binary(name, value) for name, value in headers) + b"\r\n" + body
    if sender.dkim_selector and sender.dkim_key_pem:
        signature = dkim.sign(
            data,
            sender.dkim_selector.encode(),
            sender.domain.encode(),
            sender.dkim_key_pem.encode(),
            include_headers=[h for h in SIGNED_HEADERS if h.decode() in {n.lower() for n, _ in headers}],
        )
        data = signature + data
    return Outgoing(
        mail_from=check_address(tokens.verp_address(secret, job_id, sender.domain)),
        rcpt_to=check_address(to),
        data=data,
        message_id=mid,
    )


def _boundary(job_id: str, *bodies: str) -> str:
    boundary = f"=_mailflow_{job_id}"
    while any(boundary in body for body in bodies):  # only a body quoting it can collide
        boundary += "_"
    return boundary


def _text_from_html(html: str) -> str:
    """A plain-text part for HTML-only templates (crude, but better than none)."""
    text = re.sub(r"(?is)<(script|style).*?</\1>", "", html)
    text = re.sub(r"(?i)<br\s*/?>|</p>|</div>|</h\d>|</li>", "\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    return unescape(re.sub(r"\n{3,}", "\n\n", text)).strip() + "\n"
