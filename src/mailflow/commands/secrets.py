"""Commands room: `mailflow secrets` - list the tenant's secrets (never their values), rotate the master key.

rotate-key re-encrypts every secret of every tenant under the newest master key, a batch per
transaction, while everything keeps running: processes read the key file again when they
meet a secret under a key they lack (see infra/vault.py).
"""

from __future__ import annotations

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from mailflow.commands.base import JsonOpt, emit_json, err, iso, new_app, out, quiet_logs, runtime

app = new_app("Secrets: encrypted relay passwords and DKIM keys; rotate the master key.")


@app.command("list")
def secrets_list(as_json: bool = JsonOpt) -> None:
    """The tenant's secrets: what uses each, its fingerprint and the key it is under (no values)."""
    quiet_logs()
    rt = runtime()
    with rt.connect() as conn:
        rows = rt.vault.listing(conn)
    if as_json:
        emit_json([{k: iso(v) for k, v in r.items()} for r in rows])
        return
    for r in rows:
        fingerprint = str(r["fingerprint"])
        out.print(f"{r['owner']:<22} {r['kind']:<15} {r['key_id']} {fingerprint[:28]}", markup=False)
    if not rows:
        out.print("no secrets")


@app.command("rotate-key")
def secrets_rotate_key(
    generate: bool = typer.Option(
        False,
        "--generate",
        help="First put a new random key at the top of the key file (not with MAILFLOW_SECRET_KEY).",
    ),
    retire: bool = typer.Option(
        False, "--retire", help="Afterwards drop the older keys (links signed with them stop working)."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Re-encrypt every secret under the newest master key, without downtime."""
    quiet_logs()
    rt = runtime(operator=True)
    keyring, vault = rt.keyring, rt.vault
    if generate:
        keyring.add_key()
    with rt.connect() as conn:
        total = vault.stale(conn)
    if as_json or total == 0:
        done = vault.rotate(rt.connect)
    else:
        with Progress(TextColumn("re-encrypting"), BarColumn(), MofNCompleteColumn(), console=err) as bar:
            task = bar.add_task("rotate", total=total)
            done = vault.rotate(rt.connect, lambda n: bar.update(task, completed=n))
    with rt.connect() as conn:
        stale = vault.stale(conn)
    retired = keyring.retire_old_keys() if retire and stale == 0 else 0
    if as_json:
        emit_json({"key_id": keyring.current_id, "reencrypted": done, "stale": stale, "retired_keys": retired})
        return
    out.print(f"re-encrypted {done} secret(s) under key {keyring.current_id}")
    if stale:
        err.print(f"note: {stale} secret(s) were busy and still use an older key; run rotate-key again")
    if retired:
        out.print(f"dropped {retired} older key(s) from {keyring.path}")
