"""Users of the browser pages (tenants/users.py): roles per tenant, argon2 passwords kept out of
the log, logins that cost the same for unknown addresses, counted failures and the throttle."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from argon2 import PasswordHasher, extract_parameters
from typer.testing import CliRunner

from mailflow.errors import ConflictError, NotFoundError, UsageError
from mailflow.tenants import registry, users

pytestmark = pytest.mark.integration

ANN = "Ann.Admin@Example.NET"  # as typed; stored as ann.admin@example.net
PASSWORD = "correct horse battery"
OTHER = "another long password"


def _events(db) -> list[tuple[str, str, str, str]]:
    return db.execute("SELECT stream, type, data::text, metadata::text FROM events ORDER BY seq").fetchall()


def _types(db) -> list[str]:
    return [t for _, t, _, _ in _events(db)]


def test_a_user_is_added_listed_given_a_new_password_and_removed(store, db):
    user = users.add(store, ANN, PASSWORD, "owner")
    assert (user.email, user.role, user.tenant) == ("ann.admin@example.net", "owner", "default")
    users.add(store, "bob@example.net", OTHER, "member")

    with store.pool.connection() as conn:
        listed = {u.email: u for u in users.listing(conn)}
    assert set(listed) == {"ann.admin@example.net", "bob@example.net"}
    assert listed["bob@example.net"].role == "member" and listed["bob@example.net"].status == "active"

    assert users.authenticate(store, "default", "bob@example.net", OTHER) is not None
    users.set_password(store, "BOB@example.net", "a brand new password")
    assert users.authenticate(store, "default", "bob@example.net", OTHER) is None
    assert users.authenticate(store, "default", "bob@example.net", "a brand new password") is not None

    users.remove(store, "bob@example.net")
    assert users.authenticate(store, "default", "bob@example.net", "a brand new password") is None
    with store.pool.connection() as conn:
        assert [u.email for u in users.listing(conn)] == ["ann.admin@example.net"]
        removed = [u for u in users.listing(conn, include_removed=True) if u.status == "removed"]
    assert len(removed) == 1 and removed[0].email is None  # the address is not kept for a removed user
    assert db.execute("SELECT count(*) FROM user_passwords").fetchone()[0] == 1
    assert _types(db).count("UserAdded") == 2 and "UserPasswordChanged" in _types(db) and "UserRemoved" in _types(db)

    with pytest.raises(NotFoundError, match="no user bob@example.net"):
        users.set_password(store, "bob@example.net", "yet another password")
    # A removed address may be added again, as a new user.
    again = users.add(store, "bob@example.net", OTHER, "viewer")
    assert again.id != removed[0].id


@pytest.mark.parametrize(
    "password, why",
    [
        ("short one", "at least 12 characters"),
        ("ann.admin@example.net", "must not be the email address"),
        ("  ANN.ADMIN@example.net ", "must not be the email address"),
        ("x" * 1025, "at most 1024 characters"),
    ],
)
def test_the_password_policy_refuses_short_passwords_and_the_address_itself_and_writes_nothing(
    store, db, password, why
):
    with pytest.raises(users.PasswordRejected, match=why):
        users.add(store, ANN, password, "owner")
    assert _types(db) == []
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_bad_roles_and_addresses_and_a_second_user_of_one_address_are_refused(store):
    with pytest.raises(UsageError, match="role 'root' is not one of owner, admin, member, viewer"):
        users.add(store, ANN, PASSWORD, "root")
    with pytest.raises(UsageError, match="is not a valid email address"):
        users.add(store, "not-an-address", PASSWORD, "owner")
    users.add(store, ANN, PASSWORD, "owner")
    with pytest.raises(ConflictError, match="is a user already"):
        users.add(store, ANN.lower(), OTHER, "viewer")


def test_roles_change_and_the_only_owner_can_be_neither_demoted_nor_removed(store, db):
    users.add(store, ANN, PASSWORD, "owner")
    users.add(store, "bob@example.net", OTHER, "viewer")
    assert users.set_role(store, "bob@example.net", "admin") == "viewer"
    assert users.set_role(store, "bob@example.net", "admin") == "admin"  # no change, no event
    assert _types(db).count("UserRoleChanged") == 1
    assert users.authenticate(store, "default", "bob@example.net", OTHER).role == "admin"

    with pytest.raises(ConflictError, match="only owner"):
        users.set_role(store, ANN, "admin")
    with pytest.raises(ConflictError, match="only owner"):
        users.remove(store, ANN)
    users.set_role(store, "bob@example.net", "owner")
    assert users.set_role(store, ANN, "member") == "owner"
    users.remove(store, ANN)


def test_an_unknown_address_and_a_wrong_password_each_verify_one_hash_of_the_same_parameters(store, monkeypatch):
    users.add(store, ANN, PASSWORD, "owner")
    verified: list[str] = []
    original = PasswordHasher.verify

    def spy(self, hash, password):
        verified.append(hash if isinstance(hash, str) else hash.decode())
        return original(self, hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", spy)

    assert users.authenticate(store, "default", "nobody@example.net", PASSWORD) is None
    assert len(verified) == 1
    unknown = verified.pop()
    assert users.authenticate(store, "default", ANN, "a wrong password!") is None
    assert len(verified) == 1
    wrong = verified.pop()
    assert unknown != wrong  # the dummy hash, not the user's
    assert extract_parameters(unknown) == extract_parameters(wrong) == users.HASHER._parameters
    # An unknown tenant (and an id that is not one) costs one verification too.
    assert users.authenticate(store, "nosuchtenant", ANN, PASSWORD) is None
    assert users.authenticate(store, "Not A Tenant!", ANN, PASSWORD) is None
    assert len(verified) == 2


def test_a_hash_made_with_older_parameters_is_replaced_at_the_next_good_login(store, db, monkeypatch):
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    monkeypatch.setattr(users, "HASHER", weak)
    users.add(store, ANN, PASSWORD, "owner")
    monkeypatch.undo()
    (before,) = db.execute("SELECT hash FROM user_passwords").fetchone()
    assert extract_parameters(before).time_cost == 1

    assert users.authenticate(store, "default", ANN, PASSWORD) is not None
    (after,) = db.execute("SELECT hash FROM user_passwords").fetchone()
    assert after != before and not users.HASHER.check_needs_rehash(after)
    assert users.authenticate(store, "default", ANN, PASSWORD) is not None
    assert db.execute("SELECT hash FROM user_passwords").fetchone()[0] == after  # not rehashed again


def test_no_event_carries_a_password_its_hash_or_the_address(store, db):
    users.add(store, ANN, PASSWORD, "owner")
    users.set_password(store, ANN, OTHER)
    users.set_role(store, ANN, "owner")
    users.authenticate(store, "default", ANN, OTHER)
    users.authenticate(store, "default", ANN, PASSWORD)
    users.authenticate(store, "default", "guess@example.net", PASSWORD)
    (hashed,) = db.execute("SELECT hash FROM user_passwords").fetchone()

    events = _events(db)
    assert {t for _, t, _, _ in events} >= {"UserAdded", "UserPasswordChanged", "UserLoggedIn", "UserLoginFailed"}
    for stream, _, data, metadata in events:
        text = f"{stream} {data} {metadata}".lower()
        for secret in (PASSWORD, OTHER, hashed, hashed.split("$")[-1], "ann.admin@example.net", "guess@example.net"):
            assert secret.lower() not in text
        assert "argon2" not in text
    added = next(data for _, t, data, _ in events if t == "UserAdded")
    assert '"sealed": "s1.' in added.replace('":"', '": "')


def test_a_user_of_one_tenant_cannot_log_in_to_another(operator_store, store, db):
    registry.create(operator_store, "acme")
    acme = operator_store.for_tenant("acme")
    users.add(store, ANN, PASSWORD, "owner")
    assert users.authenticate(operator_store, "acme", ANN, PASSWORD) is None

    users.add(acme, ANN, OTHER, "viewer")  # the same address in acme: another user, another password
    assert users.authenticate(operator_store, "acme", ANN, PASSWORD) is None
    assert users.authenticate(operator_store, "default", ANN, OTHER) is None
    assert users.authenticate(operator_store, "acme", ANN, OTHER).role == "viewer"
    assert users.authenticate(operator_store, "default", ANN, PASSWORD).role == "owner"

    with store.pool.connection() as conn:  # the default tenant's connection sees only its own user
        assert [(u.email, u.role) for u in users.listing(conn)] == [("ann.admin@example.net", "owner")]
    with pytest.raises(NotFoundError):
        users.remove(store, "someone@acme.example")
    # Failed logins in acme are counted in acme only.
    users.authenticate(operator_store, "acme", ANN, "wrong password!!")
    counts = dict(db.execute("SELECT tenant, failed_logins FROM users").fetchall())
    # Each tenant's user counts the other tenant's password tried on it, and acme's the wrong one.
    assert counts == {"default": 1, "acme": 2}


def test_failed_logins_are_counted_per_user_and_for_addresses_that_are_no_users(store, db):
    users.add(store, ANN, PASSWORD, "owner")
    for _ in range(3):
        assert users.authenticate(store, "default", ANN, "not the password") is None
    for _ in range(2):
        assert users.authenticate(store, "default", "guess@example.net", "not the password") is None
    with store.pool.connection() as conn:
        (ann,) = users.listing(conn)
        assert ann.failed_logins == 3 and ann.last_failed_login_at is not None and ann.last_login_at is None
        assert users.unknown_login_failures(conn) == 2

    assert users.authenticate(store, "default", ANN, PASSWORD) is not None
    with store.pool.connection() as conn:
        (ann,) = users.listing(conn)
    assert ann.failed_logins == 3 and ann.last_login_at is not None  # the total stays
    # The success starts the throttle's count for the address again.
    assert db.execute("SELECT count(*) FROM login_failures").fetchone()[0] == 1  # the guesses' row


def test_ten_failures_close_logins_for_an_address_known_or_not_until_the_window_ends(store):
    users.add(store, ANN, PASSWORD, "owner")
    for email in (ANN, "guess@example.net"):
        for _ in range(users.LOGIN_MAX_FAILURES):
            assert users.authenticate(store, "default", email, "not the password") is None
        with pytest.raises(users.LoginThrottled) as refused:
            users.authenticate(store, "default", email, PASSWORD)
        assert 0 < refused.value.retry_after <= users.LOGIN_WINDOW.total_seconds() + 1
        assert refused.value.http_status == 429
    users.add(store, "bob@example.net", OTHER, "member")
    assert users.authenticate(store, "default", "bob@example.net", OTHER) is not None  # others are not affected


def test_the_throttle_opens_when_the_window_of_the_first_failure_is_over():
    start = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert users.throttled(9, start, start + timedelta(minutes=1)) is None
    assert users.throttled(10, start, start + timedelta(minutes=5)) == 600
    assert users.throttled(10, start, start + timedelta(minutes=15)) is None
    assert users.throttled(None, None, start) is None


def test_rebuilding_the_users_projection_gives_the_same_rows(store, operator_store, db):
    users.add(store, ANN, PASSWORD, "owner")
    users.add(store, "bob@example.net", OTHER, "member")
    users.set_role(store, "bob@example.net", "viewer")
    users.authenticate(store, "default", ANN, "wrong password!!")
    users.authenticate(store, "default", "guess@example.net", "wrong password!!")
    users.authenticate(store, "default", ANN, PASSWORD)
    users.remove(store, "bob@example.net")
    query = "SELECT * FROM users ORDER BY id"
    before = db.execute(query).fetchall(), db.execute("SELECT * FROM login_failures ORDER BY subject").fetchall()
    users.PROJECTION.rebuild(operator_store)
    assert (
        db.execute(query).fetchall(),
        db.execute("SELECT * FROM login_failures ORDER BY subject").fetchall(),
    ) == before
    assert users.authenticate(store, "default", ANN, PASSWORD) is not None  # passwords are not rebuilt away


def test_an_erased_person_is_no_user_and_a_rebuild_does_not_bring_them_back(store, operator_store, db):
    from mailflow.outbound import contacts

    users.add(store, ANN, PASSWORD, "owner")
    users.add(store, "bob@example.net", OTHER, "owner")
    contacts.erase(store, ANN)
    assert users.authenticate(store, "default", ANN, PASSWORD) is None
    users.PROJECTION.rebuild(operator_store)
    rows = db.execute("SELECT email FROM users").fetchall()
    assert rows == [("bob@example.net",)]
    assert db.execute("SELECT count(*) FROM user_passwords").fetchone()[0] == 1


def test_the_cli_adds_lists_changes_and_removes_users_and_never_prints_a_password(settings, monkeypatch):
    from mailflow.commands import base
    from mailflow.commands import users as command

    monkeypatch.setattr(base.state, "settings", settings)
    monkeypatch.setattr(base.state, "runtime", None)
    runner = CliRunner()

    def run(*args: str, stdin: str | None = None):
        result = runner.invoke(command.app, list(args), input=stdin)
        base.close()
        return result

    try:
        added = run("add", ANN, "--role", "owner", "--password-stdin", stdin=PASSWORD + "\n")
        assert added.exit_code == 0, added.output
        assert "added ann.admin@example.net as owner of tenant default" in added.output
        weak = run("add", "bob@example.net", "--role", "member", "--password-stdin", stdin="short\n")
        assert weak.exit_code != 0 and "at least 12 characters" in str(weak.exception)
        assert run("add", "bob@example.net", "--role", "member", "--password-stdin", stdin=OTHER).exit_code == 0
        assert run("role", "bob@example.net", "admin").exit_code == 0
        assert run("passwd", "bob@example.net", "--password-stdin", stdin="a third long password\n").exit_code == 0
        listed = run("list", "--json")
        assert listed.exit_code == 0, listed.output
        doc = json.loads(listed.output)
        assert {(u["email"], u["role"]) for u in doc["users"]} == {
            ("ann.admin@example.net", "owner"),
            ("bob@example.net", "admin"),
        }
        assert doc["failed_logins_unknown_addresses"] == 0
        human = run("list")
        assert "ann.admin@example.net" in human.output and "2 user(s)" in human.output
        assert run("remove", "bob@example.net").exit_code == 0
        for result in (added, listed, human):
            assert PASSWORD not in result.output and "argon2" not in result.output
        # Without --password-stdin and not on a terminal: one clear error, nothing added.
        asked = run("add", "carol@example.net", "--role", "viewer", stdin="")
        assert asked.exit_code != 0 and "--password-stdin" in str(asked.exception)
    finally:
        base.close()
