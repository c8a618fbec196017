"""Outbound room: turn a rendered template into the bytes sent over SMTP.

Built with the standard library's email package (its compat32 MIME classes, for speed): multipart/alternative (text, then HTML),
a Message-ID derived from the job id (stable across retries, so replies and bounces can be
matched to the job), a VERP return path, RFC 8058 one-click List-Unsubscribe headers on
campaign mail, and a DKIM signature when the sender has a key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.header import Header
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.policy import Compat32
from email.utils import format_datetime, formataddr
from html import unescape
from io import BytesIO

import dkim

from . import tokens
from .senders import Sender
from .templates import Rendered



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
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
                  b"list-unsubscribe", b"list-unsubscribe-post"]


@dataclass(frozen=True)
class Outgoing:
    """What the SMTP session needs: envelope sender and recipient, and the message bytes."""

    mail_from: str
    rcpt_to: str
    data: bytes
    message_id: str


def message_id(job_id: str, domain: str) -> str:
    return f"<{job_id}@{domain}>"


def job_from_message_id(value: str) -> str | None:
    """The job id in a Message-ID (or In-Reply-To/References entry) we generated, else None."""
    inner = value.strip().strip("<>")
    return inner.split("@", 1)[0] if "@" in inner else None


def unsubscribe_token(secret: bytes, email: str, campaign_id: str) -> str:
    return tokens.sign(secret, f"{campaign_id}:{email}")


_UTF8_QP = Charset("utf-8")
_UTF8_QP.header_encoding = QP
_UTF8_QP.body_encoding = QP


def _text_part(body: str, subtype: str) -> MIMENonMultipart:
    part = MIMENonMultipart("text", subtype)
    part.set_payload(body, _UTF8_QP)  # sets charset and Content-Transfer-Encoding
    return part


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
    # The compat32 email.mime classes: the same RFC 5322/2045 output as EmailMessage with
    # the SMTP policy, at a fraction of the cost (this runs once per recipient).
    text = rendered.text or _text_from_html(rendered.html)
    if rendered.html:
        # A boundary of our own: the generator would otherwise compile a new regular
        # expression per message to check a random one against the body.
        msg: MIMEBase = MIMEMultipart("alternative", boundary=_boundary(job_id, text, rendered.html))
        msg.attach(_text_part(text, "plain"))
        msg.attach(_text_part(rendered.html, "html"))
    else:
        msg = _text_part(text, "plain")
    msg["From"] = formataddr((sender.from_name or "", sender.from_email), "utf-8")
    msg["To"] = to
    msg["Subject"] = _header(rendered.subject)
    msg["Date"] = format_datetime(now or datetime.now(timezone.utc))
    mid = message_id(job_id, sender.domain)
    msg["Message-ID"] = mid
    if campaign_id is not None:
        token = unsubscribe_token(secret, to, campaign_id)
        targets = [f"<mailto:unsubscribe+{token}@{sender.domain}>"]
        if unsubscribe_base_url:
            targets.insert(0, f"<{unsubscribe_base_url.rstrip('/')}/{token}>")
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["List-Unsubscribe"] = ", ".join(targets)
        msg["X-Mailflow-Campaign"] = campaign_id
    buf = BytesIO()
    BytesGenerator(buf, mangle_from_=False, policy=SMTP_COMPAT).flatten(msg)
    data = buf.getvalue()
    if sender.dkim_selector and sender.dkim_key_pem:
        signature = dkim.sign(
            data,
            sender.dkim_selector.encode(),
            sender.domain.encode(),
            sender.dkim_key_pem.encode(),
            include_headers=[h for h in SIGNED_HEADERS if msg.get(h.decode()) is not None],
        )
        data = signature + data
    return Outgoing(
        mail_from=tokens.verp_address(secret, job_id, sender.domain),
        rcpt_to=to,
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
