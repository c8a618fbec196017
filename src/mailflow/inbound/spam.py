"""Inbound room: the spam check - how spammy a received message is, and what that means for
its tenant (accept, quarantine, or reject before the 250).

Built-in rules (`builtin_rules`: the DMARC and SPF verdicts of authn.py, missing and
duplicate headers, the structural defects defects.py finds, executable attachments) and the
decision (`action`) are pure. The external scorers are thin protocol clients: `Spamd` speaks
SPAMC/1.5 to SpamAssassin's spamd, `Rspamd` posts to rspamd's /checkv2, both over asyncio
streams, so neither needs a client library. Points are on SpamAssassin's scale (rspamd's is
the same in practice), so one set of thresholds serves both, and the built-in points add to
either.

`Checker` puts them together and never raises. A scorer that is down, slow, or answers
nonsense costs the message its external score, not its delivery: it is accepted on the
built-in points alone and marked unscored, and the fault is logged (`inbound.spam_unscored`)
and counted (`Checker.counts`), because losing or bouncing mail over a broken filter is worse
than letting one spam through to be quarantined by hand. A message larger than the
scorer's limit is scored by the built-in rules alone too (spamc does the same), but that
is a choice, not a fault: `too_large`, not unscored.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import ssl
import time
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from email import errors as email_errors
from email import policy as email_policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from typing import Any, Protocol
from urllib.parse import urlsplit

from mailflow.errors import ConfigurationError, UserError
from mailflow.inbound import defects
from mailflow.log import get_logger

log = get_logger("mailflow.inbound.spam")

REJECT_REPLY = "550 5.7.1 The message was refused as spam"

# -- the decision ----------------------------------------------------------------------------


class AuthFacts(Protocol):
    """The authentication verdicts the spam check reads (inbound/authn.py's Verdicts):
    RFC 8601 result words ("pass", "fail", "softfail", "none", ...) and the From domain's
    DMARC policy ("reject", "quarantine", "none"), if it publishes one. Read-only, so that
    frozen dataclasses (Verdicts is one) satisfy it."""

    @property
    def spf(self) -> str: ...

    @property
    def dmarc(self) -> str: ...

    @property
    def dmarc_policy(self) -> str | None: ...


@dataclass(frozen=True)
class Score:
    score: float  # total points: built-in plus external
    rules: tuple[str, ...]  # the rules that hit: built-in by name, external prefixed ("SPAMD:GTUBE")
    scorer: str  # "builtin" (no external scorer asked), "spamd", "rspamd"
    unscored: bool = False  # the external scorer was down, slow or broken: only built-in points count
    error: str | None = None  # why unscored
    too_large: bool = False  # over the scorer's size limit: built-in points only, by choice
    builtin: float = 0.0  # the built-in part of `score`

    def to_event(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 3),
            "rules": list(self.rules),
            "scorer": self.scorer,
            "unscored": self.unscored,
            "error": self.error,
            "too_large": self.too_large,
            "builtin": round(self.builtin, 3),
        }


@dataclass(frozen=True)
class Thresholds:
    """A tenant's: at or above `quarantine` a message is held; at or above `reject` it is
    refused with 550 before the 250, so there is no bounce to send (no backscatter).
    "At or above" is SpamAssassin's and rspamd's own reading of a threshold."""

    quarantine: float = 5.0
    reject: float = 15.0

    def __post_init__(self) -> None:
        if self.reject < self.quarantine:
            raise UserError(
                f"the spam reject threshold ({self.reject}) is below the quarantine threshold ({self.quarantine}): "
                "every message that would be held would be refused instead; raise reject or lower quarantine"
            )


def action(score: Score, thresholds: Thresholds) -> str:
    """The tenant's verdict: "reject", "quarantine" or "accept". An unscored message is judged
    on its built-in points: a failed DMARC p=reject is refused whether or not spamd is up."""
    if score.score >= thresholds.reject:
        return "reject"
    if score.score >= thresholds.quarantine:
        return "quarantine"
    return "accept"


# -- built-in rules --------------------------------------------------------------------------

# Points on SpamAssassin's scale, chosen so that the default thresholds (5, 15) do what the
# sender's domain asks: a DMARC failure under p=reject is refused, under p=quarantine held.
POINTS: dict[str, float] = {
    "DMARC_REJECT": 15.0,  # DMARC failed and the domain says reject
    "DMARC_QUARANTINE": 5.0,  # DMARC failed and the domain says quarantine
    "DMARC_FAIL_NONE": 1.0,  # DMARC failed under p=none (monitoring): a hint, no more
    "SPF_FAIL": 2.0,
    "SPF_SOFTFAIL": 0.7,
    "HDR_MISSING_FROM": 2.5,  # RFC 5322 requires From and Date
    "HDR_MISSING_DATE": 1.5,
    "HDR_MISSING_MESSAGE_ID": 0.5,  # only SHOULD, but every real mail client sets one
    "HDR_DUPLICATE_FROM": 4.0,  # two From headers: the classic way to show one and authenticate another
    "HDR_DUPLICATE": 1.0,  # another header that may appear only once (RFC 5322 section 3.6) does twice
    "HDR_DEFECT": 1.5,  # a header python's parser had to repair or could not parse
    "MIME_DEFECT": 1.0,  # broken MIME structure: missing boundaries, bad base64
    "HDR_8BIT": 1.5,  # raw non-ASCII in the header section without RFC 2047 encoding (or not UTF-8)
    "EXEC_ATTACHMENT": 10.0,  # an executable or script attached, by name, type or content
    "EXEC_IN_ZIP": 8.0,  # an executable or script inside an attached zip
}

_SINGLETONS = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "subject",
)
_ADDRESS_HEADERS = ("from", "sender", "reply-to", "to", "cc", "bcc")
_PARSED_HEADERS = (*_ADDRESS_HEADERS, "date", "message-id")

# Files that run when opened on Windows (or anywhere, for scripts and jars), and disk images
# that mount with them inside: what mail filters at large providers refuse outright.
EXECUTABLE_EXTENSIONS = frozenset(
    {
        "exe",
        "scr",
        "com",
        "pif",
        "bat",
        "cmd",
        "js",
        "jse",
        "vbs",
        "vbe",
        "wsf",
        "wsh",
        "hta",
        "ps1",
        "psm1",
        "msi",
        "msp",
        "msc",
        "jar",
        "cpl",
        "lnk",
        "reg",
        "scf",
        "dll",
        "sys",
        "gadget",
        "inf",
        "application",
        "appref-ms",
        "sh",
        "iso",
        "img",
        "vhd",
        "vhdx",
    }
)
EXECUTABLE_TYPES = frozenset(
    (
        "application/x-msdownload",
        "application/x-msdos-program",
        "application/x-dosexec",
        "application/x-executable",
        "application/vnd.microsoft.portable-executable",
        "application/x-ms-installer",
        "application/x-msi",
        "application/x-ms-shortcut",
        "application/java-archive",
        "application/x-java-archive",
        "application/hta",
        "application/x-bat",
        "application/x-sh",
        "application/x-vbscript",
        "application/x-javascript",
    )
)
_ZIP_TYPES = frozenset(("application/zip", "application/x-zip-compressed", "application/x-zip"))
_MAX_ZIP_BYTES = 10 * 1024 * 1024  # larger archives are not opened (their central directory is at the end)

# defects.find()'s names for a broken header section; the rest of its names are MIME's.
_HEADER_DEFECTS = frozenset(
    {
        "no_headers",
        "no_body_separator",
        "header_too_long",
        "MissingHeaderBodySeparatorDefect",
        "MalformedHeaderDefect",
        "FirstHeaderLineIsContinuationDefect",
    }
)


def builtin_rules(
    data: bytes, auth: AuthFacts, *, smtputf8: bool = False, defect_names: Sequence[str] | None = None
) -> list[tuple[str, float]]:
    """The built-in rules that hit, with their points (see POINTS), in a stable order.

    Pure and total: any bytes give an answer, because a message the parser chokes on is
    malformed, not a reason to lose it. `smtputf8` says the client sent SMTPUTF8, which
    makes raw UTF-8 in headers legal (RFC 6532). `defect_names` is defects.find(data) when
    the caller has it already (the server does), to spare a second parse."""
    hits = _authentication_rules(auth)
    try:  # the headers alone first: a body is parsed only when it can hold an attachment
        head = BytesHeaderParser(policy=email_policy.default).parsebytes(defects.header_block(data))
        found = set(defects.find(data) if defect_names is None else defect_names)
        hits += _header_rules(data, head, smtputf8, found)
        if _may_attach(head):
            hits += _attachment_rules(BytesParser(policy=email_policy.default).parsebytes(data))
    except Exception:  # noqa: BLE001 - the parser gave up: that is the defect, and nothing else can be read
        return _points(hits + ["HDR_DEFECT"])
    return _points(hits)


def _may_attach(head: EmailMessage) -> bool:
    """Whether the body can hold an attachment: anything but a single inline text part."""
    return head.get_content_maintype() != "text" or head.get("Content-Disposition") is not None


def _points(hits: list[str]) -> list[tuple[str, float]]:
    return [(name, POINTS[name]) for name in dict.fromkeys(hits)]


def _authentication_rules(auth: AuthFacts) -> list[str]:
    hits = []
    dmarc = (auth.dmarc or "").strip().lower()
    policy = (auth.dmarc_policy or "").strip().lower()
    if dmarc == "fail":
        hits.append({"reject": "DMARC_REJECT", "quarantine": "DMARC_QUARANTINE"}.get(policy, "DMARC_FAIL_NONE"))
    spf = (auth.spf or "").strip().lower()
    if spf == "fail":
        hits.append("SPF_FAIL")
    elif spf == "softfail":
        hits.append("SPF_SOFTFAIL")
    return hits


def _header_rules(data: bytes, message: EmailMessage, smtputf8: bool, found: set[str]) -> list[str]:
    hits = []
    names = [name.lower() for name in message]
    for name, rule in (
        ("from", "HDR_MISSING_FROM"),
        ("date", "HDR_MISSING_DATE"),
        ("message-id", "HDR_MISSING_MESSAGE_ID"),
    ):
        if name not in names:
            hits.append(rule)
    counts = Counter(names)
    if counts["from"] > 1:
        hits.append("HDR_DUPLICATE_FROM")
    if any(counts[name] > 1 for name in _SINGLETONS if name != "from"):
        hits.append("HDR_DUPLICATE")
    if found & _HEADER_DEFECTS or any(name.startswith("unparseable") for name in found) or _bad_values(message):
        hits.append("HDR_DEFECT")
    if found - _HEADER_DEFECTS - {"8bit_header"} and not any(name.startswith("unparseable") for name in found):
        hits.append("MIME_DEFECT")
    if "8bit_header" in found and not (smtputf8 and _utf8(defects.header_block(data))):
        hits.append("HDR_8BIT")
    return hits


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _bad_values(message: EmailMessage) -> bool:
    """An address, date or message-id header whose value python's parser had to repair
    (defects.find() parses leniently and does not look inside header values)."""
    for name in _PARSED_HEADERS:
        try:
            values = message.get_all(name) or []
            found = [d for value in values for d in getattr(value, "defects", ())]
        except Exception:  # noqa: BLE001 - python's header parser has raised on hostile headers: that is a defect
            return True
        if any(not isinstance(d, email_errors.ObsoleteHeaderDefect) for d in found):  # old syntax is not spam
            return True
    return False


def _extension(filename: str) -> str:
    name = filename.strip().strip(".").lower()
    return name.rpartition(".")[2] if "." in name else ""


def _is_pe(payload: bytes) -> bool:
    """A Windows executable (MZ header pointing at a PE signature), whatever it is called."""
    if len(payload) < 0x40 or payload[:2] != b"MZ":
        return False
    offset = int.from_bytes(payload[0x3C:0x40], "little")
    return payload[offset : offset + 4] == b"PE\0\0"


def _attachment_rules(message: EmailMessage) -> list[str]:
    hits = []
    for n, part in enumerate(message.walk()):
        if n >= defects.MAX_PARTS:  # a bomb of parts: defects.find() reports it
            break
        if part.is_multipart():
            continue
        try:
            filename = part.get_filename() or ""
        except Exception:  # noqa: BLE001 - a mangled RFC 2231 name is still a part to inspect
            filename = ""
        ctype = part.get_content_type()
        if ctype.startswith("text/") and not filename:
            continue  # a body, not an attachment: nothing here runs when opened
        payload = _payload(part)
        if _extension(filename) in EXECUTABLE_EXTENSIONS or ctype in EXECUTABLE_TYPES or _is_pe(payload):
            hits.append("EXEC_ATTACHMENT")
        elif (ctype in _ZIP_TYPES or _extension(filename) == "zip" or payload[:4] == b"PK\x03\x04") and any(
            _extension(name) in EXECUTABLE_EXTENSIONS for name in _zip_names(payload)
        ):
            hits.append("EXEC_IN_ZIP")
    return hits


def _payload(part: Message) -> bytes:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - undecodable content has nothing to inspect
        return b""
    return payload if isinstance(payload, bytes) else b""


def _zip_names(payload: bytes) -> list[str]:
    if not payload or len(payload) > _MAX_ZIP_BYTES:
        return []
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            return archive.namelist()  # names are readable even in an encrypted archive
    except Exception:  # noqa: BLE001 - not a zip after all, or a broken one: nothing to list
        return []


# -- external scorers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Transaction:
    """What the SMTP transaction knows about a message, for scorers that use it (rspamd)."""

    client_ip: str = ""
    helo: str = ""
    mail_from: str = ""
    recipients: tuple[str, ...] = ()


NO_TRANSACTION = Transaction()


class ScorerError(Exception):
    """The scorer answered, but not with a score: an error status or a reply it cannot read."""


class Scorer(Protocol):
    name: str
    max_bytes: int  # larger messages are not sent

    async def score(self, data: bytes, transaction: Transaction = NO_TRANSACTION) -> tuple[float, tuple[str, ...]]:
        """(points, rule names) for the message; raises on any failure."""
        ...


_SPAMD_STATUS = re.compile(rb"^SPAMD/(\d+\.\d+) +(\d+) +(.*)$")
_SPAMD_SPAM = re.compile(r"^\s*(true|false|yes|no)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)\s*$", re.IGNORECASE)
_SPAMD_RULE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MAX_REPLY_BYTES = 1024 * 1024


def parse_spamd_reply(reply: bytes) -> tuple[float, tuple[str, ...]]:
    """(score, rule names) from spamd's answer to SYMBOLS; ScorerError if it is anything else."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        raise ScorerError(f"spamd's reply has no end of headers: {reply[:80]!r}")
    status, *lines = head.split(b"\r\n")
    match = _SPAMD_STATUS.match(status)
    if not match:
        raise ScorerError(f"not a spamd reply: {status[:80]!r}")
    if match.group(2) != b"0":
        raise ScorerError(f"spamd refused the message: {status.decode('ascii', 'replace')}")
    headers = {}
    for line in lines:
        name, colon, value = line.decode("ascii", "replace").partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    spam = _SPAMD_SPAM.match(headers.get("spam", ""))
    if not spam:
        raise ScorerError(f"spamd's reply has no readable Spam header: {headers.get('spam')!r}")
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or len(body) < int(length)):
        raise ScorerError(f"spamd's reply ended before its Content-length ({length}): {len(body)} bytes")
    rules = tuple(r.strip() for r in body.decode("ascii", "replace").replace("\r\n", "").split(",") if r.strip())
    if not all(_SPAMD_RULE.match(rule) for rule in rules):
        raise ScorerError(f"spamd's symbols are not rule names: {body[:80]!r}")
    return float(spam.group(2)), rules


class Spamd:
    """SpamAssassin's spamd over TCP, SPAMC/1.5 (the protocol spamc speaks): one connection
    per message, SYMBOLS (the total and the names of the rules that hit)."""

    name = "spamd"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = 10.0,
        max_bytes: int = 512 * 1024,
        user: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes  # spamc's default limit: the rules are slow on big messages
        self.user = user  # whose SpamAssassin preferences apply, when spamd keeps per-user ones

    async def score(self, data: bytes, transaction: Transaction = NO_TRANSACTION) -> tuple[float, tuple[str, ...]]:
        request = [b"SYMBOLS SPAMC/1.5", b"Content-length: %d" % len(data)]
        if self.user:
            request.append(b"User: " + self.user.encode("ascii", "replace"))
        reply = await self._exchange(b"\r\n".join(request) + b"\r\n\r\n" + data)
        return parse_spamd_reply(reply)

    async def ping(self) -> None:
        """Raises unless spamd answers PONG (for a health check at startup)."""
        reply = await self._exchange(b"PING SPAMC/1.5\r\n\r\n")
        if not _SPAMD_STATUS.match(reply.split(b"\r\n", 1)[0]) or b"PONG" not in reply:
            raise ScorerError(f"spamd did not answer PING with PONG: {reply[:80]!r}")

    async def _exchange(self, request: bytes) -> bytes:
        async with asyncio.timeout(self.timeout_s):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(request)
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()  # as spamc does: the request is complete
                return await _read_all(reader)
            finally:
                writer.close()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    reply = await reader.read(_MAX_REPLY_BYTES + 1)
    chunks = [reply]
    size = len(reply)
    while reply and size <= _MAX_REPLY_BYTES:
        reply = await reader.read(_MAX_REPLY_BYTES + 1 - size)
        chunks.append(reply)
        size += len(reply)
    if size > _MAX_REPLY_BYTES:
        raise ScorerError(f"the scorer's reply is longer than {_MAX_REPLY_BYTES} bytes")
    return b"".join(chunks)


def parse_rspamd_reply(body: bytes) -> tuple[float, tuple[str, ...]]:
    """(score, symbol names) from rspamd's /checkv2 JSON; ScorerError if it is anything else."""
    try:
        reply = json.loads(body)
    except ValueError as exc:
        raise ScorerError(f"rspamd's reply is not JSON: {body[:80]!r}") from exc
    if not isinstance(reply, dict):
        raise ScorerError(f"rspamd's reply is not a JSON object: {body[:80]!r}")
    if "error" in reply and "score" not in reply:
        raise ScorerError(f"rspamd could not check the message: {str(reply['error'])[:200]}")
    score, symbols = reply.get("score"), reply.get("symbols", {})
    if isinstance(score, bool) or not isinstance(score, int | float) or not isinstance(symbols, dict):
        raise ScorerError(f"rspamd's reply has no score and symbols: {body[:80]!r}")
    if not math.isfinite(score):
        raise ScorerError(f"rspamd's score is not a number: {score}")
    return float(score), tuple(sorted(str(name) for name in symbols))


class Rspamd:
    """rspamd's normal worker (or its proxy, or the controller): POST {url}/checkv2 with the
    message and what the SMTP transaction knows (IP, Helo, From, Rcpt), one connection per
    message. HTTP/1.1 over asyncio streams; https when the URL says so."""

    name = "rspamd"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        password: str | None = None,
        max_bytes: int = 20 * 1024 * 1024,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"the rspamd URL {url!r} is not http(s)://host[:port][/path]")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.base_path = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self.password = password
        self.max_bytes = max_bytes
        self._tls = ssl.create_default_context() if self.tls else None

    def _request(self, method: str, path: str, data: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [f"{method} {self.base_path}{path} HTTP/1.1", f"Host: {host}:{self.port}", "Connection: close"]
        lines.append(f"Content-Length: {len(data)}")
        if self.password:
            lines.append(f"Password: {self.password}")
        for name, value in headers:
            if value and "\r" not in value and "\n" not in value:
                lines.append(f"{name}: {value}")
        return "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + data

    async def score(self, data: bytes, transaction: Transaction = NO_TRANSACTION) -> tuple[float, tuple[str, ...]]:
        headers = [("IP", transaction.client_ip), ("Helo", transaction.helo), ("From", transaction.mail_from)]
        headers += [("Rcpt", rcpt) for rcpt in transaction.recipients]
        status, body = await self._exchange(self._request("POST", "/checkv2", data, headers))
        if status != 200:
            raise ScorerError(f"rspamd answered HTTP {status}: {body[:200]!r}")
        return parse_rspamd_reply(body)

    async def ping(self) -> None:
        """Raises unless rspamd answers /ping (for a health check at startup)."""
        status, body = await self._exchange(self._request("GET", "/ping", b"", ()))
        if status != 200 or not body.strip().startswith(b"pong"):
            raise ScorerError(f"rspamd did not answer /ping with pong: HTTP {status} {body[:80]!r}")

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        async with asyncio.timeout(self.timeout_s):
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._tls)
            try:
                writer.write(request)
                await writer.drain()
                return parse_http_reply(await _read_http(reader))
            finally:
                writer.close()


_HTTP_STATUS = re.compile(rb"^HTTP/1\.[01] +(\d{3})(?: .*)?$")
_HTTP_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+) *\r\n", re.IGNORECASE)
_HTTP_CHUNKED = re.compile(rb"\r\ntransfer-encoding: *chunked *\r\n", re.IGNORECASE)


async def _read_http(reader: asyncio.StreamReader) -> bytes:
    """A whole HTTP response: up to its Content-Length when it has one (a server that keeps the
    connection open anyway is not waited for), else to the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial  # closed before the end of the headers: parse_http_reply says so
    except asyncio.LimitOverrunError as exc:
        raise ScorerError("the HTTP reply's headers are longer than 64 KiB") from exc
    length = _HTTP_LENGTH.search(head)
    if length is None or _HTTP_CHUNKED.search(head):
        return head + await _read_all(reader)
    if int(length.group(1)) > _MAX_REPLY_BYTES:
        raise ScorerError(f"the scorer's reply is longer than {_MAX_REPLY_BYTES} bytes")
    try:
        return head + await reader.readexactly(int(length.group(1)))
    except asyncio.IncompleteReadError as exc:
        return head + exc.partial  # cut short: parse_http_reply says so


def parse_http_reply(reply: bytes) -> tuple[int, bytes]:
    """(status, body) of a whole HTTP/1.x response read to the end of the connection:
    Content-Length, chunked, or neither (the body is what came before the close)."""
    head, sep, rest = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    match = _HTTP_STATUS.match(status_line)
    if not sep or not match:
        raise ScorerError(f"not an HTTP reply: {reply[:80]!r}")
    headers = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = bytearray()
        while True:
            size_line, crlf, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError as exc:
                raise ScorerError(f"a broken chunked HTTP body: {size_line[:40]!r}") from exc
            if not crlf or len(rest) < size:
                raise ScorerError("the HTTP body ended before its last chunk")
            if size == 0:
                return int(match.group(1)), bytes(body)
            body += rest[:size]
            rest = rest[size + 2 :]
    if b"content-length" in headers:
        try:
            length = int(headers[b"content-length"])
        except ValueError as exc:
            raise ScorerError(f"a broken Content-Length: {headers[b'content-length'][:40]!r}") from exc
        if len(rest) < length:
            raise ScorerError(f"the HTTP body ended after {len(rest)} of {length} bytes")
        rest = rest[:length]
    return int(match.group(1)), rest


# -- the check -------------------------------------------------------------------------------


@dataclass
class Counts:
    """What the checker did, for the server's metrics. Only the event loop writes it."""

    checked: int = 0
    scored: int = 0  # the external scorer gave a score
    too_large: int = 0
    unscored: Counter[str] = field(default_factory=Counter)  # reason -> messages
    last_error: str | None = None
    scoring_s: float = 0.0  # time spent waiting for the external scorer, failures included

    def as_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "scored": self.scored,
            "too_large": self.too_large,
            "unscored": sum(self.unscored.values()),
            "unscored_by_reason": dict(self.unscored),
            "last_error": self.last_error,
            "scoring_s": round(self.scoring_s, 3),
        }


def _reason(exc: BaseException) -> str:
    """A short, stable name for why a scorer gave no score (a metrics label)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ScorerError):
        return "bad_reply"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, OSError | EOFError | asyncio.IncompleteReadError):
        return "connection"
    return "error"


class Checker:
    """The spam check the SMTP server runs at DATA, before it answers. Built-in rules always;
    the external scorer, if any, bounded by `timeout_s` in all (connect, send, score, reply).
    Never raises (a cancelled check, when the session goes away, is still cancelled)."""

    def __init__(self, external: Scorer | None = None, *, timeout_s: float = 10.0) -> None:
        self.external = external
        self.timeout_s = timeout_s
        self.counts = Counts()

    async def check(
        self,
        data: bytes,
        auth: AuthFacts,
        *,
        client_ip: str = "",
        helo: str = "",
        mail_from: str = "",
        recipients: Sequence[str] = (),
        smtputf8: bool = False,
        defect_names: Sequence[str] | None = None,
        builtin: list[tuple[str, float]] | None = None,
    ) -> Score:
        """The message's score. `smtputf8` and `defect_names` as for builtin_rules();
        `builtin`: the built-in rules' hits when the caller has run them already
        (`builtin_hits`, in the thread that parsed the message)."""
        self.counts.checked += 1
        transaction = Transaction(client_ip, helo, mail_from, tuple(recipients))
        # The parse is CPU work on up to the size limit: off the event loop, alongside the scorer.
        builtin_task: asyncio.Future[list[tuple[str, float]]]
        if builtin is not None:
            builtin_task = asyncio.get_running_loop().create_future()
            builtin_task.set_result(builtin)
        else:
            builtin_task = asyncio.ensure_future(asyncio.to_thread(self._builtin, data, auth, smtputf8, defect_names))
        external = self.external
        if external is None:
            hits = await builtin_task
            return Score(_total(hits), _names(hits), "builtin", builtin=_total(hits))
        if len(data) > external.max_bytes:
            self.counts.too_large += 1
            hits = await builtin_task
            return Score(_total(hits), _names(hits), "builtin", too_large=True, builtin=_total(hits))
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                points, rules = await external.score(data, transaction)
        except Exception as exc:  # noqa: BLE001 - never lose mail: any failure of the scorer leaves it unscored
            self.counts.scoring_s += time.monotonic() - started
            hits = await builtin_task
            return self._unscored(external.name, exc, hits, time.monotonic() - started)
        except BaseException:
            builtin_task.cancel()
            raise
        self.counts.scoring_s += time.monotonic() - started
        self.counts.scored += 1
        hits = await builtin_task
        prefix = external.name.upper() + ":"
        total = _total(hits) + points
        return Score(total, _names(hits) + tuple(prefix + r for r in rules), external.name, builtin=_total(hits))

    def builtin_hits(
        self, data: bytes, auth: AuthFacts, *, smtputf8: bool = False, defect_names: Sequence[str] | None = None
    ) -> list[tuple[str, float]]:
        """The built-in rules, synchronously (for a caller already off the event loop)."""
        return self._builtin(data, auth, smtputf8, defect_names)

    def _builtin(
        self, data: bytes, auth: AuthFacts, smtputf8: bool, defect_names: Sequence[str] | None
    ) -> list[tuple[str, float]]:
        try:
            return builtin_rules(data, auth, smtputf8=smtputf8, defect_names=defect_names)
        except Exception as exc:  # noqa: BLE001 - a bug in a rule must not cost a message its delivery
            log.error("inbound.spam_builtin_failed", error=repr(exc))
            return _points(_authentication_rules(auth))  # what the sender's domain asks for still holds

    def _unscored(self, name: str, exc: Exception, hits: list[tuple[str, float]], elapsed_s: float) -> Score:
        reason = _reason(exc)
        detail = str(exc) or type(exc).__name__
        if reason == "timeout":
            limit = min(self.timeout_s, getattr(self.external, "timeout_s", self.timeout_s))
            detail = f"no answer within {limit} s"
        error = f"{name} {reason}: {detail}"[:500]
        self.counts.unscored[reason] += 1
        self.counts.last_error = error
        log.warning(
            "inbound.spam_unscored", scorer=name, reason=reason, error=error, elapsed_ms=round(elapsed_s * 1000)
        )
        total = _total(hits)
        return Score(total, _names(hits), name, unscored=True, error=error, builtin=total)


def _total(hits: list[tuple[str, float]]) -> float:
    return sum(points for _, points in hits)


def _names(hits: list[tuple[str, float]]) -> tuple[str, ...]:
    return tuple(name for name, _ in hits)
