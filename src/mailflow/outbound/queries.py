"""Outbound room: every SQL statement of contacts, segments, templates and suppressions, by name."""

UPSERT_CONTACTS = """
INSERT INTO contacts AS c (email, attributes)
SELECT * FROM unnest(%s::text[], %s::text[]::jsonb[])
ON CONFLICT (email) DO UPDATE
SET attributes = c.attributes || excluded.attributes, updated_at = now()
RETURNING (xmax = 0) AS inserted
"""

COUNT_KNOWN_EMAILS = "SELECT count(*) FROM contacts WHERE email = ANY(%s)"

SET_CONTACT_STATUS = "UPDATE contacts SET status = %s, updated_at = now() WHERE email = %s"

LIST_CONTACTS = """
SELECT email, status, attributes, created_at FROM contacts
WHERE {where}
ORDER BY id
LIMIT %s
"""

COUNT_CONTACTS = "SELECT count(*) FROM contacts WHERE {where}"

UPSERT_SEGMENT = """
INSERT INTO segments (name, filter) VALUES (%s, %s)
ON CONFLICT (name) DO UPDATE SET filter = excluded.filter, updated_at = now()
"""
GET_SEGMENT = "SELECT filter FROM segments WHERE name = %s"
LIST_SEGMENTS = "SELECT name, filter, updated_at FROM segments ORDER BY name"

UPSERT_TEMPLATE = """
INSERT INTO templates (name, subject, html, text) VALUES (%s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE
SET subject = excluded.subject, html = excluded.html, text = excluded.text, updated_at = now()
"""
GET_TEMPLATE = "SELECT name, subject, html, text FROM templates WHERE name = %s"
LIST_TEMPLATES = "SELECT name, subject, updated_at FROM templates ORDER BY name"

ADD_SUPPRESSION = """
INSERT INTO suppressions (email, reason, detail) VALUES (%s, %s, %s)
ON CONFLICT (email) DO UPDATE SET reason = excluded.reason, detail = excluded.detail
"""
REMOVE_SUPPRESSION = "DELETE FROM suppressions WHERE email = %s"
LIST_SUPPRESSIONS = "SELECT email, reason, detail, created_at FROM suppressions ORDER BY created_at DESC LIMIT %s"
IS_SUPPRESSED = "SELECT reason FROM suppressions WHERE email = %s"

UPSERT_SENDER = """
INSERT INTO senders (name, from_email, from_name, relay_url, dkim_selector, dkim_key_pem)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE SET from_email = excluded.from_email, from_name = excluded.from_name,
    relay_url = excluded.relay_url, dkim_selector = excluded.dkim_selector,
    dkim_key_pem = excluded.dkim_key_pem, updated_at = now()
"""
GET_SENDER = "SELECT name, from_email, from_name, relay_url, dkim_selector, dkim_key_pem FROM senders WHERE name = %s"
LIST_SENDERS = "SELECT name, from_email, from_name, relay_url, dkim_selector IS NOT NULL FROM senders ORDER BY name"

JOB_BY_KEY = "SELECT id FROM jobs WHERE idempotency_key = %s"

# -- the queuer -------------------------------------------------------------------------------

EXPIRED_LEASES = """
SELECT id, attempts FROM jobs
WHERE state = 'active' AND lease_until < now()
ORDER BY lease_until
LIMIT %s
FOR UPDATE SKIP LOCKED
"""

# Due work of one priority, oldest first; campaign mail only while its campaign runs.
DUE_JOBS = """
SELECT j.id, j.sender, j.domain FROM jobs j
WHERE j.state IN ('pending', 'retry') AND j.priority = %(priority)s AND j.due_at <= now()
  AND (j.campaign_id IS NULL
       OR EXISTS (SELECT 1 FROM campaigns c WHERE c.id = j.campaign_id AND c.status = 'running'))
ORDER BY j.due_at
LIMIT %(limit)s
FOR UPDATE OF j SKIP LOCKED
"""

NEXT_QUEUE_SEQS = "SELECT nextval('job_queue_seq') FROM generate_series(1, %s)"

QUEUED_AFTER = """
SELECT id, queue_seq FROM jobs
WHERE state = 'queued' AND priority = %s AND queue_seq > %s
ORDER BY queue_seq
"""

# -- workers ------------------------------------------------------------------------------------

# Lock the jobs a worker was handed; only those still queued under that very entry start.
CLAIM_JOBS = """
SELECT j.id, j.queue_seq, j.attempts, j.email, j.sender, j.template, j.variables, j.campaign_id,
       s.reason AS suppressed, c.status AS contact_status, c.attributes
FROM jobs j
LEFT JOIN suppressions s ON s.email = j.email
LEFT JOIN contacts c ON c.email = j.email
WHERE j.id = ANY(%s) AND j.state = 'queued'
FOR UPDATE OF j
"""
