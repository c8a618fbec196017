"""The one edit of stored events (with the tenant stamp of 0007): secrets out of the log.

Before migration 0008, SenderSaved carried the relay URL with its password and the whole
DKIM private key. Each such secret moves into the secrets table (encrypted under the master
key), the event is rewritten to schema 2 (a reference and a fingerprint in their place), the
senders table follows, and the rewrite is recorded in log_rewrites. `mailflow migrate` then
drops the Redis copy of the log, which the relay republishes from the rewritten events.
"""

from __future__ import annotations

import base64

import orjson
from cryptography.hazmat.primitives import serialization

from mailflow.config import split_password
from mailflow.errors import ConfigurationError
from mailflow.infra.vault import Keyring, Vault, dkim_fingerprint

SENDER_EVENTS = """
SELECT seq, metadata->>'tenant', data::text FROM events
WHERE type = 'SenderSaved' AND schema = 1
ORDER BY seq
"""
REWRITE = "UPDATE events SET data = %s::json, schema = 2 WHERE seq = %s"
SENDER_ROWS = "SELECT tenant, name FROM senders"
UPDATE_SENDER = """
UPDATE senders SET relay_url = %(relay_url)s, relay_secret = %(relay_secret)s, dkim_secret = %(dkim_secret)s,
       dkim_public_key = %(dkim_public_key)s, dkim_key_pem = NULL
WHERE tenant = %(tenant)s AND name = %(name)s
"""
# Secrets of earlier versions of a sender, or of deleted senders, are not kept.
DROP_UNUSED = """
DELETE FROM secrets s WHERE s.owner LIKE 'sender:%' AND NOT EXISTS (
    SELECT 1 FROM senders d WHERE s.id IN (d.relay_secret, d.dkim_secret))
"""
RECORD = "INSERT INTO log_rewrites (migration, events) VALUES (%s, %s)"


def seal_sender_secrets(conn, vault: Vault, tenant: str, data: dict) -> dict:
    """Schema-1 SenderSaved data -> schema 2, its secrets put in the vault. Self-contained on
    purpose (no outbound import): what an old migration does must not change with later code."""
    sealed = {k: v for k, v in data.items() if k != "dkim_key_pem"}
    relay_url, password = split_password(data["relay_url"])
    sealed.update(relay_url=relay_url, relay_password=None, dkim_key=None, dkim_public_key=None)
    owner = f"sender:{data['name']}"
    if password:
        ref = vault.put(conn, tenant=tenant, kind="relay_password", owner=owner, plaintext=password)
        sealed["relay_password"] = ref.to_dict()
    pem = data.get("dkim_key_pem")
    if pem:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ref = vault.put(conn, tenant=tenant, kind="dkim_key", owner=owner, plaintext=pem)
        sealed["dkim_key"] = {"id": ref.id, "fingerprint": dkim_fingerprint(public)}
        sealed["dkim_public_key"] = base64.b64encode(public).decode()
    return sealed


def apply(conn, keyring: Keyring | None) -> None:
    rows = conn.execute(SENDER_EVENTS).fetchall()
    if rows and keyring is None:
        raise ConfigurationError("migration 0009 moves secrets into the encrypted table: run `mailflow migrate`")
    vault = Vault(keyring) if keyring is not None else None
    latest: dict[tuple[str, str], dict] = {}
    for seq, tenant, data in rows:
        tenant = tenant or "default"
        assert vault is not None
        sealed = seal_sender_secrets(conn, vault, tenant, orjson.loads(data))
        conn.execute(REWRITE, (orjson.dumps(sealed).decode(), seq))
        latest[(tenant, sealed["name"])] = sealed
    for (tenant, name), d in latest.items():
        conn.execute(
            UPDATE_SENDER,
            {
                "tenant": tenant,
                "name": name,
                "relay_url": d["relay_url"],
                "relay_secret": (d.get("relay_password") or {}).get("id"),
                "dkim_secret": (d.get("dkim_key") or {}).get("id"),
                "dkim_public_key": d.get("dkim_public_key"),
            },
        )
    conn.execute(DROP_UNUSED)
    conn.execute("ALTER TABLE senders DROP COLUMN dkim_key_pem")
    conn.execute(RECORD, ("0009_secrets_out_of_the_log.py", len(rows)))
