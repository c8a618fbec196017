"""Inbound room, classification: the new text of a reply - its body without the quoted
history, the reply header above it ("On ... wrote:", "Am ... schrieb", Outlook's From/Sent
block) and the signature. Pure: no I/O.

The cutting is mail-parser-reply's (MIT, maintained, multilingual, no dependencies), with
its header patterns for en, de, fr, es, it, pt, nl and ja and "- item" lists kept as text;
a body it cuts down to a greeting ("Hi,") is tried again without its '>' quotes, for
answers written below them. Measured with tests/test_classify_kinds.py's tables: the 22
bodies of github/email_reply_parser's tests in the shared corpus (a body counts when its
new text has every phrase expected and none of the quoted or signature ones) and 6 of our
own under German, French, Spanish and Outlook reply headers:

    quotequail 0.5.4                  5/22  0/6  keeps "On ... wrote:" lines and signatures
    email-reply-parser 0.5.12        20/22  2/6  English only, last release 2020; the 22 are
                                                 its own test set, which flatters it
    mail-parser-reply 1.36, default  18/22  5/6  takes "- item" lists for signatures
    mail-parser-reply, lists kept    19/22  5/6
    this module                      19/22  5/6  email_1_2's bottom-posted answer is kept
                                                 (with the list footer under it)

Misses (xfail in the tests): a mailing-list footer (email_1_1, email_1_2), a line of '>'
quoting nothing (email_long_quote), Gmail's Spanish "El ... escribió:" header. About 13 ms
a body on average, 260 ms for the worst (email_long_quote.txt); bodies are cut at
MAX_BODY_CHARS first.

HTML-only replies are turned into text first (stdlib html.parser), leaving out what the
common clients mark as the quoted message (blockquote, Gmail's gmail_quote, Outlook's
divRplyFwdMsg and everything after it, Apple's type=cite).
"""

from __future__ import annotations

import re
from email.message import Message
from html.parser import HTMLParser

from mailparser_reply.parser import EmailMessage  # type: ignore[import-untyped]  # no py.typed

__all__ = ["body_text", "html_to_text", "new_text", "reply_text"]

LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "ja")
MAX_BODY_CHARS = 100_000  # a longer body is cut before parsing: the patterns are regexes over the whole text
_MAX_PARTS = 200


def reply_text(msg: Message) -> str:
    """The new text of the reply `msg` ('' when it has no readable text body)."""
    return new_text(body_text(msg))


def new_text(body: str) -> str:
    """`body` (plain text) without quoted history and signature."""
    body = body.replace("\r\n", "\n").replace("\r", "\n")[:MAX_BODY_CHARS]
    if not body.strip():
        return ""
    text = _cut(body)
    if not text or ("\n" not in text and text.endswith(",")):
        # Nothing, or a greeting ("Hi,"), above the first reply header: answered below the quotes?
        below = _cut(_without_interleaved_quotes(body))
        if len(below.splitlines()) > len(text.splitlines()):
            text = below
    return text


def _cut(body: str) -> str:
    try:
        message = EmailMessage(text=body, languages=list(LANGUAGES), keep_hyphen_lists=True).read()
        text = message.replies[0].body if message.replies else body
    except Exception:  # noqa: BLE001 - a library failure on odd text must not lose the reply: keep it whole
        text = body
    return _tidy(text)


def _without_interleaved_quotes(body: str) -> str:
    """A body answered below or between its quotes ('>' lines with new text after them),
    without the quotes and their "On <date>, <someone> wrote:" lines: mail-parser-reply
    keeps only what stands above the first reply header, which for such a body is a
    greeting at most. A body with nothing after its quotes is left as it is."""
    lines = body.split("\n")
    quoted = [line.lstrip().startswith(">") for line in lines]
    if not any(quoted):
        return body
    first = quoted.index(True)
    if not any(not q and line.strip() for q, line in zip(quoted[first:], lines[first:])):
        return body  # nothing new after the quotes: a top-posted answer
    drop: set[int] = set()
    for i, q in enumerate(quoted):
        if not q:
            continue
        drop.add(i)
        if i and quoted[i - 1]:
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        above: list[int] = []
        while j >= 0 and lines[j].strip() and not quoted[j] and len(above) < 4:
            above.append(j)
            j -= 1
        block = " ".join(lines[k] for k in above)
        if above and lines[above[0]].rstrip().endswith(":") and re.search(r"[\d@]", block):
            drop.update(above)
    return "\n".join(line for i, line in enumerate(lines) if i not in drop)


def body_text(msg: Message) -> str:
    """The message's text: its first text/plain part that is not an attachment, else its first
    text/html part as text; '' when it has neither."""
    plain = html = None
    for count, part in enumerate(msg.walk()):
        if count >= _MAX_PARTS:
            break
        if part.is_multipart() or _is_attachment(part):
            continue
        kind = part.get_content_type()
        if kind == "text/plain" and plain is None:
            plain = _decoded(part)
        elif kind == "text/html" and html is None:
            html = _decoded(part)
        if part is not msg and kind == "message/rfc822":
            break  # a forwarded message's text is not this message's
    if plain and plain.strip():
        return plain
    return html_to_text(html) if html else ""


def html_to_text(html: str) -> str:
    """Readable text of an HTML body, without its quoted part."""
    parser = _TextParser()
    try:
        parser.feed(html[: MAX_BODY_CHARS * 4])
        parser.close()
    except Exception:  # noqa: BLE001 - html.parser is lenient; what it gave up on is left out
        pass
    return parser.text()


def _is_attachment(part: Message) -> bool:
    try:
        return part.get_content_disposition() == "attachment"
    except Exception:  # noqa: BLE001 - an unreadable disposition: treat as inline
        return False


def _decoded(part: Message) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - an undecodable transfer encoding: no text
        return ""
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name
        return payload.decode("utf-8", errors="replace")


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_BLOCKS = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "pre", "hr"}
_SKIP = {"script", "style", "head", "title"}
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "track", "wbr"}


class _TextParser(HTMLParser):
    """HTML to text: block elements end lines, quoted parts and scripts are left out, and
    Outlook's reply separator ends the new text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._out: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # open elements: tag, does it hide its content
        self._hidden = 0
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._done:
            return
        a = {k.lower(): (v or "") for k, v in attrs}
        classes = a.get("class", "").lower().split()
        if a.get("id", "").lower() in ("divrplyfwdmsg", "appendonsend") or "moz-cite-prefix" in classes:
            self._done = True  # Outlook's "From: / Sent:" block, Thunderbird's "On ... wrote:": the rest is history
            return
        hides = (
            tag in _SKIP
            or tag == "blockquote"
            or "gmail_quote" in classes
            or "gmail_attr" in classes
            or "yahoo_quoted" in classes
            or a.get("type", "").lower() == "cite"
        )
        if tag in _BLOCKS and not self._hidden:
            self._out.append("\n")
        if tag in _VOID:
            return
        self._stack.append((tag, hides))
        self._hidden += hides

    def handle_endtag(self, tag: str) -> None:
        if self._done or tag in _VOID or all(t != tag for t, _ in self._stack):
            return
        while self._stack:  # close what was left open inside it too
            open_tag, hides = self._stack.pop()
            self._hidden -= hides
            if open_tag == tag:
                break
        if tag in _BLOCKS and not self._hidden:
            self._out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._done and not self._hidden:
            self._out.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.strip() for line in "".join(self._out).split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
