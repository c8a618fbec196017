"""Inbound room: every SQL statement of the domains, mailboxes and received mail, by name."""

ADD_DOMAIN = "INSERT INTO inbound_domains (domain, tenant, created_at) VALUES (%s, %s, %s)"
REMOVE_DOMAIN = "DELETE FROM inbound_domains WHERE tenant = %s AND domain = %s"
# Across tenants (a domain is one tenant's): the operator's view, for the uniqueness check.
DOMAIN_OWNER = "SELECT tenant FROM inbound_domains WHERE domain = %s"
LIST_DOMAINS = """
SELECT d.domain, d.created_at, (SELECT count(*) FROM mailboxes m WHERE m.address LIKE '%%@' || d.domain) AS mailboxes
FROM inbound_domains d ORDER BY d.domain
"""
ADD_MAILBOX = """
INSERT INTO mailboxes (address, tenant, name, created_at) VALUES (%s, %s, %s, %s)
ON CONFLICT (address) DO UPDATE SET name = excluded.name
"""
REMOVE_MAILBOX = "DELETE FROM mailboxes WHERE tenant = %s AND address = %s"
LIST_MAILBOXES = """
SELECT m.address, m.name, m.created_at,
       (SELECT count(*) FROM inbound_messages i WHERE m.address = ANY(i.recipients)) AS messages
FROM mailboxes m ORDER BY m.address
"""

# The directory the server decides RCPT TO from (server.py), every tenant's.
DIRECTORY_DOMAINS = "SELECT domain, tenant FROM inbound_domains"
DIRECTORY_MAILBOXES = "SELECT address, tenant FROM mailboxes"
DIRECTORY_SENDERS = "SELECT lower(from_email), tenant FROM senders"
# A bounce's job: its tenant, and the sender's From (the identity whose mailbox gets it).
JOB_TENANT = """
SELECT j.tenant, lower(s.from_email) FROM jobs j LEFT JOIN senders s ON (s.tenant, s.name) = (j.tenant, j.sender)
WHERE j.id = %s
"""

# An unsubscribe address's campaign: its tenant.
CAMPAIGN_OWNER = "SELECT tenant FROM campaigns WHERE id = %s"

PUT_RAW = """
INSERT INTO raw_messages (tenant, sha256, size, data, sender_subject)
SELECT * FROM unnest(%b::text[], %b::text[], %b::int[], %b::bytea[], %b::text[])
ON CONFLICT (tenant, sha256) DO NOTHING
RETURNING tenant, sha256
"""
# A retransmission (the same bytes again): the message it repeats.
KNOWN_MESSAGES = """
SELECT DISTINCT ON (tenant, sha256) tenant, sha256, id::text FROM inbound_messages
WHERE (tenant, sha256) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
ORDER BY tenant, sha256, received_at
"""
GET_RAW = "SELECT data FROM raw_messages WHERE sha256 = %s"

# -- received messages, mailboxes, quarantine (inbound/mailbox.py) ---------------------------
INSERT_MESSAGES = """
INSERT INTO inbound_messages (id, tenant, received_at, sha256, size, recipients, sender_subject, helo, tls,
                              auth, spam, defects)
SELECT u.id, u.tenant, u.at, u.sha256, u.size, string_to_array(u.recipients, ' '), u.subject, u.helo, u.tls,
       u.auth::jsonb, u.spam::jsonb, string_to_array(u.defects, ' ')
FROM unnest(%b::uuid[], %b::text[], %b::timestamptz[], %b::text[], %b::int[], %b::text[], %b::text[], %b::text[],
            %b::bool[], %b::text[], %b::text[], %b::text[])
     AS u(id, tenant, at, sha256, size, recipients, subject, helo, tls, auth, spam, defects)
ON CONFLICT (id) DO NOTHING
"""
SET_ROUTED = """
UPDATE inbound_messages m SET state = 'routed', routing = u.routing::jsonb, reason = NULL
FROM unnest(%b::text[], %b::uuid[], %b::text[]) AS u(tenant, id, routing)
WHERE (m.tenant, m.id) = (u.tenant, u.id)
"""
DELIVER = """
INSERT INTO mailbox_messages (tenant, message_id, mailbox, recipient, route_id, delivered_at)
SELECT * FROM unnest(%b::text[], %b::uuid[], %b::text[], %b::text[], %b::text[], %b::timestamptz[])
ON CONFLICT DO NOTHING
"""
SET_STATE = "UPDATE inbound_messages SET state = %s, reason = %s WHERE tenant = %s AND id = %s"
SET_READ = """
UPDATE mailbox_messages SET read_at = CASE WHEN %(read)s THEN %(at)s::timestamptz END
WHERE tenant = %(tenant)s AND message_id = %(id)s AND (%(mailbox)s::text IS NULL OR mailbox = %(mailbox)s)
"""
SET_THRESHOLDS = """
INSERT INTO inbound_thresholds (tenant, quarantine, reject, updated_at) VALUES (%s, %s, %s, %s)
ON CONFLICT (tenant) DO UPDATE SET quarantine = excluded.quarantine, reject = excluded.reject,
                                   updated_at = excluded.updated_at
"""
THRESHOLDS = "SELECT quarantine, reject FROM inbound_thresholds"
ALL_THRESHOLDS = "SELECT tenant, quarantine, reject FROM inbound_thresholds"
LIST_MESSAGES = """
SELECT m.id, m.received_at, m.size, m.recipients, m.state, m.defects, m.auth, m.spam, m.reason,
       coalesce(array_agg(b.mailbox ORDER BY b.mailbox) FILTER (WHERE b.mailbox IS NOT NULL), '{}') AS mailboxes,
       bool_and(b.read_at IS NULL) FILTER (WHERE b.mailbox IS NOT NULL) AS unread
FROM inbound_messages m LEFT JOIN mailbox_messages b ON (b.tenant, b.message_id) = (m.tenant, m.id)
     AND (%(mailbox)s::text IS NULL OR b.mailbox = %(mailbox)s)
WHERE (%(state)s::text IS NULL OR m.state = %(state)s)
GROUP BY m.id
HAVING (%(mailbox)s::text IS NULL OR count(b.mailbox) > 0)
   AND (NOT %(unread)s OR bool_and(b.read_at IS NULL) FILTER (WHERE b.mailbox IS NOT NULL))
ORDER BY m.received_at DESC LIMIT %(limit)s
"""
FIND_MESSAGE = """
SELECT id FROM inbound_messages WHERE id::text LIKE %(prefix)s || '%%' OR sha256 = %(prefix)s LIMIT 2
"""
GET_MESSAGE = """
SELECT m.id, m.tenant, m.received_at, m.sha256, m.size, m.recipients, m.helo, m.tls, m.state, m.defects, m.auth,
       m.spam, m.routing, m.reason, m.sender_subject
FROM inbound_messages m WHERE m.id = %s
"""
MESSAGE_BOXES = "SELECT mailbox, recipient, route_id, delivered_at, read_at FROM mailbox_messages WHERE message_id = %s"
MESSAGE_RAW = """
SELECT r.data FROM inbound_messages m JOIN raw_messages r ON (r.tenant, r.sha256) = (m.tenant, m.sha256)
WHERE m.id = %s
"""
DROP_RAW = """
DELETE FROM raw_messages r WHERE (r.tenant, r.sha256) = (SELECT tenant, sha256 FROM inbound_messages WHERE id = %s)
  AND NOT EXISTS (SELECT 1 FROM inbound_messages o
                  WHERE (o.tenant, o.sha256) = (r.tenant, r.sha256) AND o.id <> %s AND o.state <> 'rejected')
"""

# -- routes (inbound/routes.py) ------------------------------------------------------------------
ADD_ROUTE = """
INSERT INTO routes (tenant, id, priority, pattern, headers, action, target, continue_matching, created_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
REMOVE_ROUTE = "DELETE FROM routes WHERE tenant = %s AND id = %s"
ROUTE_EXISTS = "SELECT 1 FROM routes WHERE id = %s"
# The tenant's inbound domains, locked: one tenant's route changes take turns (see add_route).
ROUTE_DOMAINS_LOCKED = "SELECT domain FROM inbound_domains ORDER BY domain FOR UPDATE"
# Held until the route is committed, so the mailbox cannot be removed under it.
MAILBOX_FOR_ROUTE = "SELECT address FROM mailboxes WHERE address = %s FOR SHARE"
LIST_ROUTES = """
SELECT tenant, id, priority, pattern, headers, action, target, continue_matching, created_at
FROM routes ORDER BY priority, seq
"""
# Every tenant's, for the directory snapshot (an operator's connection; a tenant's sees its own).
DIRECTORY_ROUTES = """
SELECT tenant, id, priority, pattern, headers, action, target, continue_matching, created_at
FROM routes ORDER BY tenant, priority, seq
"""
# A mailbox that routes deliver to is not removed under them (directory.remove_mailbox).
MAILBOX_LOCKED = "SELECT tenant FROM mailboxes WHERE address = %s FOR UPDATE"
ROUTES_TO_MAILBOX = "SELECT id FROM routes WHERE action = 'mailbox' AND target = %s ORDER BY priority, seq"

# -- one domain, one mailbox (directory.domain_details, directory.mailbox_details) -------------
DOMAIN = "SELECT domain, created_at FROM inbound_domains WHERE domain = %s"
# Domain names have no LIKE wildcards (`_domain()`): `%%@` || domain is "an address at it".
DOMAIN_MAILBOXES = """
SELECT m.address, m.name, m.created_at, count(b.message_id) AS messages,
       count(b.message_id) FILTER (WHERE b.read_at IS NULL) AS unread
FROM mailboxes m LEFT JOIN mailbox_messages b ON (b.tenant, b.mailbox) = (m.tenant, m.address)
WHERE m.address LIKE '%%@' || %s
GROUP BY m.tenant, m.address ORDER BY m.address
"""
DOMAIN_MESSAGES_BY_STATE = """
SELECT state, count(*) AS messages FROM inbound_messages
WHERE EXISTS (SELECT 1 FROM unnest(recipients) AS r(address) WHERE lower(r.address) LIKE '%%@' || %s)
GROUP BY state ORDER BY state
"""
MAILBOX = "SELECT address, name, created_at FROM mailboxes WHERE address = %s"
MAILBOX_COUNTS = """
SELECT count(*) AS messages, count(*) FILTER (WHERE read_at IS NULL) AS unread FROM mailbox_messages
WHERE mailbox = %s
"""
MAILBOX_LATEST = """
SELECT b.message_id AS id, coalesce(m.received_at, b.delivered_at) AS received_at, b.recipient, b.read_at
FROM mailbox_messages b LEFT JOIN inbound_messages m ON (m.tenant, m.id) = (b.tenant, b.message_id)
WHERE b.mailbox = %s ORDER BY b.delivered_at DESC, b.message_id LIMIT %s
"""

# Erasure (infra/personal.py on_erasure: in the transaction that shreds the subjects' keys).
ERASE_SENDERS_RAW = "DELETE FROM raw_messages WHERE tenant = %s AND sender_subject = ANY(%s::text[])"
ERASE_TENANT_RAW = "DELETE FROM raw_messages WHERE tenant = %s"

# -- classification (classifier.py) -------------------------------------------------------------

RECEIVED_RAW = "SELECT sha256, data FROM raw_messages WHERE tenant = %s AND sha256 = ANY(%s)"
CLASSIFIED = """
SELECT message_id::text AS message_id, digest FROM inbound_classifications
WHERE tenant = %s AND message_id = ANY(%s::uuid[])
"""
PUT_CLASSIFICATION = """
INSERT INTO inbound_classifications (tenant, message_id, kind, digest, job_id, classified_at)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (tenant, message_id) DO UPDATE
SET kind = excluded.kind, digest = excluded.digest, job_id = excluded.job_id, classified_at = excluded.classified_at
"""
# One of the tenant's jobs (the pipeline's lookups of mailflow's own outbound messages).
TENANT_JOB = "SELECT id::text FROM jobs WHERE tenant = %s AND id = %s"
# The last message one of the tenant's senders (by its From) sent to a person: what a reply to
# that From answers when the client kept no References.
LAST_JOB_TO = """
SELECT j.id::text FROM jobs j JOIN senders s ON (s.tenant, s.name) = (j.tenant, j.sender)
WHERE j.tenant = %s AND j.subject = %s AND lower(s.from_email) = %s AND j.accepted_at IS NOT NULL
  AND j.accepted_at > now() - interval '60 days'
ORDER BY j.accepted_at DESC LIMIT 1
"""
SENDER_ADDRESSES = "SELECT lower(from_email) FROM senders WHERE tenant = %s"
# Stored messages for `mailflow inbound reprocess`, oldest first.
TO_REPROCESS = """
SELECT m.id::text AS message_id, m.sha256, m.recipients, m.received_at, coalesce(c.kind, '') AS kind
FROM inbound_messages m LEFT JOIN inbound_classifications c ON (c.tenant, c.message_id) = (m.tenant, m.id)
WHERE m.tenant = %(tenant)s AND m.received_at >= %(since)s AND (%(kind)s::text IS NULL OR c.kind = %(kind)s)
ORDER BY m.received_at, m.id
"""
