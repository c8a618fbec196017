"""Consumers room: every SQL statement the consumer runtime and the DLQ run, by name."""

ENSURE_CHECKPOINT = """
INSERT INTO consumer_checkpoints (consumer) VALUES (%s) ON CONFLICT (consumer) DO NOTHING
"""
LOCK_CHECKPOINT = "SELECT position FROM consumer_checkpoints WHERE consumer = %s FOR UPDATE"
GET_CHECKPOINT = "SELECT position FROM consumer_checkpoints WHERE consumer = %s"
SET_CHECKPOINT = """
UPDATE consumer_checkpoints SET position = %s, updated_at = now() WHERE consumer = %s
"""
ALL_CHECKPOINTS = "SELECT consumer, position, updated_at FROM consumer_checkpoints ORDER BY consumer"
# The relay's retention floor: what the slowest consumer still needs after a Redis loss.
OLDEST_CHECKPOINT = "SELECT min(position) FROM consumer_checkpoints"

RECORD_FAILURE = """
INSERT INTO consumer_failures (consumer, position, attempts, last_error)
VALUES (%(consumer)s, %(position)s, 1, %(error)s)
ON CONFLICT (consumer, position) DO UPDATE
SET attempts = consumer_failures.attempts + 1, last_error = excluded.last_error, updated_at = now()
RETURNING attempts
"""
CLEAR_FAILURE = "DELETE FROM consumer_failures WHERE consumer = %s AND position = %s"

DEAD_LETTER = """
INSERT INTO dead_letters (consumer, position, event_id, event_type, attempts, error)
VALUES (%(consumer)s, %(position)s, %(event_id)s, %(event_type)s, %(attempts)s, %(error)s)
ON CONFLICT (consumer, position) DO UPDATE
SET attempts = excluded.attempts, error = excluded.error, status = 'open',
    created_at = now(), resolved_at = NULL
RETURNING id
"""

DEAD_LETTER_ENTRY = """
INSERT INTO dead_letters (consumer, entry_id, entry, attempts, error)
VALUES (%(consumer)s, %(entry_id)s, %(entry)s, 1, %(error)s)
RETURNING id
"""

OPEN_DEAD_LETTER_POSITIONS = """
SELECT position FROM dead_letters
WHERE consumer = %s AND status = 'open' AND position BETWEEN %s AND %s
"""

LIST_DEAD_LETTERS = """
SELECT id, consumer, position, event_id, event_type, attempts, error, status, created_at, resolved_at,
       entry_id
FROM dead_letters
WHERE (%(consumer)s::text IS NULL OR consumer = %(consumer)s::text)
  AND (%(all)s OR status = 'open')
ORDER BY id
"""
LOCK_DEAD_LETTER = """
SELECT id, consumer, position, event_id, event_type, attempts, error, status, created_at, resolved_at,
       entry_id
FROM dead_letters WHERE id = %s FOR UPDATE
"""
RESOLVE_DEAD_LETTER = """
UPDATE dead_letters SET status = %s, resolved_at = now() WHERE id = %s
"""
SUPERSEDE_DEAD_LETTERS = """
UPDATE dead_letters SET status = 'retried', resolved_at = now()
WHERE consumer = %s AND status = 'open' AND position >= %s
"""

OPEN_DEAD_LETTER_COUNTS = """
SELECT consumer, count(*) FROM dead_letters WHERE status = 'open' GROUP BY consumer
"""

# The sequences behind identity columns of these tables (an inline rebuild restarts them).
IDENTITY_SEQUENCES = """
SELECT pg_get_serial_sequence(a.attrelid::regclass::text, a.attname)
FROM pg_attribute a
WHERE a.attrelid = ANY(%s::regclass[]) AND a.attidentity <> '' AND NOT a.attisdropped
"""
