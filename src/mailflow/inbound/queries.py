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
MAILBOX_OWNER = "SELECT tenant FROM mailboxes WHERE address = %s"
LIST_MAILBOXES = """
SELECT m.address, m.name, m.created_at,
       (SELECT count(*) FROM inbound_messages i WHERE m.address = ANY(i.recipients)) AS messages
FROM mailboxes m ORDER BY m.address
"""

# The directory the server decides RCPT TO from (server.py), every tenant's.
DIRECTORY_DOMAINS = "SELECT domain, tenant FROM inbound_domains"
DIRECTORY_MAILBOXES = "SELECT address, tenant FROM mailboxes"
DIRECTORY_SENDERS = "SELECT lower(from_email), tenant FROM senders"
JOB_TENANT = "SELECT tenant FROM jobs WHERE id = %s"

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
INSERT_MESSAGES = """
INSERT INTO inbound_messages (id, tenant, received_at, sha256, size, recipients, sender_subject, helo, tls)
SELECT u.id, u.tenant, u.at, u.sha256, u.size, string_to_array(u.recipients, ' '), u.subject, u.helo, u.tls
FROM unnest(%b::uuid[], %b::text[], %b::timestamptz[], %b::text[], %b::int[], %b::text[], %b::text[], %b::text[],
            %b::bool[]) AS u(id, tenant, at, sha256, size, recipients, subject, helo, tls)
ON CONFLICT (id) DO NOTHING
"""
LIST_MESSAGES = """
SELECT id, received_at, size, recipients, helo, tls, state FROM inbound_messages
WHERE (%(mailbox)s::text IS NULL OR %(mailbox)s = ANY(recipients))
ORDER BY received_at DESC LIMIT %(limit)s
"""
