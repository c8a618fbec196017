"""Events room: every SQL statement the event store and relay run, by name."""

from mailflow.infra.locks import Lock

# -- append -----------------------------------------------------------------------------
# One statement per append: bump the stream version (the optimistic-concurrency check)
# and insert the events with unnest(). Three variants of the version bump, one per kind
# of expected_version. The NOTIFY is sent after commit by events.notify.Notifier.

_APPEND_EVENTS = """
INSERT INTO events (id, stream, version, type, schema, data, metadata)
SELECT u.id, %(stream)s, s.version - %(count)s + u.ord, u.type, u.schema, u.data, u.metadata
FROM s,
     unnest(%(ids)b::uuid[], %(types)b::text[], %(schemas)b::int[],
            %(datas)b::text[]::json[], %(metas)b::text[]::json[])
       WITH ORDINALITY AS u(id, type, schema, data, metadata, ord)
RETURNING version, recorded_at
"""

APPEND_ANY = (
    """
WITH s AS (
    INSERT INTO streams AS st (stream, version) VALUES (%(stream)s, %(count)s)
    ON CONFLICT (stream) DO UPDATE SET version = st.version + %(count)s
    RETURNING st.version
)"""
    + _APPEND_EVENTS
)

APPEND_NO_STREAM = (
    """
WITH s AS (
    INSERT INTO streams (stream, version) VALUES (%(stream)s, %(count)s)
    ON CONFLICT (stream) DO NOTHING
    RETURNING version
)"""
    + _APPEND_EVENTS
)

APPEND_EXPECTED = (
    """
WITH s AS (
    UPDATE streams SET version = version + %(count)s
    WHERE stream = %(stream)s AND version = %(expected)s
    RETURNING version
)"""
    + _APPEND_EVENTS
)

# Large appends: bump the stream version first, then COPY the rows (much less work per row
# for client and server than INSERT ... SELECT unnest). Same three kinds of expectation.
BUMP_ANY = """
INSERT INTO streams AS st (stream, version) VALUES (%(stream)s, %(count)s)
ON CONFLICT (stream) DO UPDATE SET version = st.version + %(count)s
RETURNING version, now()
"""
BUMP_NO_STREAM = """
INSERT INTO streams (stream, version) VALUES (%(stream)s, %(count)s)
ON CONFLICT (stream) DO NOTHING
RETURNING version, now()
"""
BUMP_EXPECTED = """
UPDATE streams SET version = version + %(count)s
WHERE stream = %(stream)s AND version = %(expected)s
RETURNING version, now()
"""
COPY_EVENTS = "COPY events (id, stream, version, type, schema, data, metadata) FROM STDIN (FORMAT BINARY)"
# data and metadata are already JSON text; json_recv reads text bytes, so send them as text.
COPY_TYPES = ["uuid", "text", "int8", "text", "int4", "text", "text"]

# Many streams in one statement (expected version ANY): bump each stream once, in stream
# order so that concurrent batches lock stream rows in the same order, then insert.
APPEND_MANY = """
WITH u AS (
    SELECT * FROM unnest(%(streams)b::text[], %(ids)b::uuid[], %(types)b::text[], %(schemas)b::int[],
                         %(datas)b::text[]::json[], %(metas)b::text[]::json[])
        WITH ORDINALITY AS u(stream, id, type, schema, data, metadata, ord)
), c AS (
    SELECT stream, count(*) AS n FROM u GROUP BY stream
), s AS (
    INSERT INTO streams AS st (stream, version)
    SELECT stream, n FROM c ORDER BY stream
    ON CONFLICT (stream) DO UPDATE SET version = st.version + excluded.version
    RETURNING st.stream, st.version
)
INSERT INTO events (id, stream, version, type, schema, data, metadata)
SELECT u.id, u.stream,
       s.version - c.n + row_number() OVER (PARTITION BY u.stream ORDER BY u.ord),
       u.type, u.schema, u.data, u.metadata
FROM u JOIN s USING (stream) JOIN c USING (stream)
ORDER BY u.ord
RETURNING id, version, recorded_at
"""

STREAM_VERSION = "SELECT version FROM streams WHERE stream = %s"

EVENTS_BY_ID = """
SELECT e.id, p.position, e.stream, e.version, e.type, e.schema, e.data, e.metadata, e.recorded_at
FROM events e LEFT JOIN event_positions p ON p.seq = e.seq
WHERE e.id = ANY(%s::uuid[])
ORDER BY e.stream, e.version
"""

# -- reads ------------------------------------------------------------------------------

READ_STREAM = """
SELECT e.id, p.position, e.stream, e.version, e.type, e.schema, e.data, e.metadata, e.recorded_at
FROM events e LEFT JOIN event_positions p ON p.seq = e.seq
WHERE e.stream = %(stream)s AND e.version > %(after)s
ORDER BY e.version
LIMIT %(limit)s
"""

READ_ALL = """
SELECT e.id, p.position, e.stream, e.version, e.type, e.schema, e.data, e.metadata, e.recorded_at
FROM event_positions p JOIN events e ON e.seq = p.seq
WHERE p.position > %(after)s AND p.position <= %(upto)s
ORDER BY p.position
LIMIT %(limit)s
"""

READ_ALL_FILTERED = """
SELECT e.id, p.position, e.stream, e.version, e.type, e.schema, e.data, e.metadata, e.recorded_at
FROM event_positions p JOIN events e ON e.seq = p.seq
WHERE p.position > %(after)s AND p.position <= %(upto)s
  AND (%(types)s::text[] IS NULL OR e.type = ANY(%(types)s::text[]))
  AND (%(stream)s::text IS NULL OR e.stream = %(stream)s::text)
ORDER BY p.position
LIMIT %(limit)s
"""

# The last `limit` events that match, by position, returned oldest first (`events tail`
# without --from: the last N matching events, not the matching ones among the last N).
READ_LAST_FILTERED = """
SELECT * FROM (
    SELECT e.id, p.position, e.stream, e.version, e.type, e.schema, e.data, e.metadata, e.recorded_at
    FROM event_positions p JOIN events e ON e.seq = p.seq
    WHERE (%(types)s::text[] IS NULL OR e.type = ANY(%(types)s::text[]))
      AND (%(stream)s::text IS NULL OR e.stream = %(stream)s::text)
    ORDER BY p.position DESC
    LIMIT %(limit)s
) last
ORDER BY position
"""

# A wake-up signal, not data: committing it asynchronously keeps NOTIFY's global
# commit-order lock from being held across a WAL flush.
NOTIFY = "SELECT set_config('synchronous_commit', 'off', true), pg_notify(%s, '')"

HEAD_POSITION = "SELECT last_position FROM event_sequencer"

# LATERAL ... LIMIT 1 walks the (txid, seq) index from the cursor; a plain join would not.
UNSEQUENCED_EXIST = """
SELECT EXISTS (
    SELECT 1 FROM event_sequencer s, LATERAL (
        SELECT 1 FROM events e
        WHERE (e.txid, e.seq) > (s.cursor_txid, s.cursor_seq)
          AND (%(below)s::xid8 IS NULL OR e.txid < %(below)s::xid8)
        ORDER BY e.txid, e.seq
        LIMIT 1
    ) pending
)
"""

# Transactions that started after this point have ids >= it.
SNAPSHOT_XMAX = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text"

# -- the sequencer ----------------------------------------------------------------------

SEQUENCER_LOCK_KEY = Lock.SEQUENCER

SEQUENCER_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(%s)"
SEQUENCER_LOCK = "SELECT pg_advisory_xact_lock(%s)"

# Give dense positions to the next `limit` events below the horizon, in (txid, seq)
# order, and move the cursor - all in one statement. The horizon is the xmin of this
# statement's own snapshot: every transaction id below it has committed or aborted, and
# the committed ones are visible to the statement. Run it after taking the sequencer lock,
# in the same transaction, so its snapshot sees the previous sequencer's cursor.
SEQUENCE = """
WITH cur AS (
    SELECT last_position, cursor_txid, cursor_seq FROM event_sequencer
), batch AS (
    SELECT e.txid, e.seq,
           cur.last_position + row_number() OVER (ORDER BY e.txid, e.seq) AS position
    FROM cur, LATERAL (
        SELECT txid, seq FROM events
        WHERE (txid, seq) > (cur.cursor_txid, cur.cursor_seq)
          AND txid < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY txid, seq
        LIMIT %(limit)s
    ) e
), ins AS (
    INSERT INTO event_positions (position, seq)
    SELECT position, seq FROM batch
    RETURNING position
), last AS (
    SELECT txid, seq, position FROM batch ORDER BY position DESC LIMIT 1
)
UPDATE event_sequencer s
SET last_position = last.position, cursor_txid = last.txid, cursor_seq = last.seq
FROM last
RETURNING s.last_position, (SELECT count(*) FROM ins)
"""
