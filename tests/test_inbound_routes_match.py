"""Inbound routes, without servers: the pattern forms, the bounds on regular expressions, the
order routes are tried in, header conditions, and what RCPT TO can decide before the headers."""

from __future__ import annotations

import time
from email.message import Message

import pytest

from mailflow.errors import UsageError
from mailflow.inbound import routes
from mailflow.inbound.routes import Action, PatternKind, Route, check_action, match, parse_pattern, rcpt_match

pytestmark = pytest.mark.pure


def route(rid: str, pattern: str, action: str = "drop", target: str = "", **kw) -> Route:
    return Route(rid, "acme", kw.pop("priority", 100), pattern, Action(action), target, **kw)


def ids(matches) -> list[str]:
    return [m.route.id for m in matches]


# -- patterns ---------------------------------------------------------------------------------


def test_an_address_pattern_takes_that_address_in_any_case_with_or_without_a_tag():
    p = parse_pattern("Help@Acme.Example")
    assert (p.text, p.kind, p.domain, p.address) == ("help@acme.example", PatternKind.EXACT, "acme.example", p.text)
    assert p.captures("help@acme.example") == {}
    assert p.captures("HELP+Billing@acme.example") == {"tag": "billing"}
    assert p.captures("help+@acme.example") == {}  # an empty tag is no tag
    for other in ("helpdesk@acme.example", "x.help@acme.example", "help@acme.example.evil", "help@sub.acme.example"):
        assert p.captures(other) is None, other


def test_an_address_with_one_tag_takes_that_tag_only():
    p = parse_pattern("help+billing@acme.example")
    assert p.kind is PatternKind.EXACT and p.address == "help@acme.example"
    assert p.captures("help+billing@acme.example") == {"tag": "billing"}
    assert p.captures("help@acme.example") is None and p.captures("help+sales@acme.example") is None


def test_a_tag_pattern_takes_only_addresses_with_a_tag_and_captures_it():
    p = parse_pattern("help+*@acme.example")
    assert p.kind is PatternKind.TAG and p.address == "help@acme.example"
    assert p.captures("help+order-42@acme.example") == {"tag": "order-42"}
    assert p.captures("help+a+b@acme.example") == {"tag": "a+b"}
    assert p.captures("help@acme.example") is None and p.captures("other+x@acme.example") is None


def test_a_catch_all_takes_every_address_at_its_domain_and_none_at_another():
    p = parse_pattern("*@ACME.example")
    assert (p.kind, p.domain, p.address) == (PatternKind.CATCH_ALL, "acme.example", None)
    assert p.captures("anyone@acme.example") == {"local": "anyone"}
    assert p.captures("Sales+EU@acme.example") == {"local": "sales", "tag": "eu"}
    assert p.captures("anyone@other.example") is None and p.captures("anyone@mail.acme.example") is None


def test_a_regex_matches_the_whole_lower_cased_address_and_its_named_groups_are_the_captures():
    p = parse_pattern(r"/sup-(?P<team>[a-z]+)(-(?P<region>eu|us))?@acme\.example/")
    assert p.kind is PatternKind.REGEX and p.domain is None
    assert p.captures("SUP-Billing-EU@acme.example") == {"team": "billing", "region": "eu"}
    assert p.captures("sup-ops@acme.example") == {"team": "ops"}  # a group that took nothing is left out
    assert p.captures("xsup-ops@acme.example") is None  # the whole address, not a part of it
    assert p.captures("sup-ops@acme.example.evil") is None


@pytest.mark.parametrize(
    "pattern",
    [
        "he*lp@acme.example",  # a wildcard inside a local part
        "*+*@acme.example",  # a catch-all already takes every tag
        "*@*.example",  # no wildcard domains: a pattern is at one domain
        "acme.example",
        "help@localhost",
        "a..b@acme.example",
        "victim%foreign.example@acme.example",
        "/[/",
        "//",
    ],
)
def test_patterns_that_are_none_of_the_forms_are_refused_saying_what_to_write(pattern):
    with pytest.raises(UsageError):
        parse_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("/(a+)+@acme.example/", "repeats something that repeats"),
        (r"/(?:[a-z]+\.)+example/", "repeats something that repeats"),
        ("/(?:a?){20}b/", "repeats something that repeats"),
        ("/(?:ab|cd)*@acme.example/", "alternation"),
        (r"/(a)x\1/", "backreference"),
        ("/a*b*c*d*@acme.example/", "4 variable repeats"),
        ("/" + "a" * 201 + "/", "201 characters"),
    ],
)
def test_regexes_that_could_backtrack_without_bound_are_refused_where_they_are_written(pattern, why):
    with pytest.raises(UsageError, match=why):
        parse_pattern(pattern)


def test_the_slowest_expressions_accepted_stay_fast_on_the_longest_input_from_anyone():
    """The bounds together: 3 variable repeats over at most 254 characters, 2 over at most 512
    of a header. Without the input bounds these take minutes (n**4 and n**3 backtracking)."""
    slow_address = route("a", "/.*.*.*!/")
    slow_header = route("h", "*@acme.example", headers=(("subject", ".*.*!"),))
    start = time.perf_counter()
    assert rcpt_match([slow_address], "a" * 240 + "@acme.example") is None
    assert match([slow_address], "a" * 5000 + "@acme.example") == []
    assert match([slow_header], "x@acme.example", {"Subject": "a" * 100_000}) == []
    assert time.perf_counter() - start < 2.0


def test_an_address_longer_than_254_characters_matches_no_route():
    long = "a" * 250 + "@acme.example"
    assert rcpt_match([route("all", "*@acme.example"), route("re", "/.*/")], long) is None


def test_header_conditions_are_bounded_like_patterns_and_need_a_name_and_a_regex():
    assert routes.parse_condition("X-Spam-Flag:  YES ") == ("x-spam-flag", "YES")
    for bad in ("Subject urgent", "Sub ject: x", "Subject:", "Subject: (a+)+"):
        with pytest.raises(UsageError):
            routes.parse_condition(bad)


# -- actions ----------------------------------------------------------------------------------


def test_actions_are_stored_in_their_canonical_form():
    assert check_action("forward", " Ops@Example.NET ") == (Action.FORWARD, "ops@example.net")
    assert check_action("mailbox", "<Help@Acme.Example>") == (Action.MAILBOX, "help@acme.example")
    assert check_action("http", "https://hooks.example.net/in?team=ops") == (
        Action.HTTP,
        "https://hooks.example.net/in?team=ops",
    )
    assert check_action("reject", "  Gone  ") == (Action.REJECT, "Gone")
    assert check_action("drop") == (Action.DROP, "")


@pytest.mark.parametrize(
    ("action", "target", "continues", "why"),
    [
        ("forward", "not an address", False, "cannot forward"),
        ("http", "ftp://hooks.example.net/", False, "not an http"),
        ("http", "https://user:pw@hooks.example.net/", False, "credentials"),
        ("http", "https://hooks.example.net/?api_key=s3cret", False, "looks like a secret"),
        ("reject", "Gone\r\n250 OK", False, "one line"),
        ("drop", "somewhere", False, "no target"),
        ("reject", "", True, "cannot --continue"),
        ("archive", "", False, "not a route action"),
    ],
)
def test_actions_that_could_not_be_carried_out_safely_are_refused(action, target, continues, why):
    with pytest.raises(UsageError, match=why):
        check_action(action, target, continue_matching=continues)


def test_a_reject_reply_stays_one_smtp_line_whatever_text_was_stored():
    stored = route("r", "x@acme.example", "reject", "Gone\r\n250 2.0.0 OK")  # written around check_action
    assert stored.reply == "550 5.7.1 Gone250 2.0.0 OK" and "\n" not in stored.reply
    assert route("r", "x@acme.example", "reject").reply == f"550 5.7.1 {routes.DEFAULT_REJECT}"


# -- the order routes are tried in --------------------------------------------------------------


def test_routes_are_tried_by_priority_and_ties_in_the_order_given():
    later = route("later", "*@acme.example", priority=100)
    first = route("first", "*@acme.example", priority=5)
    tie = route("tie", "*@acme.example", priority=100)
    assert ids(match([later, tie, first], "x@acme.example")) == ["first"]
    assert ids(match([later, tie], "x@acme.example")) == ["later"]
    assert ids(match([tie, later], "x@acme.example")) == ["tie"]


def test_matching_goes_on_past_routes_that_continue_and_stops_at_the_first_that_does_not():
    archive = route("archive", "*@acme.example", "forward", "archive@example.net", priority=1, continue_matching=True)
    sales = route("sales", "sales+*@acme.example", "mailbox", "desk@acme.example", priority=2)
    never = route("never", "*@acme.example", "http", "https://hooks.example.net/", priority=3)
    got = match([never, sales, archive], "Sales+EU@acme.example")
    assert [(m.route.id, m.captures) for m in got] == [
        ("archive", {"local": "sales", "tag": "eu"}),
        ("sales", {"tag": "eu"}),
    ]
    assert ids(match([never, sales, archive], "info@acme.example")) == ["archive", "never"]


def test_a_reject_after_a_route_took_the_message_ends_the_matching_without_refusing_it():
    copy = route("copy", "*@acme.example", "forward", "audit@example.net", priority=1, continue_matching=True)
    refuse = route("refuse", "*@acme.example", "reject", "No", priority=2)
    after = route("after", "*@acme.example", "drop", priority=3)
    assert ids(match([copy, refuse, after], "x@acme.example")) == ["copy"]
    assert ids(match([refuse, after], "x@acme.example")) == ["refuse"]


def test_header_conditions_must_all_match_by_name_in_any_letter_case():
    urgent = route(
        "urgent",
        "*@acme.example",
        "forward",
        "oncall@example.net",
        priority=1,
        headers=(("Subject", r"\burgent\b"), ("x-env", "^prod$")),
    )
    rest = route("rest", "*@acme.example", priority=2)
    m = Message()
    m["SUBJECT"] = "Re: =?utf-8?q?URGENT_caf=C3=A9?= down"  # an encoded word, decoded before matching
    m["X-Env"] = "staging"
    m["x-env"] = "prod"  # any header of the name may match
    assert ids(match([urgent, rest], "ops@acme.example", m)) == ["urgent"]
    assert ids(match([urgent, rest], "ops@acme.example", {"Subject": "urgent"})) == ["rest"]  # one of two
    assert ids(match([urgent, rest], "ops@acme.example", [("Subject", "not urgently"), ("X-Env", "prod")])) == ["rest"]
    folded = [("Subject", "a very long subject that is\r\n urgent"), ("X-Env", "prod")]
    assert ids(match([urgent, rest], "ops@acme.example", folded)) == ["urgent"]


def test_at_rcpt_the_first_route_whose_pattern_matches_decides_even_with_header_conditions():
    spam = route("spam", "*@acme.example", "reject", headers=(("subject", "viagra"),), priority=1)
    sales = route("sales", "sales@acme.example", "mailbox", "desk@acme.example", priority=2)
    gone = route("gone", "*@acme.example", "reject", "Gone", priority=3)
    picked = rcpt_match([gone, sales, spam], "sales@acme.example")
    assert picked is spam and not picked.refuses_at_rcpt  # it may take it: the headers are not known yet
    picked = rcpt_match([gone, sales], "sales@acme.example")
    assert picked is sales and not picked.refuses_at_rcpt
    picked = rcpt_match([gone, sales], "other@acme.example")
    assert picked is gone and picked.refuses_at_rcpt and picked.reply == "550 5.7.1 Gone"
    assert rcpt_match([sales], "other@acme.example") is None
