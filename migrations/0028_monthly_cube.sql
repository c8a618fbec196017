-- The narrow roll-up per month (src/mailflow/projectors/analytics.py): a breakdown over 90 days
-- (the dashboard's, per recipient domain) reads the whole months inside its range from here and
-- only the days at its edges from facts_daily_cube, a third of the rows. Kept like facts_monthly:
-- a day's aggregation takes the day's old rows out of its month and adds its new ones.
CREATE TABLE facts_monthly_cube (LIKE facts_hourly_cube INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE facts_monthly_cube RENAME COLUMN hour TO month;
ALTER TABLE facts_monthly_cube ADD PRIMARY KEY (tenant, dim, month, key, kind);
ALTER TABLE facts_monthly_cube ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON facts_monthly_cube USING (tenant = current_setting('mailflow.tenant', true))
    WITH CHECK (tenant = current_setting('mailflow.tenant', true));

INSERT INTO facts_monthly_cube (month, tenant, dim, key, kind, n, n_human, n_unique, latency_ms_sum, latency_n,
                                size_sum)
SELECT date_trunc('month', day, 'UTC'), tenant, dim, key, kind, sum(n), sum(n_human), sum(n_unique),
       sum(latency_ms_sum), sum(latency_n), sum(size_sum)
FROM facts_daily_cube
GROUP BY 1, tenant, dim, key, kind;
