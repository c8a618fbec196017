"""Commands room: `mailflow users` - users of the browser pages: add, list, passwd, role, remove.

Acts on the CLI's tenant (MAILFLOW_TENANT / --tenant). A password is read from stdin with
--password-stdin (one line), else asked twice without echo; it is never an argument (it
would be in the shell's history and in `ps`), never printed and never logged.
"""

from __future__ import annotations

import sys

import typer

from mailflow.commands.base import JsonOpt, emit_json, new_app, out, quiet_logs, runtime
from mailflow.commands.contacts import acting_user
from mailflow.errors import UsageError

app = new_app("Users of the browser pages: add, list, passwd, role, remove.")

PasswordStdinOpt = typer.Option(
    False, "--password-stdin", help="Read the password from the first line of stdin instead of asking."
)


def read_password(from_stdin: bool) -> str:
    """The new password: stdin's first line, or asked twice on the terminal without echo."""
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password.removesuffix("\r")
        if not password:
            raise UsageError("--password-stdin: stdin held no password")
        return password
    if not sys.stdin.isatty():
        raise UsageError("not on a terminal: give the password on stdin with --password-stdin")
    first = typer.prompt("password", hide_input=True, err=True)
    again = typer.prompt("password again", hide_input=True, err=True)
    if first != again:
        raise UsageError("the two passwords differ; nothing was changed")
    return str(first)


@app.command("add")
def users_add(
    email: str = typer.Argument(...),
    role: str = typer.Option(..., "--role", help="owner, admin, member or viewer."),
    password_stdin: bool = PasswordStdinOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Add a user who logs in to the browser pages with this email and a password."""
    from mailflow.tenants import users

    quiet_logs()
    address = users.address(email)
    users.check_role(role)
    password = read_password(password_stdin)
    store = runtime().store
    user = users.add(store, address, password, role, actor=acting_user())
    if as_json:
        emit_json(user.to_dict())
        return
    out.print(f"added {user.email} as {user.role} of tenant {user.tenant}", markup=False)


@app.command("list")
def users_list(
    include_removed: bool = typer.Option(False, "--all", help="Removed users too."),
    as_json: bool = JsonOpt,
) -> None:
    """The tenant's users: role, open sessions, failed logins, last login."""
    from mailflow.tenants import users

    quiet_logs()
    with runtime().connect() as conn:
        rows = users.listing(conn, include_removed=include_removed)
        guesses = users.unknown_login_failures(conn)
    if as_json:
        emit_json({"users": [u.to_dict() for u in rows], "failed_logins_unknown_addresses": guesses})
        return
    out.print(f"{'email':<36} {'role':<7} {'status':<8} {'sessions':>8} {'failed':>7}  last login", markup=False)
    for u in rows:
        last = f"{u.last_login_at:%Y-%m-%d %H:%M}" if u.last_login_at else "never"
        out.print(
            f"{u.email or '(removed)':<36} {u.role:<7} {u.status:<8} {u.sessions:>8} {u.failed_logins:>7}  {last}",
            markup=False,
        )
    out.print(f"{len(rows)} user(s); {guesses} failed login(s) for addresses that are no user's", markup=False)


@app.command("passwd")
def users_passwd(
    email: str = typer.Argument(...),
    password_stdin: bool = PasswordStdinOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Set a user's password; their open sessions end."""
    from mailflow.tenants import users

    quiet_logs()
    address = users.address(email)
    password = read_password(password_stdin)
    ended = users.set_password(runtime().store, address, password, actor=acting_user())
    if as_json:
        emit_json({"email": address, "sessions_ended": ended})
        return
    out.print(f"password of {address} changed; {ended} session(s) ended", markup=False)


@app.command("role")
def users_role(
    email: str = typer.Argument(...),
    role: str = typer.Argument(..., help="owner, admin, member or viewer."),
    as_json: bool = JsonOpt,
) -> None:
    """Give a user another role (in effect at once, in open sessions too)."""
    from mailflow.tenants import users

    quiet_logs()
    address = users.address(email)
    previous = users.set_role(runtime().store, address, role, actor=acting_user())
    if as_json:
        emit_json({"email": address, "role": role, "previous_role": previous})
        return
    if previous == role:
        out.print(f"{address} is {role} already; nothing changed", markup=False)
    else:
        out.print(f"{address} is {role} now (was {previous})", markup=False)


@app.command("remove")
def users_remove(email: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Remove a user: they can no longer log in, and their open sessions end at once."""
    from mailflow.tenants import users

    quiet_logs()
    address = users.address(email)
    ended = users.remove(runtime().store, address, actor=acting_user())
    if as_json:
        emit_json({"removed": address, "sessions_ended": ended})
        return
    out.print(f"removed {address}; {ended} session(s) ended", markup=False)
