-- The event store: streams with optimistic concurrency, events, and dense global positions.
--
-- Writers insert into `events` without a global lock; each row carries the id of the
-- transaction that wrote it (txid). One sequencer at a time (advisory lock) assigns dense
-- positions in (txid, seq) order to events whose transaction lies below the visibility
-- horizon pg_snapshot_xmin(pg_current_snapshot()): everything below it has committed or
-- aborted, so nothing can later appear with a smaller position (invariant 2).

CREATE TABLE streams (
    stream  text PRIMARY KEY,
    version bigint NOT NULL CHECK (version >= 0)
);

CREATE TABLE events (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    id          uuid NOT NULL,
    stream      text NOT NULL,
    version     bigint NOT NULL CHECK (version >= 1),
    type        text NOT NULL,
    schema      integer NOT NULL CHECK (schema >= 1),
    -- json, not jsonb: kept byte for byte as written, and cheaper to insert. Projections
    -- read events in Python; nothing queries inside them on the hot path.
    data        json NOT NULL,
    metadata    json NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_id_key UNIQUE (id),
    CONSTRAINT events_stream_version_key UNIQUE (stream, version)
);

CREATE INDEX events_txid_seq ON events (txid, seq);

-- Dense global order, written only by the sequencer.
CREATE TABLE event_positions (
    position bigint PRIMARY KEY,
    seq      bigint NOT NULL CONSTRAINT event_positions_seq_key UNIQUE
);

-- The sequencer's cursor: the last position given and the (txid, seq) it was given to.
CREATE TABLE event_sequencer (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_position bigint NOT NULL,
    cursor_txid   xid8 NOT NULL,
    cursor_seq    bigint NOT NULL
);
INSERT INTO event_sequencer VALUES (true, 0, '0'::xid8, 0);
-- Without statistics the planner guesses ~1,500 rows here and overestimates every
-- sequencer statement; give it the truth now rather than when autovacuum gets round to it.
ANALYZE event_sequencer;
