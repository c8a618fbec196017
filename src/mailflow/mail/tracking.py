"""Mail room: open and click tracking decisions - signed tracking tokens, link rewriting, and machine-or-human.

Everything here is pure: no I/O, no clock, no database. The web shell that serves the pixel
and the click redirects verifies the token, asks `classify_open` / `classify_click`, and
records the event; the outbound shell rewrites a rendered message before it is sent.

Counting. Mail clients and security tools fetch pixels and follow links without a person
(Apple Mail Privacy Protection fetches every pixel at delivery, link scanners follow every
link), so every request is classified and only human ones count:

- total opens / clicks: every request whose verdict is human (`machine` is False);
- unique opens: the first human open request per message; unique clicks: the first human
  click per message and link.

This module only decides machine or human; the caller records the event with its verdict
and works out uniqueness from what it has recorded.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import math
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from html import escape, unescape
from html.parser import HTMLParser
from typing import TypeAlias
from urllib.parse import quote

from itsdangerous import BadData, Signer

from mailflow.errors import BadToken

MAX_LINK_INDEX = 10_000  # more links than any real message has; larger indexes are refused
_PIXEL_LINK = 0xFFFF  # the link field's value for the open pixel (link None)
_SALT = b"mailflow/tracking"
_SIGNATURE_CHARS = 43  # base64url of a SHA-256 HMAC (32 bytes), unpadded
_MAX_TOKEN_CHARS = 1024  # anything longer is not ours: refuse before any decoding
_TOKEN = re.compile(rf"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{{{_SIGNATURE_CHARS}}}", re.ASCII)


@dataclass(frozen=True)
class TrackingToken:
    """What a pixel or click URL proves: which tenant's message (job), and which link (None: the pixel)."""

    tenant: str
    job_id: uuid.UUID
    link: int | None = None

    def __post_init__(self) -> None:
        if not self.tenant:
            raise ValueError("a tracking token needs a tenant")
        if not isinstance(self.job_id, uuid.UUID):
            raise ValueError("a tracking token's job_id must be a UUID")
        if self.link is not None and (
            isinstance(self.link, bool) or not isinstance(self.link, int) or not 0 <= self.link <= MAX_LINK_INDEX
        ):
            raise ValueError(f"a link index is an int from 0 to {MAX_LINK_INDEX}, not {self.link!r}")


def _signer(keys: Sequence[bytes], salt: bytes = _SALT) -> Signer:
    # itsdangerous signs with the last key of the list and verifies with any of them.
    return Signer(list(keys), salt=salt, key_derivation="hmac", digest_method=sha256)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def sign_token(key: bytes, token: TrackingToken) -> str:
    """A compact URL-safe token: base64url(job uuid 16 bytes, link 2 bytes, tenant) "." signature.

    About 75 characters for a short tenant id: it goes into every link of every message.
    """
    link = _PIXEL_LINK if token.link is None else token.link
    payload = token.job_id.bytes + link.to_bytes(2, "big") + token.tenant.encode("utf-8")
    return _signer([key]).sign(_b64(payload)).decode("ascii")


def verify_token(keys: Sequence[bytes], text: str) -> TrackingToken:
    """The token `text` carries if any of `keys` signed it (rotation: the newest signs, all verify).

    Raises BadToken, and nothing else, for any other string: tampered, truncated, padded,
    non-ASCII, or naming a link index above MAX_LINK_INDEX.
    """
    payload = _verified_payload(keys, text, _SALT)
    try:
        if len(payload) < 19:
            raise ValueError("payload too short")
        link = int.from_bytes(payload[16:18], "big")
        return TrackingToken(
            tenant=payload[18:].decode("utf-8"),
            job_id=uuid.UUID(bytes=payload[:16]),
            link=None if link == _PIXEL_LINK else link,
        )
    except (ValueError, binascii.Error) as exc:  # UnicodeDecodeError is a ValueError
        raise BadToken(f"tracking token payload is not valid: {exc}") from exc


def _verified_payload(keys: Sequence[bytes], text: str, salt: bytes) -> bytes:
    """The payload bytes of a token signed by one of `keys` under `salt`; BadToken for anything else."""
    if not isinstance(text, str) or len(text) > _MAX_TOKEN_CHARS or not _TOKEN.fullmatch(text):
        raise BadToken("not a tracking token")
    value, signature = text.rsplit(".", 1)
    # base64 of 32 bytes leaves 2 unused bits in its last character: accept only the one
    # canonical spelling, so that no changed character of a token still verifies.
    if _b64(base64.urlsafe_b64decode(signature + "=")) != signature:
        raise BadToken("tracking token signature is not canonical")
    try:
        _signer(keys, salt).unsign(text)
    except BadData as exc:
        raise BadToken("tracking token signature does not match") from exc
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, binascii.Error) as exc:
        raise BadToken(f"tracking token payload is not valid: {exc}") from exc


# --- Link rewriting ---------------------------------------------------------------------------

PIXEL_STYLE = "display:block;border:0;width:1px;height:1px"
NOTRACK_ATTRIBUTE = "data-mailflow-notrack"
_TRACKED_TAGS = frozenset({"a", "area"})
_ABSOLUTE_HTTP = re.compile(r"https?://[^/\s?#]", re.IGNORECASE)


@dataclass
class Rewritten:
    """A rewritten body and the original URLs of its tracked links, link index = list index."""

    body: str
    links: list[str] = field(default_factory=list)


class _LinkIndex:
    """Indexes for URLs: one URL, one index, shared by the parts of one message."""

    def __init__(self, links: list[str] | None) -> None:
        self.links = links if links is not None else []
        self._index = {url: i for i, url in reversed(list(enumerate(self.links)))}

    def index(self, url: str) -> int:
        found = self._index.get(url)
        if found is None:
            found = self._index[url] = len(self.links)
            self.links.append(url)
        return found


def _trackable(url: str, keep: Sequence[str]) -> bool:
    """Absolute http(s) URLs only: not mailto:, tel:, #anchors, relative links, unrendered
    templates ({{), nor the links that must stay direct (unsubscribe, preferences)."""
    return bool(_ABSOLUTE_HTTP.match(url)) and "{{" not in url and not any(url.startswith(k) for k in keep)


# One attribute of a start tag as written: name, then optionally = and a double-quoted,
# single-quoted or unquoted value. Checked against html.parser's own reading before use.
_ATTRIBUTE = re.compile(
    r"""(?P<name>[^\s/>"'=][^\s/>=]*)(?:\s*=\s*(?P<value>"[^"]*"|'[^']*'|[^\s>]*))?""",
)
_TAG_NAME = re.compile(r"<[^\s/>]+")
_BETWEEN_ATTRIBUTES = re.compile(r"[\s/]*")


def _attribute_spans(tag_text: str) -> list[tuple[str, str | None, tuple[int, int] | None]]:
    """(lowercased name, unescaped value, span of the value as written incl. quotes) for each attribute."""
    found: list[tuple[str, str | None, tuple[int, int] | None]] = []
    start = _TAG_NAME.match(tag_text)
    pos = start.end() if start else len(tag_text)
    end = len(tag_text) - 1  # the closing ">"
    while True:
        gap = _BETWEEN_ATTRIBUTES.match(tag_text, pos, end)
        pos = gap.end() if gap else pos
        if pos >= end:
            return found
        m = _ATTRIBUTE.match(tag_text, pos, end)
        if m is None or m.end() == pos:
            return found
        raw = m.group("value")
        if raw is None:
            found.append((m.group("name").lower(), None, None))
        else:
            inner = raw[1:-1] if raw[:1] in "\"'" and len(raw) >= 2 and raw[-1] == raw[0] else raw
            found.append((m.group("name").lower(), unescape(inner), m.span("value")))
        pos = m.end()


class _Scanner(HTMLParser):
    """Finds, without changing anything, the href values to replace and the last </body>."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=False)
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", html)]
        self._html = html
        self.hrefs: list[tuple[int, int, str]] = []  # (start, end, unescaped url) in html
        self.body_end: int | None = None

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _TRACKED_TAGS:
            return
        names = [name for name, _ in attrs]
        if "href" not in names or NOTRACK_ATTRIBUTE in names:
            return
        text = self.get_starttag_text() or ""
        start = self._offset()
        if self._html[start : start + len(text)] != text:
            return  # positions disagree: leave the tag exactly as it is
        spans = _attribute_spans(text)
        if [(name, value) for name, value, _ in spans] != attrs:
            return  # we read the tag differently from html.parser: do not touch it
        for name, value, span in spans:
            if name == "href":  # the first href is the one a browser follows
                if value is not None and span is not None:
                    self.hrefs.append((start + span[0], start + span[1], value.strip()))
                return

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_end = self._offset()


def pixel_tag(pixel_url: str) -> str:
    return f'<img src="{escape(pixel_url)}" width="1" height="1" alt="" style="{PIXEL_STYLE}">'


def rewrite_html(
    html: str,
    click_url: Callable[[int], str],
    pixel_url: str | None = None,
    *,
    links: list[str] | None = None,
    keep: Sequence[str] = (),
) -> Rewritten:
    """`html` with each trackable <a>/<area> href replaced by `click_url(index)`, and the pixel added.

    Nothing else changes, byte for byte: the document is scanned, not re-serialised, and only
    the value of each rewritten href attribute is replaced (in its own quotes; an unquoted one
    gets double quotes). Skipped: links that are not absolute http(s), that carry
    data-mailflow-notrack, contain `{{`, or start with one of `keep`. The stored link is the unescaped URL; the new href is HTML-escaped.
    `links` (extended in place) lets a message's parts share one list of indexes.
    """
    index = _LinkIndex(links)
    scanner = _Scanner(html)
    scanner.feed(html)
    scanner.close()
    edits = []
    for start, end, url in scanner.hrefs:
        if _trackable(url, keep):
            quote = "'" if html[start] == "'" else '"'  # the value's own quotes; an unquoted one gets "
            edits.append((start, end, f"{quote}{escape(click_url(index.index(url)))}{quote}"))
    if pixel_url is not None:
        at = len(html) if scanner.body_end is None else scanner.body_end
        edits.append((at, at, pixel_tag(pixel_url)))
    out: list[str] = []
    pos = 0
    for start, end, replacement in sorted(edits, key=lambda edit: edit[0]):
        out += [html[pos:start], replacement]
        pos = end
    out.append(html[pos:])
    return Rewritten("".join(out), index.links)


# A bare URL in plain text: it ends at whitespace, a quote or angle brackets (so <https://x> works).
_TEXT_URL = re.compile(r"(?<![\w+.-])https?://[^\s<>\"]+", re.IGNORECASE)
_TRAILING = ".,;:!?'*"  # sentence punctuation that follows a URL rather than ends it
_CLOSERS = {")": "(", "]": "[", "}": "{"}


def _url_end(url: str) -> str:
    """The URL without the punctuation after it; a closing bracket stays if it closes one of the URL's own."""
    while url:
        last = url[-1]
        if last in _TRAILING or (last in _CLOSERS and url.count(last) > url.count(_CLOSERS[last])):
            url = url[:-1]
        else:
            break
    return url


def rewrite_text(
    text: str,
    click_url: Callable[[int], str],
    *,
    links: list[str] | None = None,
    keep: Sequence[str] = (),
) -> Rewritten:
    """Plain `text` with each bare http(s) URL replaced by `click_url(index)`; same skip rules as rewrite_html.

    Pass the html part's `links` to give the same URL the same index in both parts.
    """
    index = _LinkIndex(links)

    def replace(m: re.Match[str]) -> str:
        url = _url_end(m.group(0))
        if not url or not _trackable(url, keep):
            return m.group(0)
        return click_url(index.index(url)) + m.group(0)[len(url) :]

    return Rewritten(_TEXT_URL.sub(replace, text), index.links)


# --- Messages as sent: tokens that carry the send time and bind a click to its URL ------------

# What the URLs of a sent message prove. The pixel's and each link's token carry the tenant,
# the job, the link index, how many links the message has, when it was sent (epoch seconds:
# "seconds since sent" needs no database read) and, for a link, a digest of the exact URL it
# stood for. The URL itself travels beside the token (`?u=`), so nothing about the message is
# stored anywhere; a URL whose digest is not the signed one was not in the message, and is
# never redirected to. Signed under a salt of their own: a bare TrackingToken never verifies
# as one of these, nor the other way round.
_SENT_SALT = b"mailflow/tracking/sent"
_DIGEST_BYTES = 16  # a truncated SHA-256: a second URL with the same digest cannot be found
_SENT_HEADER = 16 + 2 + 2 + 4 + _DIGEST_BYTES  # job, link, links, sent_at, url digest; then the tenant
_NO_DIGEST = bytes(_DIGEST_BYTES)  # the pixel's
OPEN_PATH = "/t/o/"
CLICK_PATH = "/t/c/"
URL_PARAMETER = "u"


def url_digest(url: str) -> bytes:
    return sha256(url.encode("utf-8", "surrogatepass")).digest()[:_DIGEST_BYTES]


@dataclass(frozen=True)
class SentToken:
    """A verified pixel or click token: whose message, which link (None: the pixel), how many
    links the message has, and when it was sent (epoch seconds)."""

    token: TrackingToken
    sent_at: int
    links: int
    digest: bytes = _NO_DIGEST

    def seconds_since_sent(self, now: float) -> float:
        return now - self.sent_at

    def has_link(self) -> bool:
        """Whether the link index is one of the message's (a genuine token can name no other)."""
        return self.token.link is not None and self.token.link < self.links

    def signed_for(self, url: str | None) -> bool:
        """Whether `url` is exactly the URL this link's token was signed for."""
        return url is not None and self.token.link is not None and hmac.compare_digest(self.digest, url_digest(url))


def sign_sent(key: bytes, token: TrackingToken, *, sent_at: int, links: int, url: str | None = None) -> str:
    """The token of a sent message's pixel (token.link None, no url) or of one of its links (with its url)."""
    if (token.link is None) != (url is None):
        raise ValueError("a link's token names its URL, the pixel's names none")
    if not 0 <= links <= MAX_LINK_INDEX + 1 or not 0 <= sent_at < 2**32:
        raise ValueError("links or sent_at out of range")
    link = _PIXEL_LINK if token.link is None else token.link
    payload = (
        token.job_id.bytes
        + link.to_bytes(2, "big")
        + links.to_bytes(2, "big")
        + sent_at.to_bytes(4, "big")
        + (_NO_DIGEST if url is None else url_digest(url))
        + token.tenant.encode("utf-8")
    )
    return _signer([key], _SENT_SALT).sign(_b64(payload)).decode("ascii")


def verify_sent(keys: Sequence[bytes], text: str) -> SentToken:
    """What a pixel or click token proves, if one of `keys` signed it; BadToken for any other string."""
    payload = _verified_payload(keys, text, _SENT_SALT)
    try:
        if len(payload) <= _SENT_HEADER:
            raise ValueError("payload too short")
        link = int.from_bytes(payload[16:18], "big")
        token = TrackingToken(
            tenant=payload[_SENT_HEADER:].decode("utf-8"),
            job_id=uuid.UUID(bytes=payload[:16]),
            link=None if link == _PIXEL_LINK else link,
        )
        return SentToken(
            token,
            sent_at=int.from_bytes(payload[20:24], "big"),
            links=int.from_bytes(payload[18:20], "big"),
            digest=payload[24:_SENT_HEADER],
        )
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise BadToken(f"tracking token payload is not valid: {exc}") from exc


def open_url(base: str, key: bytes, tenant: str, job_id: uuid.UUID, *, sent_at: int, links: int = 0) -> str:
    """The pixel's URL: `<base>/t/o/<token>`."""
    token = sign_sent(key, TrackingToken(tenant, job_id), sent_at=sent_at, links=links)
    return f"{base.rstrip('/')}{OPEN_PATH}{token}"


def click_url(
    base: str, key: bytes, tenant: str, job_id: uuid.UUID, *, sent_at: int, links: int, link: int, url: str
) -> str:
    """A rewritten link: `<base>/t/c/<token>?u=<the original URL, percent-encoded>`."""
    token = sign_sent(key, TrackingToken(tenant, job_id, link), sent_at=sent_at, links=links, url=url)
    return f"{base.rstrip('/')}{CLICK_PATH}{token}?{URL_PARAMETER}={quote(url, safe='', errors='surrogatepass')}"


@dataclass
class TrackedMessage:
    html: str
    text: str
    links: list[str]


def rewrite_message(
    html: str,
    text: str,
    click: Callable[[int, str, int], str],
    pixel_url: str | None,
    *,
    keep: Sequence[str] = (),
) -> TrackedMessage:
    """Both parts of a message rewritten, one link index per URL across them.

    `click(index, url, links)` makes a link's URL; `links` is how many tracked links the whole
    message has, which each token carries (the scanner rule needs it), so the links are
    collected first and the parts rewritten after. An empty html part stays empty (no pixel).
    """
    found: list[str] = []
    if html:
        rewrite_html(html, lambda i: "", links=found, keep=keep)
    if text:
        rewrite_text(text, lambda i: "", links=found, keep=keep)
    total = len(found)

    def make(i: int) -> str:
        return click(i, found[i], total)

    links: list[str] = []
    new_html = rewrite_html(html, make, pixel_url, links=links, keep=keep).body if html else html
    new_text = rewrite_text(text, make, links=links, keep=keep).body if text else text
    return TrackedMessage(new_html, new_text, links)


# --- Machine or human -------------------------------------------------------------------------

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Verdict:
    """Whether a request was made by a machine, and a short stable slug saying why."""

    machine: bool
    reason: str


HUMAN = "human"
IMAGE_PROXY = "image_proxy"  # human: a webmail proxy fetched the pixel because a person opened the message
APPLE_MPP = "apple_mpp"
PROXY_PREFETCH = "proxy_prefetch"
SCANNER_USER_AGENT = "scanner_user_agent"
SCANNER_NETWORK = "scanner_network"
NO_USER_AGENT = "no_user_agent"
IMPLAUSIBLE_USER_AGENT = "implausible_user_agent"
TOO_FAST = "too_fast"
EVERY_LINK = "every_link"
REASONS = frozenset(
    {
        HUMAN,
        IMAGE_PROXY,
        APPLE_MPP,
        PROXY_PREFETCH,
        SCANNER_USER_AGENT,
        SCANNER_NETWORK,
        NO_USER_AGENT,
        IMPLAUSIBLE_USER_AGENT,
        TOO_FAST,
        EVERY_LINK,
    }
)

# Timing. Scanners at the recipient's gateway follow links while the message is delivered;
# people take longer than that (reported by many senders, e.g. gophish#2115, mautic#16263).
CLICK_TOO_FAST_SECONDS = 10.0  # a click sooner than this after sending is a gateway's scanner
OPEN_TOO_FAST_SECONDS = 2.0  # delivery, a client's sync and a person opening take longer than this
PREFETCH_SECONDS = 10.0  # a webmail image-proxy fetch sooner than this is a prefetch at delivery (gophish#1390)
BURST_SECONDS = 5.0  # clicks on different links this close together come from one machine
EVERY_LINK_SHARE = 0.8  # a burst over this share of a message's links is a scanner following all of them
EVERY_LINK_MIN_LINKS = 3  # below this many links a person may well click them all quickly
MAX_USER_AGENT_CHARS = 512  # real browsers send 100-300 characters

# Apple Mail Privacy Protection fetches every remote image of a message at delivery, through
# the iCloud Private Relay infrastructure (same hosts, mask.icloud.com; wordtothewise.com,
# "Apple MPP reporting and geolocation", 2021), whether or not anyone reads it.
APPLE_PROXY_NETWORKS: tuple[IPNetwork, ...] = (
    # Apple's own /8 (ARIN). Relay egress also runs on partners' networks (Akamai, Cloudflare,
    # Fastly): Apple publishes the complete egress list at
    # https://mask-api.icloud.com/egress-ip-ranges.csv ("Prepare your network or web server for
    # iCloud Private Relay", developer.apple.com); a shell may load it and pass it in.
    ipaddress.ip_network("17.0.0.0/8"),
)
# The user agent MPP's fetches send: no platform, no engine (reported by ESPs; see above).
APPLE_MPP_USER_AGENTS = frozenset({"mozilla/5.0"})

# Networks of mail-security gateways whose scanners fetch pixels and follow links. Each vendor
# publishes these for customers to allow-list its gateways; fetches come from the same ranges.
SCANNER_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "40.92.0.0/15",  # Microsoft Exchange Online Protection (Microsoft 365 URLs and IP address ranges)
        "40.107.0.0/16",  # Microsoft Exchange Online Protection: Safe Links fetches seen here (opencollective#3656)
        "52.100.0.0/14",  # Microsoft Exchange Online Protection
        "104.47.0.0/17",  # Microsoft Exchange Online Protection
        "40.94.0.0/16",  # Microsoft: Safe Links fetches observed from 40.94.16.x (opencollective#3656)
        "64.235.144.0/20",  # Barracuda Email Gateway Defense (Barracuda Campus, IP ranges)
        "209.222.80.0/21",  # Barracuda Email Gateway Defense (Barracuda Campus, "IP Analysis - Inbound")
        "205.139.110.0/24",  # Mimecast US data centre (Mimecast "Data centers and URLs")
        "207.211.30.0/24",  # Mimecast US data centre
        "216.205.24.0/24",  # Mimecast US data centre
        "91.220.42.0/24",  # Mimecast UK data centre
        "195.130.217.0/24",  # Mimecast UK data centre
        "146.101.78.0/24",  # Mimecast UK data centre
        "148.163.128.0/19",  # Proofpoint (pphosted.com gateways, ARIN allocation to Proofpoint Inc.)
        "67.231.144.0/20",  # Proofpoint (pphosted.com gateways)
    )
)

# Webmail image proxies that fetch when a person displays the message (Gmail since 2013,
# Yahoo): the fetch is caused by a human open, though its user agent and address are the
# proxy's. Counted as human (reason image_proxy) unless it comes at delivery (PREFETCH_SECONDS).
# Gmail caches what it fetched, so a person's later opens may not reach us: such opens are
# undercounted, never invented.
HUMAN_IMAGE_PROXY_USER_AGENTS = (
    "googleimageproxy",  # Gmail: "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
    "via ggpht.com",  # Gmail's proxy before it added the GoogleImageProxy token (browscap#1108)
    "yahoomailproxy",  # Yahoo Mail: "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
)

# Substrings (lowercase) of user agents that are programs, never a person: pixels or links
# they fetch are machine opens or clicks.
SCANNER_USER_AGENTS = (
    "barracuda",  # Barracuda Email Gateway Defense link protection
    "mimecast",  # Mimecast URL Protect
    "proofpoint",  # Proofpoint URL Defense / Targeted Attack Protection
    "bingpreview",  # Bing / Outlook.com link previews
    "skypeuripreview",  # Skype and Teams link previews
    "slackbot",  # Slack link unfurling (Slackbot-LinkExpanding)
    "twitterbot",  # X/Twitter cards
    "facebookexternalhit",  # Facebook / Messenger link previews
    "whatsapp/",  # WhatsApp link previews ("WhatsApp/2.23.20.0 A")
    "telegrambot",  # Telegram link previews
    "discordbot",  # Discord embeds
    "linkedinbot",  # LinkedIn previews
    "googlebot",  # Google's crawler
    "bingbot",  # Bing's crawler
    "applebot",  # Apple's crawler
    "crawler",  # generic crawlers
    "spider",  # generic crawlers
    "+http",  # "(compatible; SomeBot/1.0; +https://example.com/bot)": the convention for bots' contact URLs
    "headlesschrome",  # Chrome driven without a screen (Puppeteer, Playwright, scanners' sandboxes)
    "phantomjs",  # an older headless browser
    "python-requests",  # Python requests
    "python-urllib",  # Python's urllib
    "python-httpx",  # Python httpx
    "aiohttp",  # Python aiohttp
    "curl/",  # curl
    "wget/",  # GNU Wget
    "go-http-client",  # Go's net/http
    "okhttp",  # Java / Android OkHttp used directly
    "apache-httpclient",  # Java Apache HttpClient
    "java/",  # Java's built-in HttpURLConnection
    "libwww-perl",  # Perl LWP
    "node-fetch",  # Node.js fetch polyfill
    "axios/",  # Node.js axios
    "scrapy",  # Scrapy
)

# Office's own HTTP stack: Outlook desktop fetching images when a person reads the message
# (a human open: "Microsoft Office/16.0 (...; Microsoft Outlook 16.0.x; Pro)"), but on a link
# it is a preview or Office's protocol/existence discovery - the person's click itself opens
# in their browser, with the browser's user agent. So these mark machine clicks only.
OFFICE_LINK_CHECK_USER_AGENTS = (
    "microsoft office",  # "Microsoft Office/16.0 ...", "Microsoft Office Existence Discovery"
    "ms-office",  # "... Microsoft Outlook 16.0.9126; ms-office; MSOffice 16)"
)


def _address(ip: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _in(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, networks: Sequence[IPNetwork]) -> bool:
    return ip is not None and any(ip in net for net in networks)


def _seconds(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _has(agent: str, substrings: Sequence[str]) -> bool:
    return any(s in agent for s in substrings)


def _agent(user_agent: str | None) -> str | Verdict:
    """The user agent, trimmed and lowercased for matching; or the verdict a missing or oversized one gets."""
    if user_agent is None or not user_agent.strip():
        return Verdict(True, NO_USER_AGENT)
    if len(user_agent) > MAX_USER_AGENT_CHARS:
        return Verdict(True, IMPLAUSIBLE_USER_AGENT)
    return user_agent.strip().lower()


def classify_open(
    user_agent: str | None,
    ip: str | None,
    seconds_since_sent: float | None,
    *,
    apple_networks: Sequence[IPNetwork] = APPLE_PROXY_NETWORKS,
    scanner_networks: Sequence[IPNetwork] = SCANNER_NETWORKS,
) -> Verdict:
    """Whether a pixel fetch was a person opening the message (see the module docstring for counting).

    Machine: Apple's proxy (any fetch from its network, or MPP's bare "Mozilla/5.0"), a
    scanner's network or user agent, a missing or implausible user agent, a webmail proxy
    fetching at delivery, or any fetch within OPEN_TOO_FAST_SECONDS. Gmail's and Yahoo's
    proxies otherwise fetch because a person opened the message: human, reason image_proxy.
    """
    addr = _address(ip)
    seconds = _seconds(seconds_since_sent)
    if _in(addr, apple_networks):
        return Verdict(True, APPLE_MPP)
    if _in(addr, scanner_networks):
        return Verdict(True, SCANNER_NETWORK)
    agent = _agent(user_agent)
    if isinstance(agent, Verdict):
        return agent
    if _has(agent, HUMAN_IMAGE_PROXY_USER_AGENTS):
        if seconds is not None and seconds < PREFETCH_SECONDS:
            return Verdict(True, PROXY_PREFETCH)
        return Verdict(False, IMAGE_PROXY)
    if _has(agent, SCANNER_USER_AGENTS):
        return Verdict(True, SCANNER_USER_AGENT)
    if agent in APPLE_MPP_USER_AGENTS:
        return Verdict(True, APPLE_MPP)
    if len(agent.split()) < 2:
        return Verdict(True, IMPLAUSIBLE_USER_AGENT)
    if seconds is not None and seconds < OPEN_TOO_FAST_SECONDS:
        return Verdict(True, TOO_FAST)
    return Verdict(False, HUMAN)


def classify_click(
    user_agent: str | None,
    ip: str | None,
    seconds_since_sent: float | None,
    recent_clicks: Sequence[tuple[int, float]],
    links_in_message: int,
    *,
    link: int | None = None,
    scanner_networks: Sequence[IPNetwork] = SCANNER_NETWORKS,
) -> Verdict:
    """Whether a click on a tracked link was a person (see the module docstring for counting).

    `recent_clicks` are (link index, seconds since sent) of the message's earlier clicks;
    `link` is this click's index (None: counted as a link of its own). Apple's network is
    no sign of a machine here: MPP fetches images only, and people's Safari uses Private Relay.

    Machine: a scanner's network or user agent (incl. Office's link checks), a missing or
    implausible user agent, a click within CLICK_TOO_FAST_SECONDS of sending, or a burst
    over most links of the message within BURST_SECONDS. The earlier clicks of a burst were
    judged before it showed itself; a caller that wants exact counts judges them again.
    """
    addr = _address(ip)
    seconds = _seconds(seconds_since_sent)
    if _in(addr, scanner_networks):
        return Verdict(True, SCANNER_NETWORK)
    agent = _agent(user_agent)
    if isinstance(agent, Verdict):
        return agent
    if _has(agent, SCANNER_USER_AGENTS) or _has(agent, OFFICE_LINK_CHECK_USER_AGENTS):
        return Verdict(True, SCANNER_USER_AGENT)
    if _has(agent, HUMAN_IMAGE_PROXY_USER_AGENTS):
        return Verdict(True, PROXY_PREFETCH)  # image proxies fetch images, never follow links for a person
    if len(agent.split()) < 2:  # includes MPP's bare "Mozilla/5.0"
        return Verdict(True, IMPLAUSIBLE_USER_AGENT)
    if seconds is None:
        return Verdict(False, HUMAN)
    if seconds < CLICK_TOO_FAST_SECONDS:
        return Verdict(True, TOO_FAST)
    if _is_burst(link, seconds, recent_clicks, links_in_message):
        return Verdict(True, EVERY_LINK)
    return Verdict(False, HUMAN)


def _is_burst(
    link: int | None, seconds: float, recent_clicks: Sequence[tuple[int, float]], links_in_message: int
) -> bool:
    if links_in_message < EVERY_LINK_MIN_LINKS:
        return False
    near = {index for index, at in recent_clicks if math.isfinite(at) and abs(at - seconds) <= BURST_SECONDS}
    near.add(-1 if link is None else link)
    return len(near) >= max(EVERY_LINK_MIN_LINKS, math.ceil(EVERY_LINK_SHARE * links_in_message))
