"""Inbound routes with PostgreSQL: each one an event and a row, the order the directory tries
them in (also after a rebuild), the checks a route add makes, tenant isolation, and
`mailflow routes` from the command line."""

from __future__ import annotations

import json

import pytest

from mailflow.consumers import inline
from mailflow.errors import ConflictError, NotFoundError, UsageError
from mailflow.inbound import directory, policy, routes
from mailflow.inbound.policy import Kind
from mailflow.runtime.projections import inline_projections

from .conftest import run_cli

pytestmark = pytest.mark.process


def _no_verp(address: str) -> str | None:
    return None


def _rows(db) -> list[tuple]:
    return db.execute(
        "SELECT tenant, id, seq, priority, pattern, headers, action, target, continue_matching, created_at "
        "FROM routes ORDER BY tenant, priority, seq"
    ).fetchall()


def test_a_route_is_an_event_and_a_row_and_the_directory_tries_them_by_priority_then_as_added(acme, rt, db):
    sales = routes.add_route(acme, "Sales@ACME.example", "mailbox", "Help@acme.example")
    catch_all = routes.add_route(acme, "*@acme.example", "reject", "No such person")
    shadowed = routes.add_route(acme, "late@acme.example", "drop")  # same priority, added after the catch-all
    oncall = routes.add_route(
        acme,
        "/ops-(?P<team>[a-z]+)@acme\\.example/",
        "forward",
        "oncall@example.net",
        headers=["Subject: urgent"],
        priority=10,
        continue_matching=True,
    )
    [(stream, data)] = db.execute(
        "SELECT stream, data FROM events WHERE type = 'RouteAdded' AND data->>'route_id' = %s", (oncall.id,)
    ).fetchall()
    assert stream == f"default/route-{oncall.id}"
    assert data == {
        "route_id": oncall.id,
        "priority": 10,
        "pattern": "/ops-(?P<team>[a-z]+)@acme\\.example/",
        "headers": [["subject", "urgent"]],
        "action": "forward",
        "target": "oncall@example.net",
        "continue_matching": True,
    }
    with rt.connect() as conn:
        snapshot = directory.load(conn)
        listed = routes.routes(conn)
    assert [r.id for r in snapshot.routes["default"]] == [oncall.id, sales.id, catch_all.id, shadowed.id]
    assert listed == list(snapshot.routes["default"]) and listed[1].target == "help@acme.example"
    assert policy.decide("sales@acme.example", snapshot, _no_verp).route_id == sales.id
    late = policy.decide("late@acme.example", snapshot, _no_verp)  # the catch-all was added first
    assert (late.kind, late.route_id, late.reply) == (Kind.REFUSED, catch_all.id, "550 5.7.1 No such person")
    ops = policy.decide("ops-db@acme.example", snapshot, _no_verp)
    assert (ops.kind, ops.route_id) == (Kind.ROUTE, oncall.id)  # its header condition needs the message

    routes.remove_route(acme, catch_all.id)
    assert db.execute("SELECT count(*) FROM events WHERE type = 'RouteRemoved'").fetchone()[0] == 1
    with rt.connect() as conn:
        snapshot = directory.load(conn)
    assert [r.id for r in snapshot.routes["default"]] == [oncall.id, sales.id, shadowed.id]
    assert policy.decide("someone@acme.example", snapshot, _no_verp).reply == policy.NO_SUCH_MAILBOX


def test_a_rebuild_of_the_routes_projection_gives_the_same_rows_in_the_same_order(acme, operator_store, db):
    made = [routes.add_route(acme, f"r{i}@acme.example", "drop", priority=100 - 10 * (i % 2)) for i in range(6)]
    routes.remove_route(acme, made[2].id)
    before = _rows(db)
    assert len(before) == 5
    projection = inline_projections()["routes"]
    assert projection.tables == ("routes",)
    assert projection.rebuild(operator_store) == 7
    assert _rows(db) == before


def test_a_route_is_for_the_tenants_own_domains_and_mailboxes_and_a_refused_one_writes_nothing(acme, db):
    with pytest.raises(UsageError, match="not one of this tenant's inbound domains"):
        routes.add_route(acme, "*@elsewhere.example", "drop")
    with pytest.raises(NotFoundError, match="no mailbox desk@acme.example"):
        routes.add_route(acme, "sales@acme.example", "mailbox", "desk@acme.example")
    with pytest.raises(ConflictError, match="is a mailbox"):
        routes.add_route(acme, "HELP+*@acme.example", "forward", "x@example.net")  # the mailbox takes it first
    with pytest.raises(UsageError, match="a loop"):
        routes.add_route(acme, "*@acme.example", "forward", "someone@acme.example")
    with pytest.raises(UsageError, match="priority"):
        routes.add_route(acme, "*@acme.example", "drop", priority=10**9)
    assert db.execute("SELECT count(*) FROM events WHERE type = 'RouteAdded'").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM routes").fetchone()[0] == 0


def test_a_mailbox_that_a_route_delivers_to_is_not_removed_under_it(acme):
    r = routes.add_route(acme, "sales@acme.example", "mailbox", "help@acme.example")
    with pytest.raises(ConflictError, match=f"route {r.id} delivers to help@acme.example"):
        directory.remove_mailbox(acme, "help@acme.example")
    routes.remove_route(acme, r.id)
    directory.remove_mailbox(acme, "help@acme.example")


def test_another_tenants_routes_are_invisible_to_a_tenant_and_never_take_its_mail(acme, operator_rt):
    from mailflow.tenants import registry

    registry.create(operator_rt.store, "beta")
    beta = operator_rt.store.for_tenant("beta")
    directory.add_domain(beta, "beta.example")
    everything = routes.add_route(acme, "/.*/", "drop")  # acme's regex would take any address
    with pytest.raises(NotFoundError, match=f"no route {everything.id}"):
        routes.remove_route(beta, everything.id)
    with pytest.raises(UsageError, match="not one of this tenant's inbound domains"):
        routes.add_route(beta, "*@acme.example", "drop")
    with inline.reading(beta) as conn:
        assert routes.routes(conn) == [] and directory.load(conn).routes == {}
    with operator_rt.connect() as conn:
        snapshot = directory.load(conn)  # the server's: every tenant's
    assert set(snapshot.routes) == {"default"}
    assert policy.decide("x@acme.example", snapshot, _no_verp).route_id == everything.id
    d = policy.decide("x@beta.example", snapshot, _no_verp)
    assert (d.kind, d.tenants, d.reply) == (Kind.REFUSED, ("beta",), policy.NO_SUCH_MAILBOX)


def test_routes_from_the_command_line(env):
    def ok(*args: str) -> str:
        res = run_cli(env, *args)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def fails(code: int, *args: str) -> str:
        res = run_cli(env, *args)
        assert res.returncode == code, (res.stdout, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr
        return res.stderr

    ok("domains", "add", "acme.example")
    ok("mailboxes", "add", "desk@acme.example")
    added = json.loads(
        ok("routes", "add", "support+*@acme.example", "--mailbox", "desk@acme.example", "--priority", "5", "--json")
    )
    assert (added["kind"], added["action"], added["target"]) == ("tag", "mailbox", "desk@acme.example")
    ok("routes", "add", "*@acme.example", "--reject", "--reason", "Nobody here by that name")
    ok(
        "routes",
        "add",
        "/^(?P<first>[a-z]+)\\.(?P<last>[a-z]+)@acme\\.example$/",
        "--http",
        "https://hooks.example.net/inbound/acme/a-long-path",
        "--header",
        "Subject: invoice",
        "--priority",
        "7",
        "--continue",
    )
    listed = ok("routes", "list").splitlines()
    assert all(len(line) <= 80 for line in listed), listed
    assert listed[0].startswith(added["id"]) and "support+*@acme.example  -> mailbox desk@acme.example" in listed[0]
    assert any(line.strip() == "if subject: /invoice/" for line in listed)
    assert [r["priority"] for r in json.loads(ok("routes", "list", "--json"))] == [5, 7, 100]

    tagged = json.loads(ok("routes", "test", "Support+Order-7@acme.example", "--json"))
    assert (tagged["kind"], tagged["route_id"]) == ("route", added["id"])
    assert [(r["id"], r["captures"]) for r in tagged["routes"]] == [(added["id"], {"tag": "order-7"})]
    invoice = json.loads(ok("routes", "test", "ann.lee@acme.example", "--header", "Subject: Your invoice", "--json"))
    assert [(r["action"], r["captures"]) for r in invoice["routes"]] == [("http", {"first": "ann", "last": "lee"})]
    assert invoice["refused_after_data"] is None
    other = ok("routes", "test", "ann.lee@acme.example")  # without the header: the catch-all refuses it
    assert "refused after DATA" in other and "550 5.7.1 Nobody here by that name" in other
    refused = ok("routes", "test", "nobody@acme.example")
    assert "refused at RCPT TO" in refused and "550 5.7.1 Nobody here by that name" in refused
    assert "550 5.7.1 Relaying denied" in ok("routes", "test", "x@foreign.example")
    assert "accepted for a mailbox" in ok("routes", "test", "desk+x@acme.example")

    ok("routes", "remove", added["id"])
    assert "no route" in fails(5, "routes", "remove", added["id"])
    assert "not a route pattern" in fails(2, "routes", "add", "he*lp@acme.example", "--drop")
    assert "one action" in fails(2, "routes", "add", "x@acme.example", "--drop", "--forward", "a@example.net")
    assert "repeats something that repeats" in fails(2, "routes", "add", "/(a+)+@acme\\.example/", "--drop")
