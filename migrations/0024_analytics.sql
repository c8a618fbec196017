-- Analytics (src/mailflow/projectors/facts.py and analytics.py) and jobs that are not emails
-- (src/mailflow/outbound/periodic.py, src/mailflow/runtime/duties.py).
--
-- facts is the `facts` consumer projection: one narrow row per delivery-relevant event.
-- It is time-partitioned on `at`: a TimescaleDB hypertable (one chunk a day) when the
-- extension can be created, native range partitions by day otherwise (facts_YYYYMMDD,
-- created ahead of time and dropped by retention: analytics.ensure_partitions). The same
-- queries run on both.
--
-- facts_hourly / facts_daily / facts_monthly are the OLAP tables, written only by the
-- aggregation (an `aggregate` job): an hour's rows are replaced as a whole, so re-running an
-- hour gives the same rows. A fact that arrives for an hour already aggregated marks the hour
-- in facts_dirty (same transaction as the fact); readers take a dirty hour from the raw facts.

-- Jobs that are not emails: same table, states, leases, retries and SLA reporting.
ALTER TABLE jobs ADD COLUMN kind text NOT NULL DEFAULT 'send';
ALTER TABLE jobs ADD COLUMN args jsonb NOT NULL DEFAULT '{}';

-- Periodic duties: when each is next due is kept here, never in a process's memory. The
-- queuer's leader turns a due row into a job (idempotency key periodic:<name>:<due>) and moves
-- next_due past now in the same transaction.
CREATE TABLE periodic (
    name       text PRIMARY KEY,
    kind       text NOT NULL,
    priority   text NOT NULL DEFAULT 'low' CHECK (priority IN ('high', 'normal', 'low')),
    every      interval NOT NULL CHECK (every >= interval '1 minute'),
    delay      interval NOT NULL DEFAULT '0',  -- after the start of each period (the hour's last facts)
    args       jsonb NOT NULL DEFAULT '{}',
    enabled    boolean NOT NULL DEFAULT true,
    next_due   timestamptz NOT NULL,
    last_job   uuid,
    last_due   timestamptz
);
INSERT INTO periodic (name, kind, every, delay, next_due) VALUES
    ('aggregate', 'aggregate', interval '1 hour', interval '2 minutes', now()),
    ('cleanup', 'cleanup', interval '1 hour', interval '20 minutes', now()),
    ('dns_check', 'dns_check', interval '10 minutes', interval '0', now());

-- One row per send job, from JobCreated: what a later event of the job is counted under.
CREATE TABLE fact_jobs (
    job_id         uuid PRIMARY KEY,
    tenant         text NOT NULL,
    campaign       text NOT NULL DEFAULT '',   -- campaign id, '' for a transactional message
    sender         text NOT NULL,
    sending_domain text NOT NULL DEFAULT '',
    domain         text NOT NULL,              -- the recipient's domain
    priority       text NOT NULL,
    created_at     timestamptz NOT NULL,
    position       bigint NOT NULL           -- of its JobCreated (a rewind forgets it)
);
CREATE INDEX fact_jobs_created ON fact_jobs (created_at);

DO $$
DECLARE
    timescale boolean := false;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
            timescale := true;
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'timescaledb is available but could not be created (%): native partitions', SQLERRM;
        END;
    END IF;
    EXECUTE format($f$
        CREATE TABLE facts (
            at             timestamptz NOT NULL,
            position       bigint NOT NULL,        -- the event's log position
            tenant         text NOT NULL,
            campaign       text NOT NULL DEFAULT '',
            sender         text NOT NULL DEFAULT '',
            sending_domain text NOT NULL DEFAULT '',
            domain         text NOT NULL DEFAULT '',
            priority       text NOT NULL DEFAULT '',
            kind           text NOT NULL,
            job_id         uuid,
            link           integer,                -- clicks: the link's index in the message
            human          boolean NOT NULL DEFAULT true,   -- false: a flagged machine open or click
            first          boolean NOT NULL DEFAULT true,   -- the first of its kind for its message
            latency_ms     integer,                -- pending -> accepted, for `delivered`
            size_bytes     integer
        ) %s$f$, CASE WHEN timescale THEN '' ELSE 'PARTITION BY RANGE (at)' END);
    IF timescale THEN
        PERFORM create_hypertable('facts', 'at', chunk_time_interval => interval '1 day');
    END IF;
END $$;
CREATE UNIQUE INDEX facts_position ON facts (position, at);
CREATE INDEX facts_tenant_at ON facts (tenant, at);
CREATE INDEX facts_at ON facts USING brin (at) WITH (pages_per_range = 16);

-- The first of a kind per message (and link), for the kinds a message can have many of.
CREATE TABLE fact_firsts (
    job_id uuid NOT NULL,
    kind   text NOT NULL,
    link   integer NOT NULL DEFAULT -1,
    at     timestamptz NOT NULL,
    PRIMARY KEY (job_id, kind, link)
);
CREATE INDEX fact_firsts_at ON fact_firsts (at);

CREATE TABLE facts_dirty (
    hour      timestamptz PRIMARY KEY,
    version   bigint NOT NULL DEFAULT 1,
    marked_at timestamptz NOT NULL DEFAULT now()
);

-- Measures of one (bucket, tenant, campaign, sender, recipient domain, kind):
-- n every fact, n_human those not flagged as machine, n_unique the human firsts,
-- latency_ms_sum / latency_n / latency_ms_max for `delivered`, size_sum.
CREATE TABLE facts_hourly (
    hour           timestamptz NOT NULL,
    tenant         text NOT NULL,
    campaign       text NOT NULL,
    sender         text NOT NULL,
    domain         text NOT NULL,
    kind           text NOT NULL,
    n              bigint NOT NULL,
    n_human        bigint NOT NULL,
    n_unique       bigint NOT NULL,
    latency_ms_sum bigint NOT NULL DEFAULT 0,
    latency_n      bigint NOT NULL DEFAULT 0,
    latency_ms_max integer,
    size_sum       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, tenant, campaign, sender, domain, kind)
);
CREATE INDEX facts_hourly_tenant ON facts_hourly (tenant, hour);
CREATE TABLE facts_daily (LIKE facts_hourly INCLUDING DEFAULTS);
ALTER TABLE facts_daily RENAME COLUMN hour TO day;
ALTER TABLE facts_daily ADD PRIMARY KEY (day, tenant, campaign, sender, domain, kind);
CREATE INDEX facts_daily_tenant ON facts_daily (tenant, day);
CREATE TABLE facts_monthly (LIKE facts_hourly INCLUDING DEFAULTS);
ALTER TABLE facts_monthly RENAME COLUMN hour TO month;
ALTER TABLE facts_monthly ADD PRIMARY KEY (month, tenant, campaign, sender, domain, kind);

-- The narrow roll-ups the dashboard and `mailflow stats` read (a fine table scans every
-- campaign x sender x domain x kind): per bucket, tenant, ONE dimension and kind. dim is 'all'
-- (key '') or 'campaign', 'sender', 'domain' (key: its value). Made from facts_hourly by the
-- same aggregation transaction.
CREATE TABLE facts_hourly_cube (
    hour           timestamptz NOT NULL,
    tenant         text NOT NULL,
    dim            text NOT NULL CHECK (dim IN ('all', 'campaign', 'sender', 'domain')),
    key            text NOT NULL,
    kind           text NOT NULL,
    n              bigint NOT NULL,
    n_human        bigint NOT NULL,
    n_unique       bigint NOT NULL,
    latency_ms_sum bigint NOT NULL DEFAULT 0,
    latency_n      bigint NOT NULL DEFAULT 0,
    size_sum       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, dim, hour, key, kind)
);
CREATE INDEX facts_hourly_cube_hour ON facts_hourly_cube (hour);
CREATE TABLE facts_daily_cube (LIKE facts_hourly_cube INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE facts_daily_cube RENAME COLUMN hour TO day;
ALTER TABLE facts_daily_cube ADD PRIMARY KEY (tenant, dim, day, key, kind);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['fact_jobs', 'facts', 'facts_hourly', 'facts_daily', 'facts_monthly',
                             'facts_hourly_cube', 'facts_daily_cube'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;
-- Operator-only (row-level security, no policy): a tenant's connection sees none of these.
ALTER TABLE periodic ENABLE ROW LEVEL SECURITY;
ALTER TABLE fact_firsts ENABLE ROW LEVEL SECURITY;
-- Which hours are dirty is no tenant's secret, and every reader needs it (analytics.series).
ALTER TABLE facts_dirty ENABLE ROW LEVEL SECURITY;
CREATE POLICY readable ON facts_dirty FOR SELECT USING (true);

-- Partitions are made and dropped by mailflow's operator connections, which do not own the
-- table: these two functions do it as the owner (no-ops on a hypertable, whose chunks
-- TimescaleDB makes itself; retention drops them with drop_chunks).
CREATE FUNCTION mailflow_facts_partition(day date) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    name text := 'facts_' || to_char(day, 'YYYYMMDD');
BEGIN
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = 'facts'::regclass) <> 'p' THEN
        RETURN false;
    END IF;
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF facts FOR VALUES FROM (%L) TO (%L)',
                   name, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
    RETURN true;
EXCEPTION WHEN duplicate_table THEN
    RETURN false;  -- made at the same moment by another process
END $$;

CREATE FUNCTION mailflow_facts_drop_before(cutoff date) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = 'facts'::regclass) <> 'p' THEN
        EXECUTE format('SELECT count(*) FROM drop_chunks(%L, older_than => %L::timestamptz)',
                       'facts', cutoff::timestamp AT TIME ZONE 'UTC') INTO dropped;
        RETURN dropped;
    END IF;
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'facts'::regclass AND c.relname ~ '^facts_[0-9]{8}$'
          AND to_date(substr(c.relname, 7), 'YYYYMMDD') < cutoff
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END $$;
GRANT EXECUTE ON FUNCTION mailflow_facts_partition(date), mailflow_facts_drop_before(date) TO mailflow_operator;
