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
