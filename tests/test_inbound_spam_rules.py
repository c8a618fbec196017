"""Inbound spam check without servers: the built-in rules on real message bytes, the
thresholds, the replies of spamd and rspamd as they come off the wire, and the checker's
promise never to lose mail when its scorer fails."""

from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage

import pytest
from structlog.testing import capture_logs

from mailflow.errors import UserError
from mailflow.inbound import spam
from mailflow.inbound.spam import Checker, Score, ScorerError, Thresholds, Transaction, action, builtin_rules

pytestmark = pytest.mark.pure


@dataclass(frozen=True)
class Auth:
    spf: str = "pass"
    dmarc: str = "pass"
    dmarc_policy: str | None = "reject"


PASS = Auth()

# A PE file's first bytes: "MZ", and at 0x3C the offset of the "PE\0\0" signature.
PE = b"MZ" + b"\0" * 58 + (0x40).to_bytes(4, "little") + b"PE\0\0" + b"\0" * 64


def message(**headers: str) -> EmailMessage:
    """A plain, well-formed message as a mail client writes it (CRLF line ends, as SMTP sends)."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "Ann <ann@sender.example>"
    msg["To"] = "help@acme.example"
    msg["Subject"] = "Lunch on Friday"
    msg["Date"] = "Tue, 01 Dec 2026 10:00:00 +0000"
    msg["Message-ID"] = "<lunch-1@sender.example>"
    for name, value in headers.items():
        del msg[name.replace("_", "-")]
        if value:
            msg[name.replace("_", "-")] = value
    msg.set_content("Shall we meet at noon?\n")
    return msg


def attach(data: bytes, filename: str, ctype: str = "application/octet-stream") -> bytes:
    msg = message()
    maintype, subtype = ctype.split("/")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def zipped(*names: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name in names:
            archive.writestr(name, b"content")
    return out.getvalue()


def names(data: bytes, auth: Auth = PASS, **kwargs) -> list[str]:
    return [name for name, _ in builtin_rules(data, auth, **kwargs)]


def score_of(data: bytes, auth: Auth = PASS) -> Score:
    hits = builtin_rules(data, auth)
    return Score(sum(p for _, p in hits), tuple(n for n, _ in hits), "builtin")


# -- a well-formed message from an authenticated sender ----------------------------------------


def test_a_well_formed_authenticated_message_hits_no_rule_and_is_accepted():
    data = message().as_bytes()
    assert builtin_rules(data, PASS) == []
    assert action(score_of(data), Thresholds()) == "accept"


# -- authentication: what the sender's domain asks for -----------------------------------------


def test_a_dmarc_failure_under_p_reject_is_rejected_by_the_default_thresholds():
    data = message().as_bytes()
    auth = Auth(dmarc="fail", dmarc_policy="reject")
    assert names(data, auth) == ["DMARC_REJECT"]
    assert action(score_of(data, auth), Thresholds()) == "reject"


def test_a_dmarc_failure_under_p_quarantine_is_held_by_the_default_thresholds():
    data = message().as_bytes()
    auth = Auth(dmarc="fail", dmarc_policy="quarantine")
    assert names(data, auth) == ["DMARC_QUARANTINE"]
    assert action(score_of(data, auth), Thresholds()) == "quarantine"


@pytest.mark.parametrize("policy", ["none", None])
def test_a_dmarc_failure_under_p_none_or_no_policy_is_only_a_hint(policy):
    data = message().as_bytes()
    auth = Auth(dmarc="fail", dmarc_policy=policy)
    assert names(data, auth) == ["DMARC_FAIL_NONE"]
    assert action(score_of(data, auth), Thresholds()) == "accept"


@pytest.mark.parametrize("result", ["pass", "none", "temperror", "permerror"])
def test_dmarc_results_other_than_fail_add_nothing_whatever_the_policy(result):
    assert names(message().as_bytes(), Auth(dmarc=result, dmarc_policy="reject")) == []


@pytest.mark.parametrize(("result", "rule"), [("fail", "SPF_FAIL"), ("softfail", "SPF_SOFTFAIL"), ("FAIL", "SPF_FAIL")])
def test_an_spf_failure_adds_points_but_alone_does_not_hold_the_message(result, rule):
    data = message().as_bytes()
    auth = Auth(spf=result)
    assert names(data, auth) == [rule]
    assert action(score_of(data, auth), Thresholds()) == "accept"


def test_spf_and_dmarc_failures_add_up():
    hits = dict(builtin_rules(message().as_bytes(), Auth(spf="fail", dmarc="fail", dmarc_policy="quarantine")))
    assert hits == {"DMARC_QUARANTINE": 5.0, "SPF_FAIL": 2.0}


# -- malformed headers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("missing", "rule"),
    [("From", "HDR_MISSING_FROM"), ("Date", "HDR_MISSING_DATE"), ("Message-ID", "HDR_MISSING_MESSAGE_ID")],
)
def test_a_missing_required_header_is_a_rule(missing, rule):
    assert names(message(**{missing.replace("-", "_"): ""}).as_bytes()) == [rule]


def test_two_from_headers_are_the_spoofing_rule_and_another_repeated_singleton_a_lesser_one():
    data = message().as_bytes()
    two_froms = data.replace(b"From: ", b"From: Mallory <boss@victim.example>\r\nFrom: ", 1)
    two_subjects = data.replace(b"Subject: ", b"Subject: Invoice\r\nSubject: ", 1)
    assert "HDR_DUPLICATE_FROM" in names(two_froms)
    assert names(two_subjects) == ["HDR_DUPLICATE"]
    received_twice = data.replace(b"From: ", b"Received: from a\r\nReceived: from b\r\nFrom: ", 1)
    assert names(received_twice) == []  # Received may repeat


def test_an_address_header_python_cannot_parse_cleanly_is_a_header_defect():
    data = message().as_bytes().replace(b"From: Ann <ann@sender.example>", b"From: Ann <<ann@@sender.example", 1)
    assert "HDR_DEFECT" in names(data)


def test_a_header_section_broken_by_a_line_without_a_colon_is_a_header_defect():
    data = message().as_bytes().replace(b"Subject: ", b"this line is not a header\r\nSubject: ", 1)
    assert "HDR_DEFECT" in names(data)


def test_a_multipart_message_without_its_boundary_is_a_mime_defect():
    data = (
        b"From: ann@sender.example\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <m@sender.example>\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"no boundary line ever comes\r\n"
    )
    assert names(data) == ["MIME_DEFECT"]


def test_defects_the_caller_already_found_are_used_as_given():
    data = message().as_bytes()
    assert names(data, defect_names=["StartBoundaryNotFoundDefect"]) == ["MIME_DEFECT"]
    assert names(data, defect_names=["MalformedHeaderDefect"]) == ["HDR_DEFECT"]
    assert names(data, defect_names=[]) == []


def test_raw_non_ascii_in_headers_is_a_rule_unless_encoded_or_sent_as_smtputf8():
    raw = message().as_bytes().replace(b"Subject: Lunch on Friday", "Subject: Grüße".encode(), 1)
    encoded = message(Subject="Grüße").as_bytes()  # the library writes RFC 2047
    assert b"=?utf-8?" in encoded
    latin1 = message().as_bytes().replace(b"Subject: Lunch on Friday", "Subject: Grüße".encode("latin-1"), 1)
    assert names(raw) == ["HDR_8BIT"]
    assert names(encoded) == []
    assert names(raw, smtputf8=True) == []  # RFC 6532: UTF-8 headers are legal with SMTPUTF8
    assert names(latin1, smtputf8=True) == ["HDR_8BIT"]  # but not bytes that are not UTF-8


# -- executable attachments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename", ["invoice.exe", "INVOICE.PDF.EXE", "setup.msi", "run.js", "a.vbs", "x.bat", "p.ps1", "app.jar", "s.scr"]
)
def test_an_attachment_named_as_an_executable_is_held(filename):
    data = attach(b"harmless bytes", filename)
    assert names(data) == ["EXEC_ATTACHMENT"]
    assert action(score_of(data), Thresholds()) == "quarantine"


def test_an_attachment_typed_as_an_executable_is_an_executable_whatever_its_name():
    assert names(attach(b"bytes", "invoice", "application/x-msdownload")) == ["EXEC_ATTACHMENT"]


def test_a_windows_executable_renamed_to_pdf_is_still_an_executable():
    assert names(attach(PE, "invoice.pdf", "application/pdf")) == ["EXEC_ATTACHMENT"]


def test_an_executable_inside_an_attached_zip_is_a_rule_and_a_zip_of_documents_is_not():
    assert names(attach(zipped("report.pdf", "payload/run.exe"), "docs.zip", "application/zip")) == ["EXEC_IN_ZIP"]
    assert names(attach(zipped("report.pdf", "notes.txt"), "docs.zip", "application/zip")) == []
    # named otherwise, a zip is still opened (it starts with PK\3\4)
    assert names(attach(zipped("run.scr"), "photo.dat")) == ["EXEC_IN_ZIP"]


def test_ordinary_attachments_hit_no_rule():
    assert names(attach(b"%PDF-1.7 ...", "report.pdf", "application/pdf")) == []
    assert names(attach(b"\x89PNG\r\n\x1a\n....", "photo.png", "image/png")) == []
    assert names(attach(b"not a zip at all", "broken.zip", "application/zip")) == []


def test_a_message_the_parser_gives_up_on_is_a_header_defect(monkeypatch):
    def gives_up(self, data):
        raise IndexError("a parser bug")

    monkeypatch.setattr(spam.BytesParser, "parsebytes", gives_up)
    assert names(message().as_bytes(), Auth(spf="fail")) == ["SPF_FAIL", "HDR_DEFECT"]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\xff" * 500,
        b"From: a\r\n",
        b"\r\n\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x--",
        b"From: " + b"<" * 5000 + b"\r\n\r\nbody",
        b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename*=utf-8''%ff%fe.exe\r\n\r\n!!!!",
    ],
)
def test_any_bytes_get_an_answer(data):
    result = builtin_rules(data, PASS)
    assert all(name in spam.POINTS for name, _ in result)


# -- thresholds and the decision ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "expected"),
    [(4.99, "accept"), (5.0, "quarantine"), (14.99, "quarantine"), (15.0, "reject"), (1005.2, "reject")],
)
def test_a_threshold_is_reached_at_its_value(points, expected):
    assert action(Score(points, (), "spamd"), Thresholds()) == expected


def test_each_tenant_has_thresholds_of_its_own():
    strict, lenient = Thresholds(quarantine=2.0, reject=6.0), Thresholds(quarantine=10.0, reject=30.0)
    score = Score(7.0, ("SPAMD:X",), "spamd")
    assert (action(score, strict), action(score, Thresholds()), action(score, lenient)) == (
        "reject",
        "quarantine",
        "accept",
    )


def test_a_reject_threshold_below_the_quarantine_one_is_refused_with_a_message_that_says_so():
    with pytest.raises(UserError, match="below the quarantine threshold"):
        Thresholds(quarantine=10.0, reject=5.0)


def test_a_score_becomes_an_event_payload_that_survives_json():
    score = Score(1007.2, ("SPF_FAIL", "SPAMD:GTUBE"), "spamd", builtin=2.0)
    event = json.loads(json.dumps(score.to_event()))
    assert event == {
        "score": 1007.2,
        "rules": ["SPF_FAIL", "SPAMD:GTUBE"],
        "scorer": "spamd",
        "unscored": False,
        "error": None,
        "too_large": False,
        "builtin": 2.0,
    }


# -- the scorers' replies, as they come off the wire ---------------------------------------------

SPAMD_GTUBE = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 46\r\nSpam: True ; 1005.2 / 5.0\r\n\r\n"
    b"GTUBE,MISSING_DATE,MISSING_FROM,NO_RELAYS,XX_1"
)


def test_spamd_symbols_reply_gives_the_score_and_the_rule_names():
    assert spam.parse_spamd_reply(SPAMD_GTUBE) == (
        1005.2,
        ("GTUBE", "MISSING_DATE", "MISSING_FROM", "NO_RELAYS", "XX_1"),
    )
    ham = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: False ; -0.1 / 5.0\r\n\r\n"
    assert spam.parse_spamd_reply(ham) == (-0.1, ())


@pytest.mark.parametrize(
    "reply",
    [
        b"",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"SPAMD/1.0 76 Bad header line: (EOF)\r\n\r\n",  # spamd's own error
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n",  # no Spam header
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; lots / 5.0\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 500\r\nSpam: True ; 9.0 / 5.0\r\n\r\nGTUBE",  # cut short
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 9.0 / 5.0\r\n\r\n<html>not rules</html>",
    ],
)
def test_anything_else_from_spamd_is_an_error_not_a_score(reply):
    with pytest.raises(ScorerError):
        spam.parse_spamd_reply(reply)


def test_rspamd_checkv2_reply_gives_the_score_and_the_symbol_names():
    body = json.dumps(
        {"score": 15.0, "action": "reject", "symbols": {"GTUBE": {"score": 0.0}, "ARC_NA": {"score": 0.0}}}
    ).encode()
    assert spam.parse_rspamd_reply(body) == (15.0, ("ARC_NA", "GTUBE"))


@pytest.mark.parametrize(
    "body",
    [b"", b"pong", b"[1, 2]", b'{"error": "bad request"}', b'{"score": "high", "symbols": {}}', b'{"score": true}'],
)
def test_anything_else_from_rspamd_is_an_error_not_a_score(body):
    with pytest.raises(ScorerError):
        spam.parse_rspamd_reply(body)


def test_http_replies_are_read_with_a_length_chunked_or_to_the_close():
    assert spam.parse_http_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npongEXTRA") == (200, b"pong")
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n5\r\n": 1}\r\n0\r\n\r\n'
    assert spam.parse_http_reply(chunked) == (200, b'{"a": 1}')
    assert spam.parse_http_reply(b"HTTP/1.0 500 Oops\r\n\r\nbroken") == (500, b"broken")
    with pytest.raises(ScorerError):
        spam.parse_http_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nshort")
    with pytest.raises(ScorerError):
        spam.parse_http_reply(b"SPAMD/1.1 0 EX_OK\r\n\r\n")


# -- the checker never loses mail ---------------------------------------------------------------


class Answers:
    """A scorer in this process that answers, fails or hangs as told (the real ones are in
    test_inbound_spam.py)."""

    name = "fake"
    timeout_s = 30.0

    def __init__(self, result: tuple[float, tuple[str, ...]] | BaseException | None, max_bytes: int = 1 << 20) -> None:
        self.result = result
        self.max_bytes = max_bytes
        self.calls: list[Transaction] = []

    async def score(self, data: bytes, transaction: Transaction = spam.NO_TRANSACTION) -> tuple[float, tuple[str, ...]]:
        self.calls.append(transaction)
        if self.result is None:
            await asyncio.sleep(3600)
        if isinstance(self.result, BaseException):
            raise self.result
        assert self.result is not None
        return self.result


def check(checker: Checker, data: bytes, auth: Auth = PASS, **kwargs) -> Score:
    return asyncio.run(checker.check(data, auth, **kwargs))


def test_external_points_add_to_the_builtin_ones_and_its_rules_are_prefixed():
    checker = Checker(Answers((3.5, ("BAYES_99", "URIBL_X"))))
    score = check(checker, message().as_bytes(), Auth(spf="fail"))
    assert (score.score, score.builtin, score.scorer, score.unscored) == (5.5, 2.0, "fake", False)
    assert score.rules == ("SPF_FAIL", "FAKE:BAYES_99", "FAKE:URIBL_X")
    assert checker.counts.as_dict()["checked"] == 1 and checker.counts.scored == 1


def test_the_transaction_reaches_the_scorer():
    scorer = Answers((0.0, ()))
    check(
        Checker(scorer),
        message().as_bytes(),
        client_ip="192.0.2.1",
        helo="mx.sender.example",
        mail_from="ann@sender.example",
        recipients=["help@acme.example"],
    )
    assert scorer.calls == [Transaction("192.0.2.1", "mx.sender.example", "ann@sender.example", ("help@acme.example",))]


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "refused"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection"),
        (ScorerError("not a spamd reply: b'garbage'"), "bad_reply"),
        (TimeoutError(), "timeout"),
        (RuntimeError("a bug in the client"), "error"),
    ],
)
def test_a_scorer_failure_leaves_the_message_unscored_on_builtin_points_logged_and_counted(failure, reason):
    checker = Checker(Answers(failure))
    with capture_logs() as logs:
        score = check(checker, message().as_bytes(), Auth(dmarc="fail", dmarc_policy="reject"))
    assert score.unscored and score.scorer == "fake" and reason in (score.error or "")
    assert (score.score, score.rules) == (15.0, ("DMARC_REJECT",))
    assert action(score, Thresholds()) == "reject"  # built-in rules still decide
    assert checker.counts.unscored == {reason: 1}
    assert [(e["event"], e["reason"]) for e in logs if e["log_level"] == "warning"] == [
        ("inbound.spam_unscored", reason)
    ]


def test_a_scorer_that_never_answers_is_given_up_after_the_checkers_timeout():
    checker = Checker(Answers(None), timeout_s=0.2)
    started = time.monotonic()
    score = check(checker, message().as_bytes())
    assert time.monotonic() - started < 1.5
    assert score.unscored and "timeout" in (score.error or "") and action(score, Thresholds()) == "accept"


def test_a_message_over_the_scorers_limit_is_scored_by_builtin_rules_without_asking_it():
    scorer = Answers((1000.0, ("GTUBE",)), max_bytes=100)
    checker = Checker(scorer)
    score = check(checker, message().as_bytes())
    assert scorer.calls == []
    assert (score.too_large, score.unscored, score.scorer, score.score) == (True, False, "builtin", 0.0)
    assert checker.counts.too_large == 1 and not checker.counts.unscored


def test_without_an_external_scorer_the_builtin_rules_are_the_score():
    score = check(Checker(), attach(PE, "x.exe"))
    assert (score.scorer, score.rules, score.score, score.unscored) == ("builtin", ("EXEC_ATTACHMENT",), 10.0, False)


def test_a_bug_in_the_builtin_rules_does_not_cost_the_message(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a rule's bug")

    monkeypatch.setattr(spam, "builtin_rules", broken)
    with capture_logs() as logs:
        score = check(Checker(Answers((1.0, ("X",)))), message().as_bytes(), Auth(dmarc="fail"))
    assert (score.score, score.rules, score.unscored) == (16.0, ("DMARC_REJECT", "FAKE:X"), False)
    assert [e["event"] for e in logs] == ["inbound.spam_builtin_failed"]  # and DMARC still counts
