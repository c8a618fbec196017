-- Secrets: kept out of the log, encrypted at rest (src/mailflow/infra/vault.py).
-- Events carry a reference (the id) and a fingerprint; the plaintext never leaves this table
-- except in the memory of the process that uses it.

CREATE TABLE secrets (
    id          uuid PRIMARY KEY,
    tenant      text NOT NULL,
    kind        text NOT NULL,   -- relay_password, dkim_key, ...
    owner       text NOT NULL,   -- what uses it: sender:<name>, ...
    ciphertext  bytea NOT NULL,  -- Fernet token under the master key key_id
    key_id      text NOT NULL,
    fingerprint text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    rotated_at  timestamptz
);
CREATE INDEX secrets_owner ON secrets (tenant, owner);
CREATE INDEX secrets_key ON secrets (key_id);
ALTER TABLE secrets ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON secrets USING (tenant = current_setting('mailflow.tenant', true))
    WITH CHECK (tenant = current_setting('mailflow.tenant', true));

-- Installation-wide secrets (the fingerprint key), encrypted the same way.
CREATE TABLE secret_settings (
    name       text PRIMARY KEY,
    ciphertext bytea NOT NULL,
    key_id     text NOT NULL
);

-- Senders keep references, never the secrets: the relay URL without its password, and the
-- DKIM public key (public by nature) for `senders dkim-record`.
ALTER TABLE senders ADD COLUMN relay_secret uuid;
ALTER TABLE senders ADD COLUMN dkim_secret uuid;
ALTER TABLE senders ADD COLUMN dkim_public_key text;

-- Which migrations rewrote stored events (the log's only edits), for operators and the relay.
CREATE TABLE log_rewrites (
    migration   text PRIMARY KEY,
    events      bigint NOT NULL,
    rewritten_at timestamptz NOT NULL DEFAULT now()
);
