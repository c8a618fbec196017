"""Tenants: tenant B gets "not found" for every id of tenant A's, through every command that
takes one; names are unique per tenant; a connection with no tenant set sees no tenant row;
a suspended tenant can read but not write, and its mail is not queued."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from mailflow.errors import ConflictError, InvalidEventError
from mailflow.events import Metadata, NewEvent
from mailflow.infra.services import connect
from mailflow.infra.tenancy import OPERATOR_ROLE, TENANT_ROLE

from .conftest import run_cli

pytestmark = pytest.mark.process

RELAY = "smtp://127.0.0.1:2525?tls=none"
NOT_FOUND = 5


def cli(env: dict[str, str], tenant: str, *args: str):
    return run_cli(dict(env, MAILFLOW_TENANT=tenant), *args)


def ok(res) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture
def two_tenants(env, tmp_path):
    """Tenant acme with one of everything (a started campaign and a transactional job among
    them); tenant beta, empty."""
    ok(run_cli(env, "tenants", "create", "acme", "--name", "Acme Ltd"))
    ok(run_cli(env, "tenants", "create", "beta"))
    csv = tmp_path / "people.csv"
    csv.write_text("email,country\nann@example.net,NL\nbob@example.net,DE\n")
    (tmp_path / "body.txt").write_text("Hello {{ email }}")
    for args in (
        ("contacts", "import", str(csv)),
        ("segments", "create", "dutch", "--filter", '{"attributes.country": "NL"}'),
        ("templates", "create", "hello", "--subject", "Hi", "--text", str(tmp_path / "body.txt")),
        ("senders", "add", "news", "--from", "news@acme.example", "--relay", RELAY),
        ("campaigns", "create", "spring", "--sender", "news", "--template", "hello", "--segment", "dutch"),
        ("campaigns", "start", "spring"),
        ("suppressions", "add", "carol@example.net"),
        ("domains", "add", "acme.example"),
        ("routes", "add", "*@acme.example", "--drop"),
    ):
        ok(cli(env, "acme", *args))
    sent = json.loads(
        ok(cli(env, "acme", "send", "--sender", "news", "--template", "hello", "--to", "dan@example.net", "--json"))
    )
    campaign = json.loads(ok(cli(env, "acme", "campaigns", "list", "--json")))[0]
    route = json.loads(ok(cli(env, "acme", "routes", "list", "--json")))[0]
    return {"campaign": campaign["id"], "job": sent["job_id"], "route": route["id"]}


def test_tenant_b_gets_not_found_for_every_id_of_tenant_a(env, two_tenants, db):
    cid, job = two_tenants["campaign"], two_tenants["job"]
    acme_event = db.execute(
        "SELECT p.position FROM events e JOIN event_positions p USING (seq) "
        "WHERE e.tenant = 'acme' ORDER BY 1 DESC LIMIT 1"
    ).fetchone()
    by_id = [
        ("contacts", "show", "ann@example.net"),
        ("contacts", "update", "ann@example.net", "--attr", "country=FR"),
        ("contacts", "reactivate", "ann@example.net", "--reason", "asked"),
        ("segments", "preview", "dutch"),
        ("segments", "delete", "dutch"),
        ("templates", "render", "hello"),
        ("templates", "render", "hello", "--contact", "ann@example.net"),
        ("templates", "delete", "hello"),
        ("senders", "test", "news"),
        ("senders", "dkim-record", "news"),
        ("senders", "delete", "news"),
        ("campaigns", "status", "spring"),
        ("campaigns", "status", cid),
        ("campaigns", "status", cid[:8]),
        ("campaigns", "start", cid),
        ("campaigns", "pause", cid),
        ("campaigns", "resume", "spring"),
        ("campaigns", "cancel", cid),
        ("campaigns", "resend-failed", cid),
        ("campaigns", "start", cid[:8], "--at", "2030-01-01T00:00:00Z"),
        ("campaigns", "create", "copy", "--sender", "news", "--template", "hello", "--segment", "dutch"),
        ("jobs", "show", job),
        ("jobs", "show", job[:8]),
        ("suppressions", "remove", "carol@example.net"),
        ("send", "--sender", "news", "--template", "hello", "--to", "eve@example.net"),
        ("events", "show", str(acme_event[0] if acme_event else 1)),
        ("routes", "remove", two_tenants["route"]),
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda args: (args, cli(env, "beta", *args)), by_id))
    wrong = [(" ".join(a), r.returncode, r.stderr.strip()) for a, r in results if r.returncode != NOT_FOUND]
    assert wrong == [], "commands that did not answer 'not found' for another tenant's id"
    for _, r in results:
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    for args in (
        ("contacts", "list"),
        ("segments", "list"),
        ("templates", "list"),
        ("senders", "list"),
        ("campaigns", "list"),
        ("jobs", "list"),
        ("suppressions", "list"),
        ("routes", "list"),
    ):
        listed = json.loads(ok(cli(env, "beta", *args, "--json")))
        assert listed in ([], {"count": 0, "contacts": []}), args
    streams = [
        e["stream"]
        for e in map(json.loads, ok(cli(env, "beta", "events", "tail", "--json", "-n", "1000")).splitlines())
    ]
    assert all(s.startswith("beta/") for s in streams), streams
    # ... and nothing of acme's changed: its campaign still runs, its job and catalogue are there.
    status = json.loads(ok(cli(env, "acme", "campaigns", "status", "spring", "--json")))
    assert status["status"] == "running" and status["total"] == 1
    assert json.loads(ok(cli(env, "acme", "jobs", "show", job, "--json")))["job"]["id"] == job
    assert [s["name"] for s in json.loads(ok(cli(env, "acme", "senders", "list", "--json")))] == ["news"]
    assert [r["id"] for r in json.loads(ok(cli(env, "acme", "routes", "list", "--json")))] == [two_tenants["route"]]


def test_names_and_addresses_are_unique_per_tenant_not_globally(env, two_tenants, tmp_path, db):
    csv = tmp_path / "beta.csv"
    csv.write_text("email,country\nann@example.net,NL\n")
    (tmp_path / "b.txt").write_text("Beta {{ email }}")
    for args in (
        ("contacts", "import", str(csv)),
        ("segments", "create", "dutch", "--filter", "{}"),
        ("templates", "create", "hello", "--subject", "Beta", "--text", str(tmp_path / "b.txt")),
        ("senders", "add", "news", "--from", "news@beta.example", "--relay", RELAY),
        ("campaigns", "create", "spring", "--sender", "news", "--template", "hello", "--segment", "dutch"),
        ("campaigns", "start", "spring"),
    ):
        ok(cli(env, "beta", *args))
    rows = db.execute("SELECT tenant, from_email FROM senders ORDER BY tenant").fetchall()
    assert rows == [("acme", "news@acme.example"), ("beta", "news@beta.example")]
    jobs = db.execute(
        "SELECT tenant, idempotency_key FROM jobs WHERE campaign_id IS NOT NULL ORDER BY tenant"
    ).fetchall()
    assert [t for t, _ in jobs] == ["acme", "beta"]
    streams = {s for (s,) in db.execute("SELECT stream FROM streams WHERE stream LIKE '%/template-hello'")}
    assert streams == {"acme/template-hello", "beta/template-hello"}


def test_a_connection_without_a_tenant_sees_no_tenant_row(env, two_tenants, db_url):
    with connect(db_url) as owner:
        tables = [
            t
            for (t,) in owner.execute(
                "SELECT table_name FROM information_schema.columns WHERE column_name = 'tenant' "
                "AND table_schema = current_schema() ORDER BY 1"
            )
        ]
        rows = {t: owner.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    assert {"contacts", "suppressions", "segments", "templates", "senders", "campaigns", "jobs", "events"} <= set(
        tables
    )
    assert all(rows[t] > 0 for t in ("contacts", "segments", "templates", "senders", "campaigns", "jobs", "events"))
    with connect(db_url) as conn:
        conn.execute(f"SET ROLE {TENANT_ROLE}")
        seen = {
            t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
            for t in [*tables, "tenants", "streams", "dead_letters", "consumer_failures"]
        }
        assert seen == dict.fromkeys(seen, 0)
        conn.execute("SELECT set_config('mailflow.tenant', 'beta', false)")
        assert conn.execute("SELECT count(*) FROM contacts").fetchone()[0] == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # and cannot write into acme
            conn.execute("INSERT INTO segments (tenant, name, filter) VALUES ('acme', 'x', '{}')")
        conn.execute("SELECT set_config('mailflow.tenant', 'acme', false)")
        assert conn.execute("SELECT count(*) FROM contacts").fetchone()[0] == rows["contacts"]
        conn.execute(f"SET ROLE {OPERATOR_ROLE}")
        conn.execute("SELECT set_config('mailflow.tenant', '', false)")
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == rows["jobs"]


def test_a_tenants_store_refuses_another_tenants_event_and_an_operators_must_name_one(store, operator_store):
    with pytest.raises(InvalidEventError, match="belongs to tenant 'acme'"):
        store.append("x", [NewEvent("T", {}, metadata=Metadata(tenant="acme"))])
    with pytest.raises(InvalidEventError, match="names no tenant"):
        operator_store.append("x", [NewEvent("T", {})])
    [env] = operator_store.append("x", [NewEvent("T", {}, metadata=Metadata(tenant="acme"))])
    assert (env.stream, env.metadata.tenant) == ("acme/x", "acme")


def test_a_suspended_tenant_reads_but_cannot_write_and_its_mail_is_not_queued(env, two_tenants, db):
    ok(run_cli(env, "tenants", "suspend", "acme", "--reason", "unpaid"))
    shown = json.loads(ok(run_cli(env, "tenants", "show", "acme", "--json")))
    assert shown["status"] == "suspended" and shown["contacts"] == 2
    assert json.loads(ok(cli(env, "acme", "campaigns", "list", "--json")))[0]["name"] == "spring"
    res = cli(env, "acme", "segments", "create", "more", "--filter", "{}")
    assert res.returncode == 4 and "tenant 'acme' is suspended" in res.stderr
    assert db.execute("SELECT count(*) FROM jobs WHERE tenant = 'acme' AND state = 'pending'").fetchone()[0] >= 1
    ok(run_cli(env, "tenants", "resume", "acme"))
    assert json.loads(ok(run_cli(env, "tenants", "list", "--json")))[0]["status"] == "active"


def test_tenant_ids_and_unknown_tenants_are_one_line_errors(env):
    res = run_cli(env, "--tenant", "Not_Valid", "contacts", "list")
    assert res.returncode == 2 and "--tenant" in res.stderr
    res = cli(env, "nobody", "contacts", "list")
    assert res.returncode == NOT_FOUND and "no tenant 'nobody'" in res.stderr and "tenants create nobody" in res.stderr
    ok(run_cli(env, "tenants", "create", "dup"))
    res = run_cli(env, "tenants", "create", "dup")
    assert res.returncode == 4 and "exists already" in res.stderr
    res = run_cli(env, "tenants", "show", "ghost")
    assert res.returncode == NOT_FOUND


def test_the_queuer_skips_a_suspended_tenants_due_jobs(operator_rt, rt, settings):
    from mailflow.outbound.queuer import Queuer
    from mailflow.tenants import registry

    from .test_outbound_pipeline import setup_catalog

    registry.create(operator_rt.store, "acme")
    acme = operator_rt.store.for_tenant("acme")
    acme.enforce_suspension = True
    for store in (rt.store, acme):
        setup_catalog(store, RELAY)
    from mailflow.outbound import sending

    for store, who in ((rt.store, "default"), (acme, "acme")):
        for i in range(3):
            sending.send_transactional(
                store, sender="tx", template="reset", to=f"{who}-{i}@example.net", variables={"name": "x", "code": 1}
            )
    registry.suspend(operator_rt.store, "acme")
    with pytest.raises(ConflictError, match="suspended"):
        sending.send_transactional(
            acme, sender="tx", template="reset", to="x@example.net", variables={"name": "x", "code": 1}
        )
    q = Queuer(operator_rt.store, operator_rt.services.redis_url, settings)
    q.tick(operator_rt.redis)
    with operator_rt.connect() as conn:
        states = dict(conn.execute("SELECT tenant || ':' || state, count(*) FROM jobs GROUP BY 1").fetchall())
    assert states == {"default:queued": 3, "acme:pending": 3}


def test_fair_share_interleaves_tenants_and_holds_back_a_tenant_at_its_limit():
    from mailflow.outbound.jobs import Priority
    from mailflow.outbound.queuer import fair_share

    def rows(tenant: str, n: int, hourly=None, daily=None):
        return [(f"{tenant}-{i}", tenant, "s", "example.net", "c", hourly, daily) for i in range(n)]

    big, small = rows("big", 1000), rows("small", 10)
    # A small campaign goes first, as if alone; the big one waits only for it.
    offered = [r[0] for r in fair_share(big + small, 20, priority=Priority.NORMAL, turn=0)]
    assert offered[:10] == [f"small-{i}" for i in range(10)] and offered[10:20] == [f"big-{i}" for i in range(10)]
    assert len(offered) == 80  # 4 x the batch, at most (some may be throttled)
    # Two tenants with more due than a batch take turns; the first turn rotates per tick.
    other = rows("other", 1000)
    both = [r[1] for r in fair_share(big + other, 10, priority=Priority.NORMAL, turn=0)]
    assert both[:6] == ["big", "other"] * 3
    assert next(r[1] for r in fair_share(big + other, 10, priority=Priority.NORMAL, turn=1)) == "other"
    limited = rows("capped", 50, hourly=3, daily=100) + rows("free", 5)
    normal = [r[1] for r in fair_share(limited, 100, priority=Priority.NORMAL, turn=0)]
    assert normal.count("capped") == 3 and normal.count("free") == 5
    over = rows("capped", 50, hourly=-2)
    assert list(fair_share(over, 100, priority=Priority.LOW, turn=0)) == []
    assert len(list(fair_share(over, 100, priority=Priority.HIGH, turn=0))) == 50  # transactional still goes
    # A tenant that has been sending lately waits until the newcomer has sent as much.
    newcomer = [r[1] for r in fair_share(big + other, 30, priority=Priority.NORMAL, turn=0, usage={"big": 5.0})]
    assert newcomer[:5] == ["other"] * 5 and newcomer[5:9] == ["big", "other", "big", "other"]
    # ... and a small campaign of a tenant that sent a lot lately waits its turn too.
    busy = [r[1] for r in fair_share(big + small, 20, priority=Priority.NORMAL, turn=0, usage={"small": 2000.0})]
    assert busy[:10] == ["big"] * 10


def test_usage_decays_by_half_every_half_life():
    from mailflow.outbound.queuer import Usage

    u = Usage(half_life_s=10.0)
    u.add("a", 100)
    assert u.now(u._at + 10.0)["a"] == pytest.approx(50.0)
    assert u.now(u._at + 20.0)["a"] == pytest.approx(12.5)


def _campaign(store, name: str, n: int) -> str:
    from mailflow.outbound import campaigns, segments
    from mailflow.outbound.contacts import ContactRow, import_contacts

    import_contacts(store, [ContactRow(email=f"{name}-{i}@example.net") for i in range(n)], source="test")
    segments.define(store, "all", {})
    cid = campaigns.create(store, name=name, sender="tx", template="plain", segment="all")
    campaigns.start(store, cid)
    return cid


def test_the_queuer_shares_each_batch_between_tenants_and_applies_hourly_limits(operator_rt, settings):
    from mailflow.outbound import sending, templates
    from mailflow.outbound.queuer import Queuer
    from mailflow.outbound.senders import Sender
    from mailflow.tenants import registry

    ops = operator_rt.store
    for t in ("big", "small", "capped"):
        registry.create(ops, t)
        store = ops.for_tenant(t)
        sending.save_sender(store, Sender("tx", "noreply@example.org", "", RELAY))
        templates.save(store, templates.Template("plain", "Hi", "", "Hi {{ email }}"))
    _campaign(ops.for_tenant("big"), "big", 600)
    _campaign(ops.for_tenant("small"), "small", 40)
    _campaign(ops.for_tenant("capped"), "capped", 30)
    registry.set_limits(ops, "capped", hourly=7, daily=None)
    for i in range(2):
        sending.send_transactional(ops.for_tenant("capped"), sender="tx", template="plain", to=f"tx{i}@example.net")
    unthrottled = settings.model_copy(
        update={"queuer_batch_size": 90, "queue_min_unread": 10_000, "rate_limits": {"*": 1e6, "example.net": 1e6}}
    )
    q = Queuer(ops, operator_rt.services.redis_url, unthrottled)
    r = operator_rt.redis
    q.tick(r)

    def queued() -> dict[str, int]:
        with operator_rt.connect() as conn:
            rows = conn.execute(
                "SELECT tenant || ':' || priority, count(*) FROM jobs WHERE state = 'queued' GROUP BY 1"
            )
            return dict(rows.fetchall())

    first = queued()
    # One batch of 90 normal jobs: the small tenant's 40 are all in it, beside the big one's.
    assert first["small:normal"] == 40 and first["big:normal"] >= 40
    # The limit counts every message (7 an hour); its 2 transactional ones went first.
    assert first["capped:high"] == 2 and first["capped:normal"] == 5
    for _ in range(10):
        q.tick(r)
    after = queued()
    assert after["capped:normal"] == 5, "a tenant at its hourly limit releases no more campaign mail"
    assert after["big:normal"] == 600
    with operator_rt.connect() as conn:
        usage = dict(conn.execute("SELECT tenant, sum(messages)::int FROM tenant_usage GROUP BY 1").fetchall())
    assert usage == {"big": 600, "small": 40, "capped": 7}


def test_the_queuer_keeps_about_a_quarter_second_of_work_unread_in_a_stream():
    from mailflow.outbound.queuer import DrainRate

    d = DrainRate(target_s=0.25, floor=100, cap=5000)
    assert d.room(0.0, 0) == 100  # nothing known yet: the floor
    d.added(100)
    assert d.room(1.0, 100) == 0  # workers took nothing: no room
    d.added(0)
    assert d.room(2.0, 0) == 100  # 100 taken in 1 s: still the floor (25 < 100)
    for t in range(3, 10):
        d.added(2000)
        d.room(float(t), 0)  # 2,000 a second taken
    d.added(2000)
    assert 400 < d.room(10.0, 0) <= 500  # about a quarter second of it
    assert DrainRate(0.25, 100, 50).room(0.0, 0) == 50  # never above the cap
