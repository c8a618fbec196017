-- Jobs remember the correlation id of the command that created them (a campaign's start,
-- a `send`), so every later event of the job (queued, started, finished) carries it too.
-- Jobs created before this migration fall back to their campaign, else their own id.
ALTER TABLE jobs ADD COLUMN correlation_id text;
