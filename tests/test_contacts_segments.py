"""Contacts import, segments over real PostgreSQL, templates and suppressions."""

from __future__ import annotations

import io
import re

import pytest

from mailflow.errors import NotFoundError
from mailflow.infra.services import connect
from mailflow.outbound import segments, suppressions, templates
from mailflow.outbound.contacts import import_contacts, parse_csv
from mailflow.outbound.segments import SegmentError, compile_filter
from mailflow.outbound.templates import Template, TemplateError

pytestmark = pytest.mark.integration

CSV = """email,first_name,country,age,plan,vip
ann@example.org,Ann,NL,34,pro,true
bob@example.org,Bob,BE,17,free,false
not-an-address,Nobody,NL,40,pro,false
cy@Example.ORG,Cy,DE,51,pro,
dee@example.net,Dee,NL,,free,false
ann@example.org,Ann again,NL,35,pro,true
,Empty,NL,1,free,false
"""


def load(store) -> object:
    return import_contacts(store, parse_csv(io.StringIO(CSV)), "test.csv")


def test_csv_import_reports_bad_rows_by_line_and_imports_the_rest(store, db_url):
    report = load(store)
    assert report.rows == 7 and report.imported == 4 and report.created == 4
    assert report.duplicates_in_file == 1
    assert [(r.line, r.value) for r in report.rejected] == [(4, "not-an-address"), (8, "")]
    with connect(db_url) as c:
        rows = dict(c.execute("SELECT email, attributes FROM contacts").fetchall())
    assert set(rows) == {"ann@example.org", "bob@example.org", "cy@example.org", "dee@example.net"}
    assert rows["ann@example.org"] == {"first_name": "Ann", "country": "NL", "age": 34, "plan": "pro", "vip": True}
    assert "age" not in rows["dee@example.net"]  # empty cells are left out
    # Importing again updates, never duplicates.
    again = load(store)
    assert (again.created, again.updated) == (0, 4)
    with connect(db_url) as c:
        assert c.execute("SELECT count(*) FROM contacts").fetchone()[0] == 4
        assert c.execute("SELECT count(*) FROM events WHERE type = 'ContactsImported'").fetchone()[0] == 2


def test_a_csv_without_an_email_column_is_refused():
    with pytest.raises(Exception, match="no `email` column"):
        list(parse_csv(io.StringIO("name,country\nx,NL\n")))


@pytest.mark.parametrize(
    "doc,expected",
    [
        ({}, {"ann", "bob", "cy", "dee"}),
        ({"attributes.country": "NL"}, {"ann", "dee"}),
        ({"attributes.country": {"$in": ["BE", "DE"]}}, {"bob", "cy"}),
        ({"attributes.age": {"$gte": 18}}, {"ann", "cy"}),
        ({"attributes.age": {"$gte": 18, "$lt": 50}}, {"ann"}),
        ({"attributes.plan": "pro", "attributes.country": {"$ne": "NL"}}, {"cy"}),
        ({"$or": [{"attributes.vip": True}, {"domain": "example.net"}]}, {"ann", "dee"}),
        ({"$not": {"attributes.plan": "pro"}}, {"bob", "dee"}),
        ({"attributes.age": {"$exists": False}}, {"dee"}),
        ({"email": {"$contains": "@EXAMPLE.org"}}, {"ann", "bob", "cy"}),
        ({"attributes.first_name": {"$contains": "y"}}, {"cy"}),
        ({"attributes.first_name": {"$gt": "B"}}, {"bob", "cy", "dee"}),
        ({"status": "active", "attributes.country": {"$nin": ["NL"]}}, {"bob", "cy"}),
    ],
)
def test_segment_filters_select_the_right_contacts(store, db_url, doc, expected):
    load(store)
    with connect(db_url) as c:
        pv = segments.preview(c, doc, sample=100)
    assert {s["email"].split("@")[0] for s in pv.sample} == expected
    assert pv.count == len(expected)


@pytest.mark.parametrize(
    "doc,message",
    [
        ({"attributes.x; DROP TABLE contacts": 1}, "attribute name"),
        ({"password": "x"}, "unknown field 'password'"),
        ({"attributes.age": {"$regex": "."}}, "unknown operator '$regex'"),
        ({"$or": []}, "non-empty list"),
        ({"status": "gone"}, "status is one of"),
        ({"created_at": {"$gt": "yesterday"}}, "ISO 8601"),
        ([1, 2], "expected an object"),
    ],
)
def test_bad_segment_filters_are_rejected_with_where_and_why(doc, message):
    with pytest.raises(SegmentError, match=re.escape(message)):
        compile_filter(doc)


def test_values_are_parameters_never_sql(store, db_url):
    load(store)
    evil = "x' OR '1'='1"
    with connect(db_url) as c:
        assert segments.preview(c, {"email": evil}).count == 0
        assert segments.preview(c, {"attributes.country": evil}).count == 0
    compiled = compile_filter({"email": evil})
    assert evil in compiled.params and evil not in compiled.where.as_string(None)


def test_a_saved_segment_is_loaded_by_name_and_redefinition_replaces_it(store, db_url):
    load(store)
    segments.define(store, "dutch", {"attributes.country": "NL"})
    segments.define(store, "dutch", {"attributes.country": "NL", "attributes.plan": "pro"})
    with connect(db_url) as c:
        assert segments.preview(c, segments.load(c, "dutch")).count == 1
        with pytest.raises(NotFoundError, match="no segment named 'nope'"):
            segments.load(c, "nope")


def test_templates_render_per_contact_and_errors_name_template_line_and_variable(store, db_url):
    tpl = Template(
        "welcome",
        "Hi {{ first_name }}",
        "<h1>Hi</h1>\n<p>{{ first_name }} from {{ country }}</p>",
        "Hi {{ first_name }}",
    )
    templates.save(store, tpl)
    with connect(db_url) as c:
        loaded = templates.load(c, "welcome", tenant="default")
    out = templates.render(loaded, {"first_name": "<Ann>", "country": "NL"})
    assert out.subject == "Hi <Ann>" and "&lt;Ann&gt; from NL" in out.html and out.text == "Hi <Ann>"
    with pytest.raises(TemplateError) as info:
        templates.render(loaded, {"first_name": "Ann"})
    assert (info.value.template, info.value.part, info.value.line, info.value.variable) == (
        "welcome",
        "html",
        2,
        "country",
    )
    with pytest.raises(TemplateError, match="syntax error"):
        templates.save(store, Template("broken", "x", "{% for %}"))
    with pytest.raises(TemplateError, match="not allowed"):
        templates.render(Template("evil", "x", "{{ ''.__class__.__mro__ }}"), {})


def test_suppressing_an_address_marks_the_contact_and_removal_lifts_it(store, db_url):
    load(store)
    suppressions.add(store, "Bob@Example.org", reason="bounce", detail="5.1.1", contact_status="bounced")
    with connect(db_url) as c:
        assert [s.email for s in suppressions.listing(c)] == ["bob@example.org"]
        assert c.execute("SELECT status FROM contacts WHERE email = 'bob@example.org'").fetchone()[0] == "bounced"
        assert segments.preview(c, {"status": "active"}).count == 3
    removed = suppressions.remove(store, "bob@example.org")
    with connect(db_url) as c:
        assert suppressions.listing(c) == []
        # The contact stays bounced (not mailed) until `contacts reactivate`.
        assert c.execute("SELECT status FROM contacts WHERE email = 'bob@example.org'").fetchone()[0] == "bounced"
    assert removed.still_stopped and removed.contact_status == "bounced"


def test_csv_values_are_typed_only_when_nothing_is_lost():
    from mailflow.outbound.contacts import typed

    assert [typed(v) for v in ("42", "-7", "2.5", "true", "FALSE")] == [42, -7, 2.5, True, False]
    # Postcodes, phone numbers, long ids and odd spellings stay text.
    assert [typed(v) for v in ("0123", "+31612345678", "12345678901234567890", "1e5", "1,5")] == [
        "0123",
        "+31612345678",
        "12345678901234567890",
        "1e5",
        "1,5",
    ]
