-- Tenants: every row and every event belongs to one (see docs/privacy.md and
-- src/mailflow/infra/tenancy.py).
--
-- mailflow's connections never run as the table owner: a tenant's connections take the role
-- mailflow_tenant and set mailflow.tenant; row-level security then shows and accepts only
-- that tenant's rows, and a connection with no tenant set sees none. Processes that work for
-- every tenant (relay, consumers, queuer, workers, rebuilds) take mailflow_operator, which
-- bypasses row-level security: the explicit cross-tenant role.

CREATE TABLE tenants (
    id           text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9-]{0,39}$'),
    name         text NOT NULL,
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    hourly_limit integer CHECK (hourly_limit > 0),
    daily_limit  integer CHECK (daily_limit > 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tenants (id, name) VALUES ('default', 'default');

-- The one edit the log ever gets, with the secrets rewrite of 0008: events stored before
-- tenants existed are stamped with the default tenant (metadata.tenant) and their streams
-- are named under it (default/job-<id>), so that no event is left without an owner.
UPDATE streams s SET stream = coalesce(
    (SELECT e.metadata->>'tenant' FROM events e WHERE e.stream = s.stream LIMIT 1), 'default') || '/' || s.stream;
UPDATE events SET stream = coalesce(metadata->>'tenant', 'default') || '/' || stream,
                  metadata = (metadata::jsonb || jsonb_build_object('tenant', coalesce(metadata->>'tenant', 'default')))::json;

-- Read off the envelope, never written by hand: the append paths stay as they were.
ALTER TABLE events ADD COLUMN tenant text GENERATED ALWAYS AS (metadata->>'tenant') STORED;

ALTER TABLE contacts ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE contacts DROP CONSTRAINT contacts_email_key;
ALTER TABLE contacts ADD CONSTRAINT contacts_tenant_email_key UNIQUE (tenant, email);

ALTER TABLE suppressions ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE suppressions DROP CONSTRAINT suppressions_pkey;
ALTER TABLE suppressions ADD PRIMARY KEY (tenant, email);

ALTER TABLE segments ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE segments DROP CONSTRAINT segments_pkey;
ALTER TABLE segments ADD PRIMARY KEY (tenant, name);

ALTER TABLE templates ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE templates DROP CONSTRAINT templates_pkey;
ALTER TABLE templates ADD PRIMARY KEY (tenant, name);

ALTER TABLE senders ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE senders DROP CONSTRAINT senders_pkey;
ALTER TABLE senders ADD PRIMARY KEY (tenant, name);

ALTER TABLE campaigns ADD COLUMN tenant text NOT NULL DEFAULT 'default';
CREATE INDEX campaigns_tenant_name ON campaigns (tenant, name);

ALTER TABLE jobs ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE jobs DROP CONSTRAINT jobs_idempotency_key;
ALTER TABLE jobs ADD CONSTRAINT jobs_tenant_idempotency_key UNIQUE (tenant, idempotency_key);

ALTER TABLE event_counts ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE event_counts DROP CONSTRAINT event_counts_pkey;
ALTER TABLE event_counts ADD PRIMARY KEY (tenant, type, hour);

-- No defaults from here on: a write that does not say whose row it is fails.
ALTER TABLE contacts ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE suppressions ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE segments ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE templates ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE senders ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE campaigns ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE jobs ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE event_counts ALTER COLUMN tenant DROP DEFAULT;

-- The two roles (cluster-wide, so created once per cluster; parallel migrations may race).
DO $$
BEGIN
    CREATE ROLE mailflow_tenant NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
DO $$
BEGIN
    CREATE ROLE mailflow_operator NOLOGIN BYPASSRLS;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
DO $$
BEGIN
    EXECUTE format('GRANT mailflow_tenant, mailflow_operator TO %I', current_user);
EXCEPTION WHEN OTHERS THEN NULL;  -- a superuser needs no membership; a concurrent grant is the same grant
END $$;

DO $$
DECLARE
    s text := quote_ident(current_schema());
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %s TO mailflow_tenant, mailflow_operator', s);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %s TO mailflow_tenant', s);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA %s TO mailflow_operator', s);
    EXECUTE format('GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA %s TO mailflow_tenant, mailflow_operator', s);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %s GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO mailflow_tenant', s);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %s GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON TABLES TO mailflow_operator', s);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %s GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO mailflow_tenant, mailflow_operator', s);
END $$;

-- Row-level security: a tenant's connection sees and writes only its own rows.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['contacts', 'suppressions', 'segments', 'templates', 'senders', 'campaigns', 'jobs',
                             'event_counts', 'events']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;
-- Stream names are a tenant's too (acme/contact-...): a tenant sees and bumps only its own.
ALTER TABLE streams ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON streams
    USING (starts_with(stream, current_setting('mailflow.tenant', true) || '/'))
    WITH CHECK (starts_with(stream, current_setting('mailflow.tenant', true) || '/'));
ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON tenants USING (id = current_setting('mailflow.tenant', true));
-- Operator-only: a tenant's connection sees none of these (row-level security, no policy).
ALTER TABLE dead_letters ENABLE ROW LEVEL SECURITY;
ALTER TABLE consumer_failures ENABLE ROW LEVEL SECURITY;
