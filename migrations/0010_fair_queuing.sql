-- Fair queuing between tenants: the queuer takes each tenant's due jobs by this index, and
-- counts the messages each tenant released per UTC hour (for its hourly and daily limits).

CREATE INDEX jobs_due_by_tenant ON jobs (tenant, priority, due_at) WHERE state IN ('pending', 'retry');

-- Kept by the jobs inline projection (one row per tenant and hour, from JobQueued events).
CREATE TABLE tenant_usage (
    tenant   text NOT NULL,
    hour     timestamptz NOT NULL,
    messages bigint NOT NULL CHECK (messages >= 0),
    PRIMARY KEY (tenant, hour)
);
ALTER TABLE tenant_usage ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON tenant_usage USING (tenant = current_setting('mailflow.tenant', true))
    WITH CHECK (tenant = current_setting('mailflow.tenant', true));
