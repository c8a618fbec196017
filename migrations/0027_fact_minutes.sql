-- Per-minute counts of the last day's facts, kept by the facts projection as it writes them
-- (src/mailflow/projectors/facts.py): the dashboard's last-60-minutes chart reads 60 rows a kind
-- instead of counting a busy hour's raw facts on every snapshot. A rewind takes its facts out
-- again; minutes older than a day are deleted by the cleanup duty (analytics.maintain) and are
-- not counted when their facts come later (a rebuild), so a row is exact while it is kept.
CREATE TABLE facts_minutes (
    tenant   text NOT NULL,
    minute   timestamptz NOT NULL,
    kind     text NOT NULL,
    n        bigint NOT NULL,     -- every fact
    n_human  bigint NOT NULL,     -- not flagged as machine
    n_unique bigint NOT NULL,     -- the human firsts
    PRIMARY KEY (tenant, minute, kind)
);
ALTER TABLE facts_minutes ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON facts_minutes USING (tenant = current_setting('mailflow.tenant', true))
    WITH CHECK (tenant = current_setting('mailflow.tenant', true));
