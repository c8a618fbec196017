"""The classifier's dispatcher and its kinds other than bounces (inbound/classify/): complaints,
auto-replies, unsubscribes, replies and their new text, other; how the job is found; bad
input; and `mailflow inbound classify`. Real mail from the shared corpus where there is some."""

from __future__ import annotations

import json
from email.message import EmailMessage
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailflow.inbound.classify import Context, Kind, classify
from mailflow.inbound.classify.reply import html_to_text, new_text

pytestmark = pytest.mark.pure

CORPUS = Path(__file__).resolve().parent / "fixtures" / "corpus"  # a copy of ../shared/corpus (its LICENSEs)
SISIMAI = CORPUS / "bounces-sisimai"
REPLIES = CORPUS / "replies-email-reply-parser"
EXPECTED = json.loads((SISIMAI / "expected.json").read_text())

# Feedback types of the reports sisimai's table has no row for, read from the reports.
FEEDBACK_BY_HAND = {
    "arf-11": "abuse",
    "arf-12": "opt-out",
    "arf-18": "auth-failure",
    "arf-20": "auth-failure",
    "arf-22": "abuse",  # Hotmail's JMRP "complaint about message from": no ARF part at all
    "arf-23": "abuse",
    "arf-24": "abuse",
}
ARF = sorted(p.stem for p in SISIMAI.glob("arf-*.eml"))
RFC3834 = sorted(p.stem for p in SISIMAI.glob("rfc3834-*.eml"))


def message(
    body: str = "Hello",
    *,
    subject: str = "Hello",
    sender: str = "Ann Example <ann@example.net>",
    to: str = "news@example.org",
    html: str | None = None,
    **headers: str,
) -> bytes:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = "<answer-1@example.net>"
    for name, value in headers.items():
        m[name.replace("_", "-")] = value
    if html is not None and not body:
        m.set_content(html, subtype="html")
    else:
        m.set_content(body)
        if html is not None:
            m.add_alternative(html, subtype="html")
    return m.as_bytes()


def test_the_corpus_has_the_17_feedback_reports_and_6_auto_replies():
    assert len(ARF) == 17 and len(RFC3834) == 6


@pytest.mark.parametrize("name", ARF)
def test_every_feedback_report_is_a_complaint_with_its_feedback_type(name):
    c = classify((SISIMAI / f"{name}.eml").read_bytes())
    rows = EXPECTED.get(name)
    expected_type = rows[0]["extra"] if rows else FEEDBACK_BY_HAND[name]
    assert c.kind is Kind.COMPLAINT
    assert c.feedback_type == expected_type
    if rows:
        assert len(c.recipients) == len(rows)  # sisimai's one row per recipient complained about
    assert c.recipients and all(r.reason == "feedback" and r.hard is False for r in c.recipients)


def test_a_complaint_names_each_original_recipient_and_the_original_message():
    c = classify((SISIMAI / "arf-16.eml").read_bytes())
    assert [r.address for r in c.recipients][:3] == [
        "kijitora@example.com",
        "sironeko@example.com",
        "mikeneko@example.com",
    ]
    assert c.original.message_id.startswith("<") and c.original.message_id.endswith("@example.jp>")


def test_a_complaint_without_original_rcpt_to_names_the_enclosed_messages_recipient():
    assert [r.address for r in classify((SISIMAI / "arf-21.eml").read_bytes()).recipients] == ["kijitora@example.org"]
    # Hotmail keeps the recipient in the enclosed copy's own header
    assert [r.address for r in classify((SISIMAI / "arf-22.eml").read_bytes()).recipients] == ["kijitora@example.com"]


def test_apple_mails_unsubscribe_button_is_an_opt_out_complaint_from_the_subscriber():
    c = classify((SISIMAI / "arf-26.eml").read_bytes())
    assert (c.kind, c.feedback_type, [r.address for r in c.recipients]) == (
        Kind.COMPLAINT,
        "opt-out",
        ["example@icloud.com"],
    )


def test_a_feedback_report_inside_a_multipart_mixed_is_a_complaint_too():
    m = EmailMessage()
    m["From"] = "fbl@isp.example"
    m["To"] = "abuse@example.org"
    m["Subject"] = "Spam report"
    m.set_content("A user said this is spam.")
    report = EmailMessage()
    report["Feedback-Type"] = "fraud"
    report["Original-Rcpt-To"] = "Someone@Example.COM"
    m.add_attachment(report, subtype="feedback-report")
    c = classify(m.as_bytes())
    assert (c.kind, c.feedback_type, [r.address for r in c.recipients]) == (
        Kind.COMPLAINT,
        "fraud",
        ["someone@example.com"],
    )


@pytest.mark.parametrize("name", RFC3834)
def test_every_rfc3834_answer_is_an_auto_reply_from_the_answering_address(name):
    raw = (SISIMAI / f"{name}.eml").read_bytes()
    c = classify(raw)
    assert c.kind is Kind.AUTO_REPLY
    assert [(r.address, r.reason, r.hard) for r in c.recipients] == [(c.sender, "vacation", False)]
    assert c.sender and c.auto_submitted


def test_an_auto_reply_says_which_header_made_it_one_and_carries_its_text():
    c = classify((SISIMAI / "rfc3834-01.eml").read_bytes())
    assert c.auto_submitted == "Auto-Submitted: auto-replied"
    assert c.reply_text.startswith("I am currently away returning to the office on May 5th.")


@pytest.mark.parametrize(
    "subject",
    [
        "Out of Office: Your order",
        "Automatic reply: Your order",
        "Abwesenheitsnotiz: Ihre Bestellung",
        "Automatische Antwort: Ihre Bestellung",
        "Réponse automatique : Votre commande",
        "Absent du bureau",
        "Respuesta automática: Su pedido",
        "Fuera de la oficina",
        "Risposta automatica: Il suo ordine",
        "Fuori ufficio fino al 3 giugno",
        "Resposta automática: Seu pedido",
        "Automatisch antwoord: Uw bestelling",
        "Afwezig: Uw bestelling",
        "自動返信: ご注文について",
        "=?utf-8?b?6Ieq5YuV6L+U5L+hOiDjgZTms6jmlofjgavjgaTjgYTjgaY=?=",  # the same, as mail clients encode it
        "Автоматический ответ: Ваш заказ",
    ],
)
def test_out_of_office_subjects_in_many_languages_are_auto_replies(subject):
    raw = message("I am away until Monday.", subject="placeholder", In_Reply_To="<job-1@example.org>")
    c = classify(raw.replace(b"Subject: placeholder", b"Subject: " + subject.encode(), 1))
    assert c.kind is Kind.AUTO_REPLY, subject
    assert c.auto_submitted.startswith("subject: ")


@pytest.mark.parametrize(
    "headers",
    [
        {"X_Autoreply": "yes"},
        {"X_Autorespond": "vacation"},
        {"Precedence": "auto_reply"},
        {"X_Auto_Response_Suppress": "All"},
        {"X_Mailer": "Vacation 1.2"},
        {"Auto_Submitted": "auto-generated"},
    ],
)
def test_the_de_facto_autoresponder_headers_make_an_auto_reply(headers):
    c = classify(message("Thanks for your mail.", subject="Re: Your order", In_Reply_To="<j@x.example>", **headers))
    assert c.kind is Kind.AUTO_REPLY


def test_auto_submitted_no_is_a_person():
    c = classify(message("Yes, please.", subject="Re: Your order", Auto_Submitted="no", In_Reply_To="<j@x.example>"))
    assert c.kind is Kind.REPLY


def test_precedence_bulk_is_an_autoresponder_only_on_an_answer_that_comes_from_no_list():
    answer = message("Got it, thanks", subject="Re: Order", Precedence="bulk", In_Reply_To="<j@x.example>")
    newsletter = message("Our news", subject="Weekly news", Precedence="bulk", List_Id="<news.example.net>")
    assert classify(answer).kind is Kind.AUTO_REPLY
    assert classify(newsletter).kind is Kind.OTHER


def test_a_person_writing_about_the_office_is_not_an_auto_reply():
    c = classify(message("See you there", subject="Re: Moving to the new office", In_Reply_To="<j@x.example>"))
    assert c.kind is Kind.REPLY


DSN = b"""From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: bounces+tok@example.org
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
Message-ID: <dsn-1@mx.example.net>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; gone@example.net
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <gone@example.net>: Recipient address rejected: User unknown

--b
Content-Type: text/rfc822-headers

From: news@example.org
To: gone@example.net
Subject: Our news
Message-ID: <job-42@example.org>

--b--
"""


def test_a_dsn_with_auto_submitted_is_a_bounce_not_an_auto_reply():
    c = classify(DSN)
    assert c.kind is Kind.BOUNCE
    assert c.auto_submitted == ""
    assert [r.address for r in c.recipients] == ["gone@example.net"]


def test_a_delivery_failure_no_parser_can_read_is_neither_an_auto_reply_nor_a_reply():
    raw = message(
        "something went wrong",
        sender="MAILER-DAEMON@mx.example.net",
        subject="Re: Mail delivery failed: returning message to sender",
        Auto_Submitted="auto-replied",
        In_Reply_To="<job-1@example.org>",
    )
    assert classify(raw).kind not in (Kind.AUTO_REPLY, Kind.REPLY)


def test_no_bounce_in_the_corpus_is_taken_for_a_complaint_an_auto_reply_or_a_reply():
    wrong = {}
    for path in sorted(SISIMAI.glob("*.eml")):
        if not path.stem.startswith(("arf-", "rfc3834-")):
            kind = classify(path.read_bytes()).kind
            if kind in (Kind.COMPLAINT, Kind.AUTO_REPLY, Kind.REPLY):
                wrong[path.stem] = str(kind)
    assert wrong == {}


def test_the_job_of_a_bounce_is_found_by_its_verp_envelope_recipient():
    ctx = Context(
        envelope_recipients=("bounces+tok@example.org",),
        job_for_address=lambda a: "job-7" if a == "bounces+tok@example.org" else None,
    )
    c = classify(DSN, ctx)
    assert (c.kind, c.job_id, c.found_by) == (Kind.BOUNCE, "job-7", "verp")


def test_the_job_of_a_report_is_found_by_the_original_message_id_inside_it():
    ctx = Context(job_for_message_id=lambda m: "job-42" if m == "<job-42@example.org>" else None)
    c = classify(DSN, ctx)
    assert (c.job_id, c.found_by, c.original.message_id) == ("job-42", "original", "<job-42@example.org>")


def test_the_job_of_a_complaint_is_found_by_the_enclosed_return_path():
    raw = (SISIMAI / "arf-02.eml").read_bytes()
    original = classify(raw).original
    assert original.return_path
    c = classify(raw, Context(job_for_address=lambda a: "job-9" if a == original.return_path else None))
    assert (c.job_id, c.found_by) == ("job-9", "original")


REPLY_BODY = """Yes, Tuesday works for me.

Ann

On Mon, Jun 3, 2024 at 10:12 AM News <news@example.org> wrote:
> Would Tuesday suit you?
>
> --
> The news team
"""


def test_a_reply_found_by_in_reply_to_has_its_job_and_only_its_new_text():
    ctx = Context(job_for_message_id=lambda m: {"<job-1@example.org>": "job-1"}.get(m))
    raw = message(REPLY_BODY, subject="Re: Tuesday?", In_Reply_To="<job-1@example.org>")
    c = classify(raw, ctx)
    assert (c.kind, c.job_id, c.found_by) == (Kind.REPLY, "job-1", "in_reply_to")
    assert c.reply_text == "Yes, Tuesday works for me.\n\nAnn"
    assert (c.message_id, c.in_reply_to, c.subject, c.sender) == (
        "<answer-1@example.net>",
        "<job-1@example.org>",
        "Re: Tuesday?",
        "ann@example.net",
    )


def test_references_are_looked_up_newest_first():
    ours = {"<job-1@example.org>": "job-1", "<job-2@example.org>": "job-2"}
    ctx = Context(job_for_message_id=ours.get)
    raw = message(
        "Thanks",
        subject="Tuesday",
        References="<job-1@example.org> <other@example.net> <job-2@example.org> <unknown@example.net>",
    )
    c = classify(raw, ctx)
    assert (c.kind, c.job_id, c.found_by) == (Kind.REPLY, "job-2", "references")
    assert c.references == (
        "<job-1@example.org>",
        "<other@example.net>",
        "<job-2@example.org>",
        "<unknown@example.net>",
    )


def test_mail_to_a_senders_reply_address_is_a_reply_even_without_re_or_references():
    ctx = Context(envelope_recipients=("news@example.org",), reply_address=lambda a: a == "news@example.org")
    c = classify(message("A question about your product", subject="Question"), ctx)
    assert (c.kind, c.job_id) == (Kind.REPLY, None)
    assert classify(message("A question about your product", subject="Question")).kind is Kind.OTHER


def test_a_signed_reply_address_names_the_job():
    ctx = Context(
        envelope_recipients=("reply+sig@example.org",),
        job_for_address=lambda a: "job-5" if a == "reply+sig@example.org" else None,
    )
    c = classify(message("Sure", subject="Offer", to="reply+sig@example.org"), ctx)
    assert (c.kind, c.job_id, c.found_by) == (Kind.REPLY, "job-5", "reply_address")


def test_a_re_subject_in_another_language_is_an_answer():
    for subject in ("AW: Angebot", "SV: Tilbud", "RE: Offer", "Antw: Aanbod", "回复\uff1a报价"):
        assert classify(message("Ok", subject=subject)).kind is Kind.REPLY, subject


def test_an_html_only_reply_gives_its_new_text_without_the_quoted_part():
    html = (
        '<div dir="ltr"><p>Thanks, that&#39;s <b>great</b>!</p><div>See you</div></div>'
        '<div class="gmail_quote"><div class="gmail_attr">On Mon, News wrote:</div>'
        "<blockquote>Would Tuesday suit you?</blockquote></div>"
    )
    c = classify(message("", subject="Re: Tuesday?", html=html, In_Reply_To="<job-1@example.org>"))
    assert c.kind is Kind.REPLY
    assert c.reply_text == "Thanks, that's great!\n\nSee you"


def test_outlooks_html_reply_ends_at_its_reply_header():
    html = '<p>Fine by me.</p><div id="divRplyFwdMsg"><b>From:</b> News<br>Sent: Monday</div><p>Would Tuesday suit you?</p>'
    assert html_to_text(html) == "Fine by me."


def test_mail_to_an_unsubscribe_address_is_an_unsubscribe_with_its_job_when_signed():
    address = "unsubscribe+tok@example.org"
    ctx = Context(
        envelope_recipients=(address,),
        unsubscribe_address=lambda a: a == address,
        job_for_address=lambda a: "job-3" if a == address else None,
    )
    c = classify(message("unsubscribe", subject="unsubscribe", to=address), ctx)
    assert (c.kind, c.job_id, c.found_by) == (Kind.UNSUBSCRIBE, "job-3", "unsubscribe_address")


def test_mail_that_answers_nothing_and_is_not_for_a_reply_address_is_other():
    c = classify(message("Hi, I would like to know more.", subject="Question about pricing"))
    assert (c.kind, c.job_id, c.recipients) == (Kind.OTHER, None, ())


def test_a_newsletter_to_a_reply_address_is_other():
    ctx = Context(envelope_recipients=("news@example.org",), reply_address=lambda a: True)
    raw = message("This week", subject="Re: This week's deals", List_Unsubscribe="<mailto:u@example.net>")
    assert classify(raw, ctx).kind is Kind.OTHER


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe garbage \x89PNG\r\n\x1a\n" * 50,
        b"Subject: =?utf-8?b?broken\r\nContent-Type: multipart/report; boundary=\r\n\r\n--\r\n",
        b"From: <<<@@@>>>\nReferences: <<<>>> <@> \nIn-Reply-To: \xff\xfe\nContent-Type: text/html; charset=nonsense\n\n<b>",
        b"Content-Type: multipart/mixed; boundary=x\n\n" + b"--x\nContent-Type: multipart/mixed; boundary=x\n\n" * 2000,
        b"Content-Type: message/rfc822\n\n" * 500,
        b"X: " + b"a" * 1_000_000 + b"\n\nbody",
    ],
    ids=["empty", "binary", "broken-mime", "broken-headers", "deep-multipart", "deep-rfc822", "long-header"],
)
def test_garbage_does_not_raise_and_is_other(raw):
    c = classify(raw)
    assert c.kind is Kind.OTHER


def test_a_lookup_that_fails_is_the_callers_error_not_a_verdict():
    def down(_mid: str) -> str | None:
        raise ConnectionError("database down")

    with pytest.raises(ConnectionError):
        classify(message("Ok", subject="Re: x", In_Reply_To="<job-1@example.org>"), Context(job_for_message_id=down))


# The new text of each body of github/email_reply_parser's test emails: phrases it must keep
# and phrases (quoted history, signatures) it must not.
REPLY_CORPUS = {
    "correct_sig": (["this is an email with a correct -- signature."], ["rick"]),
    "email_1_1": (["Hi folks", "Java HTTP API"], ["riak-users mailing list"]),
    "email_1_2": (
        ["You can list the keys", "would do it.", "delete them all individually"],
        ["What is the best way", "mailing list"],
    ),
    "email_1_3": (["Oh thanks.", "Having the function would be great."], ["Russell Brown wrote", "You can list"]),
    "email_1_4": (["Awesome! I haven't had another problem with it."], ["defunkt", "Loader seems"]),
    "email_1_5": (["One: Here's what I've got.", "- This is the fourth bullet point", "for a while."], []),
    "email_1_6": (["I get proper rendering as well."], ["Corey Donohoe", "Was this caching"]),
    "email_1_7": ([":+1:"], ["Chris Wanstrath", "Steps 0-2"]),
    "email_1_8": (["I will reply under this one", "and under this."], ["Hey there, this is my signature", "hi there"]),
    "email_2_1": (["Outlook with a reply"], ["Google Apps Sync", "Dear Google"]),
    "email_2_2": (["Outlook with a reply directly above line"], ["CRM Comments", "I am replying to a comment"]),
    "email_2_3": (["Outlook with a reply directly above line"], ["CRM Comments", "I am replying to a comment"]),
    "email_BlackBerry": (["Here is another email"], ["Sent from my BlackBerry"]),
    "email_bullets": (["test 2 this should list second", "and retain this formatting", "- and another"], ["Give us"]),
    "email_iPhone": (["Here is another email"], ["Sent from my iPhone"]),
    "email_long_quote": (["Hi folks"], [">>>>>>>>>>"]),
    "email_multi_word_sent_from_my_mobile_device": (["Here is another email"], ["Sent from my Verizon"]),
    "email_one_is_not_on": (["Thank, this is really helpful.", "when I run..."], ["Dave Tapley wrote", "good news"]),
    "email_sent_from_my_not_signature": (["Here is another email", "Sent from my desk, is much easier"], []),
    "email_sig_delimiter_in_middle_of_line": (["And here is a fix -- this is not a signature.", "kthxbai"], []),
    "greedy_on": (["On your remote host you can run:", "the tunnel is not working."], ["George Plymale wrote"]),
    "pathological": (["I think you're onto something.", "get back to a computer."], ["John Sullivan", "ATGGAG"]),
}
KNOWN_MISSES = {
    "email_1_1": "a mailing-list footer under a first message is kept",
    "email_long_quote": "a line of '>' that quotes nothing is kept",
    "email_1_2": "the list footer under a bottom-posted answer is kept",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[n])) if n in KNOWN_MISSES else n
        for n in REPLY_CORPUS
    ],
)
def test_the_new_text_of_each_reply_in_the_shared_corpus(name):
    keep, drop = REPLY_CORPUS[name]
    text = " ".join(new_text((REPLIES / f"{name}.txt").read_text()).split())
    assert all(" ".join(k.split()) in text for k in keep), text[:300]
    assert not any(d in text for d in drop), text[:300]


def test_the_reply_corpus_is_all_there():
    assert sorted(p.stem for p in REPLIES.glob("*.txt")) == sorted(REPLY_CORPUS)


# Replies of our own, under the reply headers of other languages and clients.
OTHER_CLIENTS = {
    "de_gmail": (
        "Danke, passt so.\n\nAm Mo., 3. Juni 2024 um 10:12 Uhr schrieb Anna <anna@example.org>:\n> Hallo, passt der Termin?\n",
        "Danke, passt so.",
    ),
    "fr_gmail": (
        "Merci beaucoup !\n\nLe lun. 3 juin 2024 à 10:12, Anna <anna@example.org> a écrit :\n> Bonjour, ça va ?\n",
        "Merci beaucoup !",
    ),
    "es_gmail": (
        "Perfecto, gracias.\n\nEl lun, 3 jun 2024 a las 10:12, Anna (<anna@example.org>) escribió:\n> ¿El martes?\n",
        "Perfecto, gracias.",
    ),
    "outlook": (
        "Sounds good.\n\n-----Original Message-----\nFrom: Anna <anna@example.org>\nSent: Monday, June 3, 2024"
        " 10:12 AM\nTo: Bob\nSubject: Meeting\n\nDoes Tuesday work?\n",
        "Sounds good.",
    ),
    "de_outlook": (
        "Ja, gerne.\n\nVon: Anna <anna@example.org>\nGesendet: Montag, 3. Juni 2024 10:12\nAn: Bob\nBetreff: Termin"
        "\n\nPasst Dienstag?\n",
        "Ja, gerne.",
    ),
    "signature": ("Yes please, go ahead.\n\n-- \nBob Example\nACME Corp\n", "Yes please, go ahead."),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="mail-parser-reply misses Gmail's Spanish header"))
        if n == "es_gmail"
        else n
        for n in OTHER_CLIENTS
    ],
)
def test_quoted_history_under_other_languages_and_clients_headers_is_cut(name):
    body, expected = OTHER_CLIENTS[name]
    assert new_text(body) == expected


# `mailflow inbound classify`


def run_cli(*args: str, stdin: bytes | None = None):
    from mailflow.cli import app

    return CliRunner().invoke(app, ["inbound", "classify", *args], input=stdin)


def test_classify_json_prints_one_object_per_file_and_reads_stdin_for_a_dash(tmp_path):
    reply = tmp_path / "reply.eml"
    reply.write_bytes(message(REPLY_BODY, subject="Re: Tuesday?", In_Reply_To="<job-1@example.org>"))
    result = run_cli(str(SISIMAI / "arf-02.eml"), str(reply), "-", "--json", stdin=DSN)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["file"], r["kind"]) for r in rows] == [
        (str(SISIMAI / "arf-02.eml"), "complaint"),
        (str(reply), "reply"),
        ("-", "bounce"),
    ]
    assert rows[0]["feedback_type"] == "abuse" and rows[0]["recipients"][0]["reason"] == "feedback"
    assert rows[1]["reply_text"] == "Yes, Tuesday works for me.\n\nAnn" and rows[1]["job_id"] is None
    assert set(rows[2]["recipients"][0]) >= {"address", "status", "reply_code", "reason", "hard", "remote_mta"}
    assert rows[2]["original_message_id"] == "<job-42@example.org>"


def test_classify_reports_an_unreadable_file_and_goes_on_with_the_others(tmp_path):
    result = run_cli(str(tmp_path / "missing.eml"), str(SISIMAI / "rfc3834-01.eml"))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.eml'}: No such file or directory"]
    assert "auto_reply" in result.stdout and "vacation" in result.stdout


def test_classifys_human_output_fits_80_columns():
    result = run_cli(*(str(SISIMAI / f"{n}.eml") for n in ("arf-16", "rfc3834-04", "lhost-postfix-01")))
    assert result.exit_code == 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "kind      complaint" in result.stdout and "reason feedback  hard no" in result.stdout
