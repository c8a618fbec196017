-- The HTTP API's auth service (src/mailflow/tenants/keys.py) and its idempotency keys
-- (src/mailflow/api/idempotency.py).
--
-- api_keys is the `api_keys` inline projection of ApiKeyCreated / ApiKeyRevoked: what a key
-- may do, never what it is. The key's hash lives in api_key_hashes, written beside the
-- ApiKeyCreated event in the same transaction and never in the log (a key hash is a secret:
-- docs/privacy.md); a projection rebuild keeps it. last_used_at is not from the log either:
-- it is written at most once a minute per key by the API process.
--
-- api_idempotency remembers, per tenant and Idempotency-Key, the first response to a POST
-- that created something, so that a repeat returns it instead of acting twice.

CREATE TABLE api_keys (
    tenant       text NOT NULL,
    id           text NOT NULL,               -- the public part of the key: mf_live_<id>_<secret>
    name         text NOT NULL,
    scopes       text[] NOT NULL,
    networks     cidr[] NOT NULL DEFAULT '{}',  -- allowed source networks; empty: anywhere
    expires_at   timestamptz,
    created_at   timestamptz NOT NULL,
    created_by   text,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    PRIMARY KEY (tenant, id)
);
CREATE UNIQUE INDEX api_keys_id ON api_keys (id);

CREATE TABLE api_key_hashes (
    tenant text NOT NULL,
    id     text NOT NULL,
    hash   bytea NOT NULL,                    -- SHA-256 of the whole key
    PRIMARY KEY (tenant, id)
);
CREATE UNIQUE INDEX api_key_hashes_id ON api_key_hashes (id);

CREATE TABLE api_idempotency (
    tenant      text NOT NULL,
    key         text NOT NULL,                -- the client's Idempotency-Key
    method      text NOT NULL,
    path        text NOT NULL,
    body_hash   bytea NOT NULL,               -- SHA-256 of the request body
    status      integer,                      -- NULL while the first request is running
    response    bytea,
    headers     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, key)
);
CREATE INDEX api_idempotency_created ON api_idempotency (created_at);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['api_keys', 'api_key_hashes', 'api_idempotency'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;

-- The API's keyset pages: jobs newest first (GET /jobs), a campaign's recipients in id order
-- (GET /campaigns/{id}/recipients), suppressions newest first (GET /suppressions).
CREATE INDEX jobs_created ON jobs (tenant, created_at DESC, id DESC);
CREATE INDEX jobs_campaign_id ON jobs (campaign_id, id);
CREATE INDEX suppressions_created ON suppressions (tenant, created_at DESC, subject DESC);
