"""Inbound room: routes - each tenant's ordered rules for the mail to its inbound domains that
no mailbox takes: matching them (pure), adding and removing them, and their inline projection.

A route is a recipient pattern, header conditions (all must match), and an action:

    help@example.org     that address, in any letter case, with or without a +tag (captures `tag`)
    help+*@example.org   that address with some +tag (captures `tag`)
    *@example.org        every address at the domain (captures `local`, and `tag` when there is one)
    /regex/              a regular expression over the whole lower-cased address (case-insensitive;
                         its named groups are the captures)

    mailbox <address> | forward <address> | http <url> | reject [text] | drop

Routes are tried by priority (lower first; ties in the order they were added). Matching stops
at the first route that takes the message unless it says `continue_matching` (Mailgun's
routes without `stop()`); reject and drop always stop. A reject reached after a route took the
message ends the matching without refusing it: a message one route took is never refused by
a later one, so at RCPT time the first route whose pattern matches says whether the address is
refused (`rcpt_match`). Only the routes of the tenant that receives for the address's domain
are ever tried (`policy.Directory.routes_for`), so a regex never reaches another tenant's mail.

Regular expressions run on mail from anyone, so they are bounded where they are written
(`parse_pattern`, `parse_condition`): at most 200 characters, no backreferences, no
repetition inside a repetition or over an alternation, and at most 3 variable repeats over an
address (2 over a header value). Together with the input bounds - an address over 254
characters matches no route; a header value is searched in its first 512 characters - no
expression takes more than a few tens of milliseconds (exponential backtracking needs a
nested repeat, an alternation under a repeat or a backreference; polynomial backtracking
grows as the input's length to the power of the variable repeats).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.header import decode_header, make_header
from email.message import Message
from enum import StrEnum
from functools import lru_cache
from re import _parser as _sre  # type: ignore[attr-defined]  # the stdlib's own regex parser
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from mailflow.consumers import inline
from mailflow.consumers.inline import InlineProjection, register
from mailflow.errors import ConflictError, NotFoundError, UsageError
from mailflow.events.envelope import Envelope
from mailflow.events.store import EventStore
from mailflow.inbound import queries as q
from mailflow.inbound.events import RouteAdded, RouteRemoved
from mailflow.log import get_logger
from mailflow.mail.addresses import EmailNotValidError, normalize_email

log = get_logger("mailflow.inbound")

DEFAULT_PRIORITY = 100
MAX_PRIORITY = 1_000_000
MAX_REGEX = 200  # characters of a regular expression
MAX_ADDRESS = 254  # RFC 5321's longest path, less the angle brackets
MAX_HEADER_VALUE = 512  # characters of a header value a condition searches
MAX_REJECT_TEXT = 200
MAX_URL = 2000
DEFAULT_REJECT = "This address does not accept mail"

# A pattern's local part: the dot-atom characters an address may have (policy.canonical),
# without `+` (the tag's separator), `*` (the wildcard), `%` and `!` (never routable).
_ATOM = r"[a-z0-9#$&'/=?^_`{|}~-]+"
_ADDRESS_PATTERN = re.compile(
    rf"^(?P<local>\*|{_ATOM}(?:\.{_ATOM})*)(?:\+(?P<tag>\*|[a-z0-9#$&'/=?^_`{{|}}~.+-]+))?"
    r"@(?P<domain>[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+)$"
)
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 field name: printable ASCII but ':'
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_SECRET_PARAM = re.compile(r"token|secret|key|pass|sig|auth", re.IGNORECASE)


class Action(StrEnum):
    MAILBOX = "mailbox"
    FORWARD = "forward"
    HTTP = "http"
    REJECT = "reject"
    DROP = "drop"


class PatternKind(StrEnum):
    EXACT = "exact"
    TAG = "tag"
    CATCH_ALL = "catch-all"
    REGEX = "regex"


@dataclass(frozen=True)
class Pattern:
    """A recipient pattern, parsed: `text` as stored (an address pattern in lower case, a
    regex as written, between slashes)."""

    text: str
    kind: PatternKind
    domain: str | None  # an address pattern's domain (a regex has none)
    address: str | None  # an exact or tag pattern's address without its tag (None otherwise)
    regex: re.Pattern[str] = field(repr=False, compare=False)

    def captures(self, address: str) -> dict[str, str] | None:
        """What the pattern captures from `address`, or None if it does not match it."""
        if len(address) > MAX_ADDRESS:
            return None
        m = self.regex.fullmatch(address.lower())
        if m is None:
            return None
        if self.kind is PatternKind.REGEX:
            return {k: v for k, v in m.groupdict().items() if v is not None}
        return {k: v for k, v in m.groupdict().items() if v}  # no empty tag (`help+@`)


@dataclass(frozen=True)
class Route:
    """One of a tenant's routes. Constructing one parses (and bounds) its pattern and header
    conditions; `target` is the mailbox or forward address, the URL, or the reject text."""

    id: str
    tenant: str
    priority: int
    pattern: str
    action: Action
    target: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case header name, regex)
    continue_matching: bool = False
    created_at: datetime | None = field(default=None, compare=False)
    recipient: Pattern = field(init=False, repr=False, compare=False)  # the pattern, parsed

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action(self.action))
        object.__setattr__(self, "headers", tuple(parse_condition(f"{n}: {r}") for n, r in self.headers))
        object.__setattr__(self, "recipient", parse_pattern(self.pattern))

    def captures(self, address: str) -> dict[str, str] | None:
        return self.recipient.captures(address)

    @property
    def refuses_at_rcpt(self) -> bool:
        """A reject that needs no header: RCPT TO can be refused with its reply."""
        return self.action is Action.REJECT and not self.headers

    @property
    def reply(self) -> str:
        """The SMTP reply of a reject route."""
        return f"550 5.7.1 {_printable(self.target) or DEFAULT_REJECT}"

    def describe(self) -> str:
        """The action in words: `mailbox help@example.org`, `reject "Gone"`, `drop`."""
        if self.action is Action.REJECT:
            return f'reject "{self.target}"' if self.target else "reject"
        return f"{self.action} {self.target}".strip()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "priority": self.priority,
            "pattern": self.pattern,
            "kind": str(self.recipient.kind),
            "headers": [list(h) for h in self.headers],
            "action": str(self.action),
            "target": self.target,
            "continue": self.continue_matching,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


@dataclass(frozen=True)
class RouteMatch:
    """A route that takes a message, and what its pattern captured from the recipient."""

    route: Route
    captures: dict[str, str]


Headers = Message | Mapping[str, str] | Iterable[tuple[str, str]]


# -- parsing and bounding (pure) ---------------------------------------------------------------


@lru_cache(maxsize=4096)
def parse_pattern(text: str) -> Pattern:
    """A recipient pattern (see the module docstring), or UsageError saying what is wrong."""
    raw = text.strip()
    if len(raw) > 2 and raw.startswith("/") and raw.endswith("/"):
        body = raw[1:-1]
        return Pattern(raw, PatternKind.REGEX, None, None, _bounded_regex(body, "the pattern", budget=3))
    found = _ADDRESS_PATTERN.match(raw.lower())
    if found is None or ".." in raw:
        raise UsageError(
            f"{text!r} is not a route pattern: write an address (help@example.org), an address with "
            "any +tag (help+*@example.org), every address at a domain (*@example.org), or a /regex/"
        )
    local, tag, domain = found.group("local"), found.group("tag"), found.group("domain")
    at = "@" + re.escape(domain)
    if local == "*":
        if tag is not None:
            raise UsageError(f"{text!r}: *@{domain} already takes every +tag; write it without one")
        return Pattern(
            raw.lower(), PatternKind.CATCH_ALL, domain, None, re.compile(r"(?P<local>[^@+]*)(?:\+(?P<tag>[^@]*))?" + at)
        )
    if tag == "*":
        return Pattern(
            raw.lower(),
            PatternKind.TAG,
            domain,
            f"{local}@{domain}",
            re.compile(re.escape(local) + r"\+(?P<tag>[^@]+)" + at),
        )
    if tag is not None:  # one tag of the address only
        return Pattern(
            raw.lower(),
            PatternKind.EXACT,
            domain,
            f"{local}@{domain}",
            re.compile(re.escape(local) + rf"\+(?P<tag>{re.escape(tag)})" + at),
        )
    return Pattern(
        raw.lower(),
        PatternKind.EXACT,
        domain,
        f"{local}@{domain}",
        re.compile(re.escape(local) + r"(?:\+(?P<tag>[^@]*))?" + at),
    )


@lru_cache(maxsize=4096)
def parse_condition(text: str) -> tuple[str, str]:
    """`Name: regex` -> (lower-case name, regex), the regex bounded like a pattern's."""
    name, regex = split_header(text)
    if not regex:
        raise UsageError(f"header condition {text!r} has no regular expression after the colon")
    _header_regex(regex)
    return name.lower(), regex


def split_header(text: str) -> tuple[str, str]:
    """`Name: value` -> (Name, value), or UsageError."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not _HEADER_NAME.match(name):
        raise UsageError(f"{text!r} is not a header: write it as 'Name: value' (like 'Subject: invoice')")
    return name, value.strip()


@lru_cache(maxsize=4096)
def _header_regex(regex: str) -> re.Pattern[str]:
    return _bounded_regex(regex, "a header condition", budget=2)


def _bounded_regex(body: str, what: str, *, budget: int) -> re.Pattern[str]:
    if not body:
        raise UsageError(f"{what} is an empty regular expression")
    if len(body) > MAX_REGEX:
        raise UsageError(f"{what} is {len(body)} characters long; at most {MAX_REGEX}")
    try:
        compiled = re.compile(body, re.IGNORECASE)
        tree = _sre.parse(body, re.IGNORECASE)
    except (re.error, OverflowError, RecursionError) as exc:
        raise UsageError(f"{what} /{body}/ is not a regular expression: {exc}") from exc
    variable = _variable_repeats(tree, what, inside_repeat=False)
    if variable > budget:
        raise UsageError(
            f"{what} /{body}/ has {variable} variable repeats (*, +, ?, {{m,n}}); at most {budget}, "
            "so that matching mail from anyone stays fast"
        )
    return compiled


def _variable_repeats(tree: Iterable[tuple[Any, Any]], what: str, *, inside_repeat: bool) -> int:
    """How many variable repeats the parsed expression has; UsageError for the shapes that
    backtrack without bound (a repeat inside a repeat, an alternation under one, a backreference)."""
    count = 0
    for op, av in tree:
        name = str(op)
        if name.startswith("GROUPREF"):
            raise UsageError(f"{what} uses a backreference, which can take unbounded time: not accepted")
        if name.endswith("REPEAT"):
            low, high, body = av
            if inside_repeat:
                raise UsageError(
                    f"{what} repeats something that repeats (like (a+)+): that can take unbounded time; "
                    "use a character class, like [a-z.]+"
                )
            count += low != high
            count += _variable_repeats(body, what, inside_repeat=high > 1)
        elif name == "BRANCH":
            if inside_repeat:
                raise UsageError(
                    f"{what} repeats an alternation (like (ab|cd)+): that can take unbounded time; "
                    "use a character class or write the alternatives out"
                )
            count += sum(_variable_repeats(b, what, inside_repeat=False) for b in av[1])
        elif name == "SUBPATTERN":
            count += _variable_repeats(av[3], what, inside_repeat=inside_repeat)
        elif name in ("ASSERT", "ASSERT_NOT"):
            count += _variable_repeats(av[1], what, inside_repeat=inside_repeat)
        elif name == "ATOMIC_GROUP":
            count += _variable_repeats(av, what, inside_repeat=inside_repeat)
    return count


def check_action(action: Action | str, target: str = "", *, continue_matching: bool = False) -> tuple[Action, str]:
    """The action and its target as stored, or UsageError: a forward address in canonical
    form, an http(s) URL without credentials, a reject text of one printable line."""
    try:
        act = Action(action)
    except ValueError:
        raise UsageError(f"{action!r} is not a route action: {', '.join(a.value for a in Action)}") from None
    target = target.strip()
    if continue_matching and act in (Action.REJECT, Action.DROP):
        raise UsageError(f"a {act} route ends the matching: it cannot --continue")
    if act is Action.MAILBOX:
        if not target:
            raise UsageError("--mailbox needs the mailbox's address")
        return act, target.strip("<>").lower()
    if act is Action.FORWARD:
        try:
            return act, normalize_email(target)
        except EmailNotValidError as exc:
            raise UsageError(f"cannot forward to {target!r}: {exc}") from exc
    if act is Action.HTTP:
        return act, _check_url(target)
    if act is Action.REJECT:
        if len(target) > MAX_REJECT_TEXT or _printable(target) != target:
            raise UsageError(
                f"the reject text must be one line of printable ASCII, at most {MAX_REJECT_TEXT} characters"
            )
        return act, target
    if target:
        raise UsageError("a drop route takes no target")
    return act, ""


def _check_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # a bracketed host that is no IPv6 address, an unclosed bracket
        raise UsageError(f"{url!r} is not an http:// or https:// URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{url!r} is not an http:// or https:// URL")
    if len(url) > MAX_URL or any(c.isspace() or not c.isprintable() for c in url):
        raise UsageError(f"the URL must be at most {MAX_URL} printable characters, without spaces")
    # The URL is recorded in the log and shown by `routes list`: it must carry no secret.
    if parts.username is not None or parts.password is not None:
        raise UsageError("the URL must not carry credentials (user:password@): it is recorded in the event log")
    secret = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_PARAM.search(k)]
    if secret:
        raise UsageError(
            f"the URL's query parameter {secret[0]!r} looks like a secret, and the URL is recorded in the event "
            "log: leave it out (the POST is signed instead)"
        )
    return url


def _printable(text: str) -> str:
    """`text` with anything but printable ASCII left out (a reply line stays one line)."""
    return "".join(c for c in text if " " <= c <= "~")


# -- matching (pure) -----------------------------------------------------------------------------


def _in_order(routes: Iterable[Route]) -> list[Route]:
    return sorted(routes, key=lambda r: r.priority)  # stable: ties stay in the order given (added)


def rcpt_match(routes: Iterable[Route], address: str) -> Route | None:
    """At RCPT TO, before any header is known: the first route whose recipient pattern matches
    (one with header conditions counts: it may take the message). It decides whether the
    address is refused (`Route.refuses_at_rcpt`): a later reject never refuses a message an
    earlier route took. None: no route takes the address."""
    for route in _in_order(routes):
        if route.captures(address) is not None:
            return route
    return None


def match(routes: Iterable[Route], address: str, headers: Headers = ()) -> list[RouteMatch]:
    """The routes that take a message for `address`, in order: every one whose pattern and
    header conditions match, up to and including the first that does not continue. A reject
    after a route took the message ends the list without being in it. `headers` is the
    message's (an email.message.Message, a mapping, or (name, value) pairs); `routes` are
    one tenant's, the one that receives for the address's domain (Directory.routes_for)."""
    values: dict[str, list[str]] | None = None
    taken: list[RouteMatch] = []
    for route in _in_order(routes):
        captures = route.captures(address)
        if captures is None:
            continue
        if route.headers:
            values = _header_values(headers) if values is None else values
            if not all(any(_header_regex(rx).search(v) for v in values.get(name, ())) for name, rx in route.headers):
                continue
        if route.action is Action.REJECT and taken:
            break
        taken.append(RouteMatch(route, captures))
        if not route.continue_matching:
            break
    return taken


def _header_values(headers: Headers) -> dict[str, list[str]]:
    """Lower-case name -> its values: unfolded, RFC 2047 words decoded, each cut to
    MAX_HEADER_VALUE characters (a condition searches no further)."""
    pairs = headers.items() if isinstance(headers, Message | Mapping) else headers
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        text = _FOLD.sub("", str(value))
        try:
            text = str(make_header(decode_header(text)))
        except (ValueError, LookupError, UnicodeError):
            pass  # not decodable: matched as it came
        out.setdefault(str(name).strip().lower(), []).append(text[:MAX_HEADER_VALUE])
    return out


# -- writes: add and remove ------------------------------------------------------------------------


def _tenant(store: EventStore) -> str:
    if store.tenant is None:
        raise UsageError("routes belong to a tenant: act for one (--tenant)")
    return store.tenant


def add_route(
    store: EventStore,
    pattern: str,
    action: Action | str,
    target: str = "",
    *,
    headers: Sequence[str] = (),
    priority: int | None = None,
    continue_matching: bool = False,
) -> Route:
    """Add a route for the tenant: its pattern at one of the tenant's inbound domains (or a
    regex), `headers` as 'Name: regex' conditions, a mailbox target one of its mailboxes.

    The tenant's domains are locked for the transaction: route changes of one tenant take
    turns, so routes of equal priority keep the order they were added in, also on a rebuild."""
    tenant = _tenant(store)
    parsed = parse_pattern(pattern)
    conditions = [parse_condition(h) for h in headers]
    act, target = check_action(action, target, continue_matching=continue_matching)
    priority = DEFAULT_PRIORITY if priority is None else priority
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise UsageError(f"the priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}")
    if act is Action.FORWARD and parsed.captures(target) is not None:
        raise UsageError(f"the route would forward mail for {target} to {target} again: a loop")
    with inline.writing(store) as w:
        domains = {d for (d,) in w.conn.execute(q.ROUTE_DOMAINS_LOCKED).fetchall()}
        if not domains:
            raise UsageError("this tenant receives mail for no domain yet: `mailflow domains add <domain>` first")
        if parsed.domain is not None and parsed.domain not in domains:
            raise UsageError(
                f"{parsed.domain} is not one of this tenant's inbound domains: `mailflow domains add {parsed.domain}`"
            )
        if parsed.address is not None and w.conn.execute(q.MAILBOX_FOR_ROUTE, (parsed.address,)).fetchone():
            raise ConflictError(
                f"{parsed.address} is a mailbox, which keeps its mail before any route is tried; "
                "remove the mailbox first, or route another address to it (--mailbox)"
            )
        if act is Action.MAILBOX and w.conn.execute(q.MAILBOX_FOR_ROUTE, (target,)).fetchone() is None:
            raise NotFoundError(f"no mailbox {target} (see `mailflow mailboxes list`)")
        route_id = _new_id(w.conn)
        event = RouteAdded(
            route_id=route_id,
            priority=priority,
            pattern=parsed.text,
            headers=conditions,
            action=act.value,
            target=target,
            continue_matching=continue_matching,
        )
        [env] = w.record([(f"route-{route_id}", event.to_new())])
    return Route(
        route_id, tenant, priority, parsed.text, act, target, tuple(conditions), continue_matching, env.recorded_at
    )


def _new_id(conn: psycopg.Connection) -> str:
    """Eight hex digits, not yet a route of the tenant's (short enough to type)."""
    while True:
        candidate = uuid.uuid4().hex[:8]
        if conn.execute(q.ROUTE_EXISTS, (candidate,)).fetchone() is None:
            return candidate


def remove_route(store: EventStore, route_id: str) -> None:
    route_id = route_id.strip().lower()
    with inline.writing(store) as w:
        if w.conn.execute(q.ROUTE_EXISTS, (route_id,)).fetchone() is None:
            raise NotFoundError(f"no route {route_id} (see `mailflow routes list`)")
        w.record([(f"route-{route_id}", RouteRemoved(route_id=route_id).to_new())])


# -- reads ---------------------------------------------------------------------------------------


def _route(row: dict[str, Any]) -> Route:
    return Route(
        id=row["id"],
        tenant=row["tenant"],
        priority=row["priority"],
        pattern=row["pattern"],
        action=Action(row["action"]),
        target=row["target"],
        headers=tuple((str(n), str(r)) for n, r in row["headers"]),
        continue_matching=row["continue_matching"],
        created_at=row["created_at"],
    )


def from_row(row: dict[str, Any]) -> Route:
    """A route from a row with LIST_ROUTES' columns (for readers with their own query: the API's pages)."""
    return _route(row)


def routes(conn: psycopg.Connection) -> list[Route]:
    """The connection's tenant's routes, in the order they are tried."""
    with conn.cursor(row_factory=dict_row) as cur:
        return [_route(r) for r in cur.execute(q.LIST_ROUTES).fetchall()]


def by_tenant(conn: psycopg.Connection) -> dict[str, tuple[Route, ...]]:
    """Every tenant's routes the connection sees, in order, for the directory snapshot. A row
    that no longer parses (written around `routes add`) is left out and logged, so that it
    cannot stop the server from reloading its directory."""
    found: dict[str, list[Route]] = {}
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(q.DIRECTORY_ROUTES).fetchall():
            try:
                route = _route(row)
            except (UsageError, ValueError, TypeError) as exc:
                log.warning("inbound.route_unusable", tenant=row["tenant"], route=row["id"], error=str(exc)[:300])
                continue
            found.setdefault(route.tenant, []).append(route)
    return {t: tuple(rs) for t, rs in found.items()}


# -- the inline projection -----------------------------------------------------------------------


def _per_event(apply: Callable[[psycopg.Connection, dict, datetime, str], object]):
    def run(conn: psycopg.Connection, events: list[Envelope]) -> None:
        for env in events:
            apply(conn, env.data, env.recorded_at, str(env.metadata.tenant))

    return run


def _added(conn: psycopg.Connection, d: dict, at: datetime, tenant: str) -> None:
    conn.execute(
        q.ADD_ROUTE,
        (
            tenant,
            d["route_id"],
            d["priority"],
            d["pattern"],
            Jsonb(d.get("headers", [])),
            d["action"],
            d.get("target", ""),
            bool(d.get("continue_matching")),
            at,
        ),
    )


PROJECTION = register(
    InlineProjection(
        "routes",
        "inbound routes, each tenant's in order (inline)",
        ("routes",),
        {
            "RouteAdded": _per_event(_added),
            "RouteRemoved": _per_event(lambda c, d, at, t: c.execute(q.REMOVE_ROUTE, (t, d["route_id"]))),
        },
    )
)
