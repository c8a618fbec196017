"""Inbound spam check against real scorers: SpamAssassin's spamd and rspamd (tests/spamd.py
starts each on a loopback port of its own), and servers that fail the ways scorers fail:
stopped, silent, or answering garbage. In every failure the message is still accepted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from email import policy
from email.message import EmailMessage

import pytest
from structlog.testing import capture_logs

from mailflow.inbound.spam import Checker, Rspamd, Score, Scorer, Spamd, Thresholds, action

from .servers import free_port
from .spamd import RealRspamd, RealSpamd
from .test_inbound_spam_rules import PASS, Auth

pytestmark = pytest.mark.integration

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


DMARC_REJECT = Auth(dmarc="fail", dmarc_policy="reject")


def message(body: str = "Shall we meet at noon on Friday? The usual place.\n", subject: str = "Lunch") -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "Ann Example <ann@sender.example>"
    msg["To"] = "Help Desk <help@acme.example>"
    msg["Subject"] = subject
    msg["Date"] = "Tue, 01 Dec 2026 10:00:00 +0000"
    msg["Message-ID"] = "<lunch-20261201-1000@sender.example>"
    msg.set_content(body)
    return msg.as_bytes()


SPAM = message(f"Buy now.\n{GTUBE}\n", subject="You have won")
HAM = message()


@pytest.fixture(scope="module")
def spamd() -> Iterator[RealSpamd]:
    with RealSpamd() as server:
        yield server


@pytest.fixture(scope="module")
def rspamd() -> Iterator[RealRspamd]:
    with RealRspamd() as server:
        yield server


def run_check(scorer: Scorer | None, data: bytes, auth: Auth = PASS, timeout_s: float = 10.0, **kwargs) -> Score:
    return asyncio.run(Checker(scorer, timeout_s=timeout_s).check(data, auth, **kwargs))


@asynccontextmanager
async def tcp_server(reply: bytes | None) -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP server on loopback that reads the request, then answers `reply` and closes, or
    (None) never answers. Yields its port and a list that counts the connections."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await reader.read(65536)
            if reply is None:
                await asyncio.sleep(3600)
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connections
    finally:
        server.close()


# -- SpamAssassin's spamd --------------------------------------------------------------------


def test_gtube_is_scored_far_over_the_reject_threshold_by_a_real_spamd_and_rejected(spamd):
    score = run_check(Spamd("127.0.0.1", spamd.port), SPAM)
    assert (score.scorer, score.unscored, score.error) == ("spamd", False, None)
    assert "SPAMD:GTUBE" in score.rules
    assert score.score >= 1000  # GTUBE alone is worth 1000 points
    assert action(score, Thresholds()) == "reject"


def test_an_ordinary_message_is_accepted_by_a_real_spamd(spamd):
    score = run_check(Spamd("127.0.0.1", spamd.port), HAM)
    assert (score.scorer, score.unscored) == ("spamd", False)
    assert score.score < 5.0 and "SPAMD:GTUBE" not in score.rules
    assert action(score, Thresholds()) == "accept"


def test_spamd_points_add_to_the_builtin_points(spamd):
    score = run_check(Spamd("127.0.0.1", spamd.port), SPAM, Auth(spf="fail"))
    assert score.builtin == 2.0 and score.rules[0] == "SPF_FAIL"
    alone = run_check(Spamd("127.0.0.1", spamd.port), SPAM)
    assert score.score == pytest.approx(alone.score + 2.0)


def test_concurrent_checks_against_one_spamd_are_all_scored(spamd):
    async def many() -> list[Score]:
        checker = Checker(Spamd("127.0.0.1", spamd.port))
        scores = await asyncio.gather(*[checker.check(SPAM if i % 2 else HAM, PASS) for i in range(10)])
        assert checker.counts.scored == 10 and checker.counts.checked == 10
        return scores

    scores = asyncio.run(many())
    assert [action(s, Thresholds()) for s in scores] == ["accept", "reject"] * 5


def test_a_stopped_spamd_leaves_mail_unscored_at_once_and_builtin_rules_still_decide():
    with RealSpamd() as server:
        scorer = Spamd("127.0.0.1", server.port)
        assert not run_check(scorer, HAM).unscored
    checker = Checker(scorer)  # the same address, now refused
    started = time.monotonic()
    with capture_logs() as logs:
        ham = asyncio.run(checker.check(HAM, PASS))
        spoofed = asyncio.run(checker.check(HAM, DMARC_REJECT))
    assert time.monotonic() - started < 2.0
    assert (ham.unscored, ham.scorer, action(ham, Thresholds())) == (True, "spamd", "accept")
    assert "refused" in (ham.error or "")
    assert action(spoofed, Thresholds()) == "reject"  # DMARC p=reject does not need spamd
    assert checker.counts.unscored == {"refused": 2}
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["inbound.spam_unscored"] * 2


def test_a_spamd_that_accepts_and_never_answers_is_given_up_within_its_timeout():
    async def scenario() -> tuple[Score, Score, float, float]:
        async with tcp_server(None) as (port, connections):
            started = time.monotonic()
            own = await Checker(Spamd("127.0.0.1", port, timeout_s=0.5)).check(HAM, PASS)
            middle = time.monotonic()
            checkers = await Checker(Spamd("127.0.0.1", port, timeout_s=60), timeout_s=0.5).check(HAM, PASS)
            assert len(connections) == 2
            return own, checkers, middle - started, time.monotonic() - middle

    own, checkers, own_s, checkers_s = asyncio.run(scenario())
    for score, elapsed in ((own, own_s), (checkers, checkers_s)):
        assert 0.4 <= elapsed < 2.0
        assert score.unscored and "timeout" in (score.error or "")
        assert action(score, Thresholds()) == "accept"


@pytest.mark.parametrize(
    "reply",
    [
        b"\x00\xff\x13garbage that is no protocol at all\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1005.2 / 5.0\r\n\r\n<html>oops</html>",
        b"",  # closed without a word
    ],
)
def test_a_server_that_answers_garbage_in_place_of_spamd_leaves_mail_unscored(reply):
    async def scenario() -> Score:
        async with tcp_server(reply) as (port, _):
            return await Checker(Spamd("127.0.0.1", port)).check(HAM, PASS)

    score = asyncio.run(scenario())
    assert score.unscored and "bad_reply" in (score.error or "")
    assert score.score == 0.0 and action(score, Thresholds()) == "accept"


def test_a_message_over_spamds_limit_is_not_sent_and_is_scored_by_builtin_rules(spamd):
    async def scenario() -> Score:
        async with tcp_server(None) as (port, connections):
            score = await Checker(Spamd("127.0.0.1", port, max_bytes=len(SPAM) - 1)).check(SPAM, DMARC_REJECT)
            assert connections == []
            return score

    score = asyncio.run(scenario())
    assert (score.too_large, score.unscored, score.scorer, score.rules) == (True, False, "builtin", ("DMARC_REJECT",))
    at_limit = run_check(Spamd("127.0.0.1", spamd.port, max_bytes=len(SPAM)), SPAM)
    assert not at_limit.too_large and "SPAMD:GTUBE" in at_limit.rules


def test_spamd_answers_ping(spamd):
    asyncio.run(Spamd("127.0.0.1", spamd.port).ping())


# -- rspamd ------------------------------------------------------------------------------------


def test_gtube_is_rejected_by_a_real_rspamd(rspamd):
    score = run_check(Rspamd(rspamd.url), SPAM)
    assert (score.scorer, score.unscored, score.error) == ("rspamd", False, None)
    assert "RSPAMD:GTUBE" in score.rules
    assert score.score >= 15.0  # rspamd gives GTUBE its reject score
    assert action(score, Thresholds()) == "reject"


def test_an_ordinary_message_is_accepted_by_a_real_rspamd(rspamd):
    score = run_check(Rspamd(rspamd.url), HAM, client_ip="127.0.0.1", helo="localhost")
    assert (score.scorer, score.unscored) == ("rspamd", False)
    assert score.score < 5.0 and "RSPAMD:GTUBE" not in score.rules
    assert action(score, Thresholds()) == "accept"


def test_rspamd_is_told_the_envelope_sender_and_recipients(rspamd):
    scorer = Rspamd(rspamd.url)
    same = run_check(scorer, HAM, mail_from="ann@sender.example", recipients=["help@acme.example"])
    other = run_check(scorer, HAM, mail_from="bounce@elsewhere.example", recipients=["someone@else.example"])
    assert {"RSPAMD:FROM_EQ_ENVFROM", "RSPAMD:TO_MATCH_ENVRCPT_ALL"} <= set(same.rules)
    assert not {"RSPAMD:FROM_EQ_ENVFROM", "RSPAMD:TO_MATCH_ENVRCPT_ALL"} & set(other.rules)


def test_rspamd_answers_ping(rspamd):
    asyncio.run(Rspamd(rspamd.url).ping())


def test_a_stopped_rspamd_leaves_mail_unscored_at_once():
    with RealRspamd() as server:
        scorer = Rspamd(server.url)
        assert not run_check(scorer, HAM).unscored
    started = time.monotonic()
    score = run_check(scorer, HAM, DMARC_REJECT)
    assert time.monotonic() - started < 2.0
    assert score.unscored and "refused" in (score.error or "")
    assert action(score, Thresholds()) == "reject"


def test_an_address_where_no_rspamd_ever_ran_is_refused_too():
    score = run_check(Rspamd(f"http://127.0.0.1:{free_port()}"), HAM)
    assert score.unscored and "refused" in (score.error or "")


def test_an_rspamd_that_accepts_and_never_answers_is_given_up_within_its_timeout():
    async def scenario() -> tuple[Score, float]:
        async with tcp_server(None) as (port, _):
            started = time.monotonic()
            score = await Checker(Rspamd(f"http://127.0.0.1:{port}", timeout_s=0.5)).check(HAM, PASS)
            return score, time.monotonic() - started

    score, elapsed = asyncio.run(scenario())
    assert 0.4 <= elapsed < 2.0
    assert score.unscored and "timeout" in (score.error or "")


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!",
        b'HTTP/1.1 500 Internal Server Error\r\nContent-Length: 17\r\n\r\n{"error": "oops"}',
        b"SPAMD/1.1 0 EX_OK\r\n\r\n",
        b"",
    ],
)
def test_a_server_that_answers_garbage_in_place_of_rspamd_leaves_mail_unscored(reply):
    async def scenario() -> Score:
        async with tcp_server(reply) as (port, _):
            return await Checker(Rspamd(f"http://127.0.0.1:{port}")).check(HAM, PASS)

    score = asyncio.run(scenario())
    assert score.unscored and "bad_reply" in (score.error or "")
