-- Hours aggregated while they are still filling (src/mailflow/projectors/analytics.py).
--
-- The aggregation now also rolls up the current hour so far, every 5 minutes, so a busy hour is
-- not read from its raw facts by every dashboard read. Such an hour stays in facts_dirty with
-- `upto`: its roll-ups hold exactly its facts at log positions <= upto, and readers add the raw
-- facts after upto. The facts consumer applies the log in order, so a new fact of the hour is
-- always after upto; one that is not (a replayed dead letter: its position is below `high`, the
-- highest marked for the hour) or a rewind of the facts clears upto and counts a reset, and the
-- hour is read from its raw facts again until it is aggregated anew. An aggregation sets upto
-- only if no reset came after the snapshot it read the facts in.
ALTER TABLE facts_dirty
    ADD COLUMN upto bigint,                      -- NULL: the hour's roll-ups are not to be read
    ADD COLUMN high bigint,                      -- the highest position marked for the hour
    ADD COLUMN resets bigint NOT NULL DEFAULT 0; -- rewinds and out-of-order facts so far

-- The largest position among the row's facts (the aggregation's watermark for its hour).
ALTER TABLE facts_hourly ADD COLUMN upto bigint;

UPDATE periodic SET every = interval '5 minutes', delay = interval '0'
WHERE name = 'aggregate' AND every = interval '1 hour';
