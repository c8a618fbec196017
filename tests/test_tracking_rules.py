"""Open and click tracking, decided (mail/tracking.py): signed tokens, link rewriting that changes
nothing but the rewritten hrefs, and which opens and clicks are people - no servers."""

from __future__ import annotations

import re
import string
import uuid

import pytest

from mailflow.mail import tracking
from mailflow.mail.tracking import (
    MAX_LINK_INDEX,
    REASONS,
    BadToken,
    TrackingToken,
    Verdict,
    classify_click,
    classify_open,
    rewrite_html,
    rewrite_text,
    sign_token,
    verify_token,
)

pytestmark = pytest.mark.pure

OLD_KEY = b"old-key-0123456789abcdef0123456789"
NEW_KEY = b"new-key-0123456789abcdef0123456789"
JOB = uuid.UUID("0190b7a4-5c1e-7d2a-9f3b-2c4d5e6f7a8b")
OTHER_JOB = uuid.UUID("0190b7a4-5c1e-7d2a-9f3b-2c4d5e6f7a8c")
TOKEN = TrackingToken("acme-42", JOB, 3)
TOKEN_CHARS = string.ascii_letters + string.digits + "-_.=+/~%"


# --- Signed tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        TrackingToken("acme-42", JOB, None),
        TrackingToken("acme-42", JOB, MAX_LINK_INDEX),
        TrackingToken("ünïcode-tenant", JOB, 7),
    ],
    ids=["pixel", "last-allowed-link", "unicode-tenant"],
)
def test_a_signed_token_verifies_to_the_same_tenant_job_and_link(token):
    assert verify_token([NEW_KEY], sign_token(NEW_KEY, token)) == token


def test_a_token_is_url_safe_and_well_under_100_characters():
    text = sign_token(NEW_KEY, TrackingToken("tenant-0190b7a4", JOB, 9999))
    assert len(text) < 100
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", text)


def test_after_a_key_rotation_tokens_signed_by_the_old_key_still_verify_and_retired_keys_do_not():
    old = sign_token(OLD_KEY, TOKEN)
    new = sign_token(NEW_KEY, TOKEN)
    assert verify_token([OLD_KEY, NEW_KEY], old) == TOKEN
    assert verify_token([OLD_KEY, NEW_KEY], new) == TOKEN
    with pytest.raises(BadToken):
        verify_token([NEW_KEY], old)


def test_every_single_character_change_of_a_token_is_rejected():
    text = sign_token(NEW_KEY, TOKEN)
    tried = 0
    for i, original in enumerate(text):
        for replacement in TOKEN_CHARS:
            if replacement == original:
                continue
            mutated = text[:i] + replacement + text[i + 1 :]
            with pytest.raises(BadToken):
                verify_token([OLD_KEY, NEW_KEY], mutated)
            tried += 1
    assert tried > 60 * len(text)


def test_every_truncation_and_every_extension_of_a_token_is_rejected():
    text = sign_token(NEW_KEY, TOKEN)
    for cut in range(len(text)):
        for broken in (text[:cut], text[cut + 1 :], text[:cut] + text[cut + 1 :]):
            with pytest.raises(BadToken):
                verify_token([NEW_KEY], broken)
    for extra in ("=", "==", "A", ".", " ", "\n"):
        with pytest.raises(BadToken):
            verify_token([NEW_KEY], text + extra)


def test_another_tenants_or_jobs_payload_under_this_tokens_signature_is_rejected():
    text = sign_token(NEW_KEY, TOKEN)
    signature = text.rsplit(".", 1)[1]
    for other in (
        TrackingToken("acme-43", JOB, 3),
        TrackingToken("acme-42", OTHER_JOB, 3),
        TrackingToken("acme-42", JOB, 4),
    ):
        other_payload = sign_token(NEW_KEY, other).rsplit(".", 1)[0]
        with pytest.raises(BadToken):
            verify_token([NEW_KEY], f"{other_payload}.{signature}")


def test_a_genuinely_signed_token_for_a_link_out_of_range_is_rejected():
    payload = JOB.bytes + (MAX_LINK_INDEX + 1).to_bytes(2, "big") + b"acme-42"
    forged = tracking._signer([NEW_KEY]).sign(tracking._b64(payload)).decode()
    with pytest.raises(BadToken, match="link index"):
        verify_token([NEW_KEY], forged)


@pytest.mark.parametrize("link", [-1, MAX_LINK_INDEX + 1], ids=["negative", "too-large"])
def test_a_token_for_a_link_out_of_range_cannot_be_made(link):
    with pytest.raises(ValueError, match="link index"):
        TrackingToken("acme-42", JOB, link)


@pytest.mark.parametrize(
    "text",
    ["", "é" * 40, "\ud800" * 80, "A" * 5000, "x." + "A" * 43, None],
    ids=["empty", "non-ascii", "lone-surrogates", "huge", "empty-payload", "none"],
)
def test_arbitrary_input_is_a_bad_token_and_nothing_else(text):
    with pytest.raises(BadToken):
        verify_token([NEW_KEY], text)


# --- Link rewriting: HTML -------------------------------------------------------------------

CLICK = "https://t.example/c/{}"


def click(i: int) -> str:
    return CLICK.format(i)


DOCUMENT = """<!DOCTYPE html>
<HTML lang=en>
<head><style>a[href^="https://css.example/"] { color: red }</style>
<script>var s = '<a href="https://script.example/">';</script></head>
<Body>
<!-- <a href="https://comment.example/">old</a> -->
<A HREF='https://a.example/x?y=1&amp;z=2' class=Btn>single</A>
<a class="x"
   href = "https://b.example/path#frag"
   target=_blank>multi-line, spaces around =</a>
<a href=https://c.example/u>unquoted</a>
<p>text &amp; more &nbsp; <b>bold</b></p>
<map><AREA shape=rect href="HTTPS://d.example/area" coords="0,0,1,1"></map>
<a href="https://a.example/x?y=1&z=2">same link again</a>
<a href=" https://e.example/ ">spaces a browser ignores</a>
<img src="https://img.example/logo.png" alt="">
</Body>
</HTML>
"""
# The values as written, in document order, and the links they stand for.
DOCUMENT_VALUES = [
    "'https://a.example/x?y=1&amp;z=2'",
    '"https://b.example/path#frag"',
    "https://c.example/u",
    '"HTTPS://d.example/area"',
    '"https://a.example/x?y=1&z=2"',
    '" https://e.example/ "',
]
DOCUMENT_LINKS = [
    "https://a.example/x?y=1&z=2",
    "https://b.example/path#frag",
    "https://c.example/u",
    "HTTPS://d.example/area",
    "https://e.example/",
]


def test_rewriting_changes_nothing_but_the_rewritten_href_values():
    out = rewrite_html(DOCUMENT, click, None)
    rewritten = list(re.finditer(r"""(["'])https://t\.example/c/\d+\1""", out.body))
    assert len(rewritten) == len(DOCUMENT_VALUES)
    restored, pos = [], 0
    for m, original in zip(rewritten, DOCUMENT_VALUES):
        restored += [out.body[pos : m.start()], original]
        pos = m.end()
    assert "".join(restored) + out.body[pos:] == DOCUMENT


def test_rewritten_links_are_indexed_in_document_order_and_a_repeated_url_keeps_its_index():
    out = rewrite_html(DOCUMENT, click, None)
    assert out.links == DOCUMENT_LINKS
    hrefs = re.findall(r"""https://t\.example/c/(\d+)""", out.body)
    assert hrefs == ["0", "1", "2", "3", "0", "4"]


def test_the_stored_link_is_unescaped_and_the_new_href_is_escaped():
    html = '<a href="https://shop.example/?a=1&amp;b=&quot;x&quot;&#39;">buy</a>'
    out = rewrite_html(html, lambda i: f'https://t.example/c/{i}?a=1&b="2"', None)
    assert out.links == ['https://shop.example/?a=1&b="x"\'']
    assert out.body == '<a href="https://t.example/c/0?a=1&amp;b=&quot;2&quot;">buy</a>'


def test_a_single_quoted_href_keeps_its_quotes_and_an_unquoted_one_gets_double_quotes():
    out = rewrite_html("<a href='https://a.example/'>a</a><a href=https://b.example/>b</a>", click, None)
    assert out.body == "<a href='https://t.example/c/0'>a</a><a href=\"https://t.example/c/1\">b</a>"


@pytest.mark.parametrize(
    "html",
    [
        '<a href="mailto:ann@example.org">mail</a>',
        '<a href="#section-2">jump</a>',
        '<a href="/relative/path">relative</a>',
        '<a href="//cdn.example/x">scheme-relative</a>',
        '<a data-mailflow-notrack href="https://direct.example/">opted out</a>',
        '<a href="https://x.example/?u={{ contact.id }}">unrendered</a>',
        '<a href="https://mail.example/unsubscribe/tok123">unsubscribe</a>',
        '<link rel="stylesheet" href="https://css.example/s.css">',
    ],
    ids=[
        "mailto",
        "anchor",
        "relative-path",
        "scheme-relative",
        "notrack-attribute",
        "unrendered-template",
        "kept-prefix",
        "not-an-a-tag",
    ],
)
def test_links_that_must_stay_direct_are_left_exactly_as_they_are(html):
    out = rewrite_html(html, click, None, keep=("https://mail.example/unsubscribe/", "https://mail.example/prefs/"))
    assert out.body == html
    assert out.links == []


def test_the_pixel_goes_just_before_the_last_closing_body_tag_whatever_its_case():
    html = "<html><body><p>hi</p><!-- </body> --><script>x='</body>'</script></BODY >\n</html>"
    out = rewrite_html(html, click, "https://t.example/o/tok?a=1&b=2")
    pixel = (
        '<img src="https://t.example/o/tok?a=1&amp;b=2" width="1" height="1" alt="" '
        'style="display:block;border:0;width:1px;height:1px">'
    )
    assert out.body == html.replace("</BODY >", pixel + "</BODY >")


def test_without_a_closing_body_tag_the_pixel_is_appended():
    out = rewrite_html("<p>fragment</p>", click, "https://t.example/o/tok")
    assert out.body.startswith('<p>fragment</p><img src="https://t.example/o/tok"')
    assert out.body.endswith(">")


# --- Link rewriting: plain text -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "links"),
    [
        ("Read https://a.example/post.", "Read T0.", ["https://a.example/post"]),
        ("(see https://a.example/x)", "(see T0)", ["https://a.example/x"]),
        ("Link: <https://a.example/x?y=1>", "Link: <T0>", ["https://a.example/x?y=1"]),
        ("https://en.wikipedia.org/wiki/Mail_(protocol)!", "T0!", ["https://en.wikipedia.org/wiki/Mail_(protocol)"]),
        ("Really? https://a.example/?q=1&r=2?", "Really? T0?", ["https://a.example/?q=1&r=2"]),
        (
            "two lines\nhttp://a.example/\nHTTPS://B.example/x;",
            "two lines\nT0\nT1;",
            ["http://a.example/", "HTTPS://B.example/x"],
        ),
    ],
    ids=[
        "full-stop",
        "parenthesis",
        "angle-brackets",
        "balanced-parenthesis",
        "question-mark",
        "lines-and-case",
    ],
)
def test_bare_urls_in_text_are_rewritten_without_the_punctuation_after_them(text, expected, links):
    out = rewrite_text(text, lambda i: f"T{i}")
    assert (out.body, out.links) == (expected, links)


def test_text_leaves_mailto_unrendered_templates_and_kept_links_alone():
    text = "Write mailto:ann@example.org, or https://x.example/{{ id }}, or https://mail.example/unsubscribe/t1"
    out = rewrite_text(text, lambda i: f"T{i}", keep=("https://mail.example/unsubscribe/",))
    assert (out.body, out.links) == (text, [])


def test_the_text_part_reuses_the_html_parts_indexes_and_appends_its_own_links():
    html = rewrite_html('<a href="https://a.example/">a</a><a href="https://b.example/">b</a>', click, None)
    text = rewrite_text("B: https://b.example/ C: https://c.example/", click, links=html.links)
    assert text.body == "B: https://t.example/c/1 C: https://t.example/c/2"
    assert text.links is html.links
    assert html.links == ["https://a.example/", "https://b.example/", "https://c.example/"]


# --- Machine or human -----------------------------------------------------------------------

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
EDGE = CHROME + " Edg/124.0.2478.51"
FIREFOX = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"
SAFARI_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1"
)
IPHONE_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"
)
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17126; Pro)"
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
HOME_IP = "203.0.113.7"  # documentation range: in no table
HOME_IPV6 = "2001:db8::1"
APPLE_IP = "17.58.101.12"
BARRACUDA_IP = "209.222.82.10"
MIMECAST_IP = "205.139.110.60"
EXCHANGE_ONLINE_IP = "40.107.22.33"
A_MINUTE = 60.0


@pytest.mark.parametrize(
    "user_agent",
    [CHROME, FIREFOX, OUTLOOK, IPHONE_MAIL],
    ids=["chrome", "firefox", "outlook-desktop", "iphone-mail-without-mpp"],
)
def test_a_mail_client_opening_from_a_normal_address_a_minute_after_sending_is_a_human_open(user_agent):
    assert classify_open(user_agent, HOME_IP, A_MINUTE) == Verdict(False, "human")


@pytest.mark.parametrize(
    ("user_agent", "ip", "seconds", "reason"),
    [
        ("Mozilla/5.0", APPLE_IP, 4.0, "apple_mpp"),
        (SAFARI_IPHONE, APPLE_IP, 3600.0, "apple_mpp"),
        ("Mozilla/5.0", HOME_IP, A_MINUTE, "apple_mpp"),
        ("Mozilla/5.0", "::ffff:17.58.101.12", A_MINUTE, "apple_mpp"),
        (GMAIL_PROXY, "66.249.84.1", 3.0, "proxy_prefetch"),
        (CHROME, BARRACUDA_IP, A_MINUTE, "scanner_network"),
        ("python-requests/2.31.0", HOME_IP, A_MINUTE, "scanner_user_agent"),
        (
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            HOME_IP,
            A_MINUTE,
            "scanner_user_agent",
        ),
        (None, HOME_IP, A_MINUTE, "no_user_agent"),
        ("Thunderbird", HOME_IP, A_MINUTE, "implausible_user_agent"),
        (CHROME + " x" * 300, HOME_IP, A_MINUTE, "implausible_user_agent"),
        (CHROME, HOME_IP, 1.0, "too_fast"),
    ],
    ids=[
        "mpp-bare-agent-from-apple",
        "any-agent-from-apple-network",
        "mpp-bare-agent-elsewhere",
        "ipv4-mapped-apple-address",
        "gmail-proxy-at-delivery",
        "barracuda-network",
        "python-requests",
        "crawler-with-contact-url",
        "no-user-agent",
        "single-token-agent",
        "over-long-agent",
        "within-two-seconds",
    ],
)
def test_machine_opens_are_recognised_with_their_reason(user_agent, ip, seconds, reason):
    verdict = classify_open(user_agent, ip, seconds)
    assert verdict == Verdict(True, reason)
    assert verdict.reason in REASONS


@pytest.mark.parametrize(
    ("user_agent", "seconds"),
    [(GMAIL_PROXY, A_MINUTE), (YAHOO_PROXY, 300.0)],
    ids=["gmail-a-minute-later", "yahoo-five-minutes-later"],
)
def test_a_webmail_image_proxy_fetching_after_delivery_is_a_person_opening_the_message(user_agent, seconds):
    assert classify_open(user_agent, "66.249.84.1", seconds) == Verdict(False, "image_proxy")


def test_an_open_without_a_known_time_or_address_is_judged_by_its_user_agent_alone():
    assert classify_open(FIREFOX, "not an address", None) == Verdict(False, "human")
    assert classify_open(FIREFOX, None, float("nan")) == Verdict(False, "human")
    assert classify_open(FIREFOX, HOME_IPV6, A_MINUTE) == Verdict(False, "human")


@pytest.mark.parametrize(
    "user_agent",
    [CHROME, EDGE, SAFARI_IPHONE],
    ids=["chrome", "edge", "safari-iphone"],
)
def test_a_browser_click_from_a_normal_address_a_minute_after_sending_is_a_human_click(user_agent):
    assert classify_click(user_agent, HOME_IP, A_MINUTE, [], 4) == Verdict(False, "human")


def test_a_safari_click_through_apples_private_relay_is_a_human_click():
    assert classify_click(SAFARI_IPHONE, APPLE_IP, A_MINUTE, [], 4) == Verdict(False, "human")


@pytest.mark.parametrize(
    ("user_agent", "ip", "seconds", "reason"),
    [
        ("Mozilla/5.0 (compatible; Proofpoint URL Defense)", HOME_IP, A_MINUTE, "scanner_user_agent"),
        ("Mozilla/5.0 (compatible; Mimecast URL Protect)", HOME_IP, A_MINUTE, "scanner_user_agent"),
        ("Barracuda Sentinel (EE)", HOME_IP, A_MINUTE, "scanner_user_agent"),
        (OUTLOOK, HOME_IP, A_MINUTE, "scanner_user_agent"),
        ("curl/8.5.0", HOME_IP, A_MINUTE, "scanner_user_agent"),
        (CHROME, MIMECAST_IP, A_MINUTE, "scanner_network"),
        (CHROME, EXCHANGE_ONLINE_IP, 2.0, "scanner_network"),
        (GMAIL_PROXY, HOME_IP, A_MINUTE, "proxy_prefetch"),
        (None, HOME_IP, A_MINUTE, "no_user_agent"),
        ("Mozilla/5.0", APPLE_IP, A_MINUTE, "implausible_user_agent"),
        (CHROME, HOME_IP, 9.9, "too_fast"),
    ],
    ids=[
        "proofpoint",
        "mimecast",
        "barracuda",
        "outlook-link-preview",
        "curl",
        "mimecast-network",
        "safe-links-network",
        "image-proxy-on-a-link",
        "no-user-agent",
        "bare-mozilla",
        "under-ten-seconds",
    ],
)
def test_machine_clicks_are_recognised_with_their_reason(user_agent, ip, seconds, reason):
    verdict = classify_click(user_agent, ip, seconds, [], 4)
    assert verdict == Verdict(True, reason)
    assert verdict.reason in REASONS


def test_a_click_exactly_ten_seconds_after_sending_is_no_longer_too_fast():
    assert classify_click(CHROME, HOME_IP, 10.0, [], 4) == Verdict(False, "human")


def test_a_burst_over_most_links_of_a_message_within_seconds_is_a_scanner_following_every_link():
    earlier = [(0, 60.0), (1, 60.4), (2, 61.1)]
    assert classify_click(CHROME, HOME_IP, 61.5, earlier, 5, link=3) == Verdict(True, "every_link")
    assert classify_click(CHROME, HOME_IP, 61.5, earlier[:2], 3, link=2) == Verdict(True, "every_link")


@pytest.mark.parametrize(
    ("earlier", "links_in_message", "link"),
    [
        ([(0, 60.0)], 5, 1),
        ([(2, 60.0), (2, 60.5), (2, 61.0)], 5, 2),
        ([(0, 60.0), (1, 120.0), (2, 180.0)], 4, 3),
        ([(0, 60.0)], 2, 1),
    ],
    ids=["two-of-five-links", "one-link-many-times", "all-links-over-minutes", "both-links-of-a-two-link-message"],
)
def test_a_person_clicking_a_few_links_or_one_link_again_is_not_a_burst(earlier, links_in_message, link):
    assert classify_click(FIREFOX, HOME_IP, 61.5, earlier, links_in_message, link=link) == Verdict(False, "human")


def test_a_click_without_a_known_send_time_skips_the_timing_rules():
    assert classify_click(FIREFOX, HOME_IP, None, [(0, 1.0), (1, 1.0), (2, 1.0)], 3) == Verdict(False, "human")


# --- Tokens of a sent message: send time, link count, the URL bound to its link ---------------

SENT_AT = 1_780_000_000


def test_a_sent_link_token_carries_the_send_time_and_link_count_and_binds_its_exact_url():
    url = "https://shop.example/a?x=1&y=2"
    text = tracking.sign_sent(NEW_KEY, TOKEN, sent_at=SENT_AT, links=5, url=url)
    sent = tracking.verify_sent([OLD_KEY, NEW_KEY], text)
    assert (sent.token, sent.sent_at, sent.links) == (TOKEN, SENT_AT, 5)
    assert sent.has_link() and sent.signed_for(url)
    assert sent.seconds_since_sent(SENT_AT + 61.5) == 61.5
    for other in ("https://shop.example/a?x=1&y=3", url + "#", url.upper(), "https://evil.example/", "", None):
        assert not sent.signed_for(other)


def test_a_link_index_beyond_the_messages_links_is_not_one_of_its_links():
    sent = tracking.verify_sent(
        [NEW_KEY], tracking.sign_sent(NEW_KEY, TOKEN, sent_at=SENT_AT, links=3, url="https://x.example/")
    )
    assert not sent.has_link()  # TOKEN's link is 3: indexes 0-2 exist


def test_sent_and_bare_tokens_never_verify_as_each_other():
    with pytest.raises(BadToken):
        tracking.verify_sent([NEW_KEY], sign_token(NEW_KEY, TOKEN))
    with pytest.raises(BadToken):
        verify_token([NEW_KEY], tracking.sign_sent(NEW_KEY, TOKEN, sent_at=SENT_AT, links=5, url="https://x.example/"))


def test_every_single_character_change_of_a_sent_token_is_rejected():
    text = tracking.sign_sent(NEW_KEY, TrackingToken("acme-42", JOB), sent_at=SENT_AT, links=2)
    for i, original in enumerate(text):
        for replacement in "AZaz09-_.":
            if replacement != original:
                with pytest.raises(BadToken):
                    tracking.verify_sent([NEW_KEY], text[:i] + replacement + text[i + 1 :])


def test_a_pixel_token_names_no_url_and_a_link_token_must():
    with pytest.raises(ValueError):
        tracking.sign_sent(NEW_KEY, TrackingToken("acme-42", JOB), sent_at=SENT_AT, links=1, url="https://x.example/")
    with pytest.raises(ValueError):
        tracking.sign_sent(NEW_KEY, TOKEN, sent_at=SENT_AT, links=5)


def test_a_rewritten_message_gives_each_link_the_total_link_count_and_one_index_per_url_across_parts():
    html = '<p><a href="https://a.example/">a</a> <a href="https://b.example/">b</a> <a href="https://u.example/x">u</a></p>'
    text = "a https://a.example/ c https://c.example/ u https://u.example/x"
    made = []

    def click(index, url, links):
        made.append((index, url, links))
        return f"https://t.example/c/{index}"

    out = tracking.rewrite_message(html, text, click, "https://t.example/o/p", keep=["https://u.example/"])
    assert out.links == ["https://a.example/", "https://b.example/", "https://c.example/"]
    assert set(made) == {(0, "https://a.example/", 3), (1, "https://b.example/", 3), (2, "https://c.example/", 3)}
    assert out.html.count("https://t.example/c/") == 2 and 'href="https://u.example/x"' in out.html
    assert out.html.endswith(tracking.pixel_tag("https://t.example/o/p"))
    assert out.text == "a https://t.example/c/0 c https://t.example/c/2 u https://u.example/x"


def test_a_click_url_carries_the_original_url_percent_encoded_and_verifies_against_it():
    from urllib.parse import parse_qs, urlsplit

    url = "https://shop.example/p?q=a b&r=1+2#frag"
    made = tracking.click_url("https://m.example/", NEW_KEY, "acme-42", JOB, sent_at=SENT_AT, links=4, link=2, url=url)
    parts = urlsplit(made)
    assert made.startswith("https://m.example/t/c/") and " " not in made
    [back] = parse_qs(parts.query)["u"]
    assert back == url
    assert tracking.verify_sent([NEW_KEY], parts.path.rsplit("/", 1)[1]).signed_for(back)
