"""Personal data out of the log: subjects instead of addresses, sealed values, erasable keys.

Creates `subject_keys` (one random key per person, deleted by erasure) and a `subject` column
on contacts, suppressions and jobs (see src/mailflow/infra/personal.py). Events stored before
it named people by address; each is rewritten once to schema 2 - the address replaced by the
subject, the address and attributes sealed under the subject's key - and the streams named
after an address (`contact-<email>`, `suppression-<email>`) and the campaign idempotency keys
(`campaign:<id>:<email>`) are renamed after the subject. `log_rewrites` records it, and
`mailflow migrate` drops the Redis copy of the log, which the relay republishes.

Self-contained on purpose, like 0009: what an old migration does must not change with later
code. The subject function is the same as infra/personal.subject_of (a test holds them equal).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets as pysecrets

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mailflow.errors import ConfigurationError
from mailflow.infra.vault import Keyring, Vault

DDL = """
CREATE TABLE subject_keys (
    tenant     text NOT NULL,
    subject    text NOT NULL,
    key        bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, subject)
);
ALTER TABLE subject_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON subject_keys USING (tenant = current_setting('mailflow.tenant', true))
    WITH CHECK (tenant = current_setting('mailflow.tenant', true));

-- Subjects erased on request: no key is made for them again (infra/personal.py).
CREATE TABLE erased_subjects (
    tenant    text NOT NULL,
    subject   text NOT NULL,
    erased_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, subject)
);
ALTER TABLE erased_subjects ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON erased_subjects USING (tenant = current_setting('mailflow.tenant', true))
    WITH CHECK (tenant = current_setting('mailflow.tenant', true));

-- An erased tenant stays (its history adds up) and can never be resumed.
ALTER TABLE tenants DROP CONSTRAINT tenants_status_check;
ALTER TABLE tenants ADD CONSTRAINT tenants_status_check CHECK (status IN ('active', 'suspended', 'erased'));

ALTER TABLE contacts ADD COLUMN subject text;
ALTER TABLE suppressions ADD COLUMN subject text;
ALTER TABLE suppressions DROP CONSTRAINT suppressions_pkey;
ALTER TABLE suppressions ALTER COLUMN email DROP NOT NULL;
ALTER TABLE jobs ADD COLUMN subject text;
ALTER TABLE jobs ALTER COLUMN email DROP NOT NULL;
"""

CONSTRAINTS = """
ALTER TABLE contacts ALTER COLUMN subject SET NOT NULL;
ALTER TABLE contacts ADD CONSTRAINT contacts_tenant_subject_key UNIQUE (tenant, subject);
ALTER TABLE suppressions ALTER COLUMN subject SET NOT NULL;
ALTER TABLE suppressions ADD PRIMARY KEY (tenant, subject);
ALTER TABLE jobs ALTER COLUMN subject SET NOT NULL;
CREATE INDEX jobs_subject ON jobs (tenant, subject);
"""

TYPES = (
    "ContactsImported",
    "ContactStatusChanged",
    "ContactUpdated",
    "ContactReactivated",
    "SuppressionAdded",
    "SuppressionRemoved",
    "JobCreated",
)
OLD_EVENTS = """
SELECT seq, metadata->>'tenant', type, data::text FROM events WHERE type = ANY(%s) AND schema = 1 ORDER BY seq
"""
REWRITE = "UPDATE events SET data = %s::json, schema = 2 WHERE seq = %s"
ADDRESS_STREAMS = "SELECT stream FROM streams WHERE stream ~ '/(contact|suppression)-[^/]*@'"
RENAME_STREAM = "UPDATE streams SET stream = %s WHERE stream = %s"
RENAME_EVENTS_STREAM = "UPDATE events SET stream = %s WHERE stream = %s"
ROWS = {
    "contacts": "SELECT DISTINCT tenant, email FROM contacts",
    "suppressions": "SELECT DISTINCT tenant, email FROM suppressions",
    "jobs": "SELECT DISTINCT tenant, email FROM jobs",
}
SET_SUBJECT = "UPDATE {table} SET subject = %s WHERE tenant = %s AND email = %s"
CAMPAIGN_KEYS = "SELECT id, tenant, email, idempotency_key FROM jobs WHERE idempotency_key LIKE 'campaign:%%'"
SET_KEY = "UPDATE jobs SET idempotency_key = %s WHERE id = %s"
INSERT_KEY = "INSERT INTO subject_keys (tenant, subject, key) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
GET_KEY = "SELECT key FROM subject_keys WHERE tenant = %s AND subject = %s"
# Replies recorded before the worker scrubbed them (commit 410a869) may name the recipient.
JOB_REPLIES = """
SELECT e.seq, j.email, e.data::text FROM events e JOIN jobs j ON j.id = (e.data->>'job_id')::uuid
WHERE e.type IN ('JobCompleted', 'JobFailed', 'JobRetryScheduled') AND strpos(lower(e.data->>'reply'), lower(j.email)) > 0
"""
SCRUB_EVENT = "UPDATE events SET data = %s::json WHERE seq = %s"
LAST_REPLIES = "SELECT id, email, last_reply FROM jobs WHERE strpos(lower(last_reply), lower(email)) > 0"
SET_LAST_REPLY = "UPDATE jobs SET last_reply = %s WHERE id = %s"
RECORD = "INSERT INTO log_rewrites (migration, events) VALUES (%s, %s)"


def subject_of(pepper: bytes, tenant: str, email: str) -> str:
    return hmac.new(pepper, f"{tenant}\n{email.strip().lower()}".encode(), hashlib.sha256).hexdigest()[:32]


class _Sealer:
    def __init__(self, conn, pepper: bytes) -> None:
        self.conn = conn
        self.pepper = pepper
        self.keys: dict[tuple[str, str], bytes] = {}

    def subject(self, tenant: str, email: str) -> str:
        return subject_of(self.pepper, tenant, email)

    def seal(self, tenant: str, subject: str, value: dict) -> str:
        key = self.keys.get((tenant, subject))
        if key is None:
            self.conn.execute(INSERT_KEY, (tenant, subject, pysecrets.token_bytes(32)))
            key = bytes(self.conn.execute(GET_KEY, (tenant, subject)).fetchone()[0])
            self.keys[(tenant, subject)] = key
        nonce = os.urandom(12)
        body = AESGCM(key).encrypt(nonce, orjson.dumps(value), f"{tenant}/{subject}".encode())
        return "s1." + base64.urlsafe_b64encode(nonce + body).decode().rstrip("=")


def campaign_key(key: str, email: str, subject: str) -> str:
    """campaign:<id>:<email>[:resend:<n>] -> the same with the subject."""
    prefix = key.split(":", 2)
    if len(prefix) == 3 and prefix[2].lower().startswith(email.lower()):
        return f"{prefix[0]}:{prefix[1]}:{subject}{prefix[2][len(email) :]}"
    return key


def without_address(text: str, email: str) -> str:
    return re.sub(r"<?" + re.escape(email) + r">?", "<recipient>", text, flags=re.IGNORECASE)


def rewrite(s: _Sealer, tenant: str, etype: str, d: dict) -> dict:
    if etype == "ContactsImported":
        contacts = []
        for c in d["contacts"]:
            subject = s.subject(tenant, c["email"])
            sealed = s.seal(tenant, subject, {"email": c["email"], "attributes": c.get("attributes") or {}})
            contacts.append({"subject": subject, "sealed": sealed, "line": c.get("line")})
        return {**d, "contacts": contacts}
    out = {k: v for k, v in d.items() if k not in ("email", "attributes", "removed", "variables")}
    subject = out["subject"] = s.subject(tenant, d["email"])
    for text in ("reason", "detail"):
        if isinstance(out.get(text), str):
            out[text] = without_address(out[text], d["email"])
    if etype == "ContactUpdated":
        out["sealed"] = s.seal(
            tenant, subject, {"attributes": d.get("attributes") or {}, "removed": d.get("removed") or []}
        )
    elif etype == "SuppressionAdded":
        out["sealed"] = s.seal(tenant, subject, {"email": d["email"]})
    elif etype == "JobCreated":
        out["domain"] = d["email"].rpartition("@")[2]
        out["sealed"] = s.seal(tenant, subject, {"email": d["email"], "variables": d.get("variables") or {}})
        out["idempotency_key"] = campaign_key(d["idempotency_key"], d["email"], subject)
    return out


def apply(conn, keyring: Keyring | None) -> None:
    conn.execute(DDL)
    events = conn.execute(OLD_EVENTS, (list(TYPES),)).fetchall()
    has_rows = any(conn.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0] for t in ROWS)
    if (events or has_rows) and keyring is None:
        raise ConfigurationError("migration 0011 seals personal data under the master key: run `mailflow migrate`")
    scrubbed = 0
    if events or has_rows:
        assert keyring is not None
        sealer = _Sealer(conn, Vault(keyring).setting(conn, "subject-key"))
        for seq, tenant, etype, data in events:
            new = rewrite(sealer, tenant or "default", etype, orjson.loads(data))
            conn.execute(REWRITE, (orjson.dumps(new).decode(), seq))
        for (stream,) in conn.execute(ADDRESS_STREAMS).fetchall():
            tenant, _, name = stream.partition("/")
            kind, _, email = name.partition("-")
            renamed = f"{tenant}/{kind}-{sealer.subject(tenant, email)}"
            conn.execute(RENAME_STREAM, (renamed, stream))
            conn.execute(RENAME_EVENTS_STREAM, (renamed, stream))
        for table, query in ROWS.items():
            for tenant, email in conn.execute(query).fetchall():
                conn.execute(SET_SUBJECT.format(table=table), (sealer.subject(tenant, email), tenant, email))
        for seq, email, data in conn.execute(JOB_REPLIES).fetchall():
            d = orjson.loads(data)
            d["reply"] = without_address(d["reply"], email)
            conn.execute(SCRUB_EVENT, (orjson.dumps(d).decode(), seq))
            scrubbed += 1
        for job_id, email, reply in conn.execute(LAST_REPLIES).fetchall():
            conn.execute(SET_LAST_REPLY, (without_address(reply, email), job_id))
        for job_id, tenant, email, key in conn.execute(CAMPAIGN_KEYS).fetchall():
            conn.execute(SET_KEY, (campaign_key(key, email, sealer.subject(tenant, email)), job_id))
    conn.execute(CONSTRAINTS)
    conn.execute(RECORD, ("0011_personal_data_out_of_the_log.py", len(events) + scrubbed))
