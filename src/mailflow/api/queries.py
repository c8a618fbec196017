"""API room: the gateway's own named queries (idempotency keys, keyset-paginated listings)."""

# Claim the key, or take over a claim whose request died (no response, older than stale s).
CLAIM_IDEMPOTENCY_KEY = """
INSERT INTO api_idempotency (tenant, key, method, path, body_hash)
VALUES (%(tenant)s, %(key)s, %(method)s, %(path)s, %(hash)s)
ON CONFLICT (tenant, key) DO UPDATE SET created_at = now(), body_hash = EXCLUDED.body_hash,
    method = EXCLUDED.method, path = EXCLUDED.path
    WHERE api_idempotency.status IS NULL
      AND api_idempotency.created_at < now() - make_interval(secs => %(stale)s)
RETURNING true AS claimed
"""
GET_IDEMPOTENCY_KEY = "SELECT body_hash, status, response, headers FROM api_idempotency WHERE key = %(key)s"
KEEP_IDEMPOTENT_RESPONSE = """
UPDATE api_idempotency SET status = %(status)s, response = %(body)s, headers = %(headers)s::jsonb
WHERE key = %(key)s
"""
FREE_IDEMPOTENCY_KEY = "DELETE FROM api_idempotency WHERE key = %(key)s AND status IS NULL"
FORGET_IDEMPOTENCY_KEYS = "DELETE FROM api_idempotency WHERE created_at < now() - make_interval(hours => %(hours)s)"

# Jobs, newest first, after the cursor (created_at, id) of the previous page.
JOBS_PAGE = """
SELECT id, priority, state, email, campaign_id, attempts, last_code, failure_kind, created_at, finished_at
FROM jobs
WHERE (%(state)s::text IS NULL OR state = %(state)s::text)
  AND (%(priority)s::text IS NULL OR priority = %(priority)s::text)
  AND (%(campaign)s::uuid IS NULL OR campaign_id = %(campaign)s::uuid)
  AND (%(after_at)s::timestamptz IS NULL OR (created_at, id) < (%(after_at)s::timestamptz, %(after_id)s::uuid))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""

# -- the infra service: senders, inbound domains, mailboxes, routes, webhook endpoints ----------
# A sender as the API shows it: its secrets only as references (a relay password's fingerprint,
# the DKIM public key), never the secrets; `after` is the last name of the previous page.
_SENDER_COLUMNS = """
s.name, s.from_email, s.from_name, s.relay_url, s.dkim_selector, s.dkim_public_key,
(SELECT x.fingerprint FROM secrets x WHERE x.id = s.relay_secret) AS relay_fingerprint,
s.relay_secret IS NOT NULL AS relay_password_set, s.created_at, s.updated_at
"""
SENDERS_PAGE = f"""
SELECT {_SENDER_COLUMNS} FROM senders s
WHERE (%(after)s::text IS NULL OR s.name > %(after)s::text)
ORDER BY s.name LIMIT %(limit)s
"""
SENDER = f"SELECT {_SENDER_COLUMNS} FROM senders s WHERE s.name = %(name)s"

# Inbound domains by name, after the previous page's last.
INBOUND_DOMAINS_PAGE = """
SELECT d.domain, d.created_at, (SELECT count(*) FROM mailboxes m WHERE m.address LIKE '%%@' || d.domain) AS mailboxes
FROM inbound_domains d
WHERE (%(after)s::text IS NULL OR d.domain > %(after)s::text)
ORDER BY d.domain LIMIT %(limit)s
"""
# Mailboxes by address, with the messages delivered to them (and how many are unread).
MAILBOXES_PAGE = """
SELECT m.address, m.name, m.created_at,
       (SELECT count(*) FROM mailbox_messages b WHERE (b.tenant, b.mailbox) = (m.tenant, m.address)) AS messages,
       (SELECT count(*) FROM mailbox_messages b
        WHERE (b.tenant, b.mailbox) = (m.tenant, m.address) AND b.read_at IS NULL) AS unread
FROM mailboxes m
WHERE (%(after)s::text IS NULL OR m.address > %(after)s::text)
ORDER BY m.address LIMIT %(limit)s
"""
# Routes in the order they are tried (priority, then the order added), after the cursor (priority, seq).
ROUTES_PAGE = """
SELECT tenant, id, seq, priority, pattern, headers, action, target, continue_matching, created_at
FROM routes
WHERE (%(after_priority)s::integer IS NULL OR (priority, seq) > (%(after_priority)s::integer, %(after_seq)s::bigint))
ORDER BY priority, seq LIMIT %(limit)s
"""
ROUTE = """
SELECT tenant, id, seq, priority, pattern, headers, action, target, continue_matching, created_at
FROM routes WHERE id = %(id)s
"""
# Webhook endpoints, oldest first, after the cursor (created_at, id).
WEBHOOK_ENDPOINTS_PAGE = """
SELECT id, url, events, status, disabled_reason, disabled_at, fingerprint, failure_streak, failing_since,
       last_success_at, created_at
FROM webhook_endpoints
WHERE (%(after_at)s::timestamptz IS NULL OR (created_at, id) > (%(after_at)s::timestamptz, %(after_id)s::text))
ORDER BY created_at, id LIMIT %(limit)s
"""
# One endpoint's attempts, newest first, after the cursor (at, delivery_id, attempt).
WEBHOOK_ATTEMPTS_PAGE = """
SELECT at, endpoint_id, delivery_id, type, attempt, outcome, status, error, duration_ms
FROM webhook_attempts
WHERE endpoint_id = %(endpoint)s
  AND (%(after_at)s::timestamptz IS NULL
       OR (at, delivery_id, attempt) < (%(after_at)s::timestamptz, %(after_delivery)s::uuid, %(after_attempt)s::integer))
ORDER BY at DESC, delivery_id DESC, attempt DESC LIMIT %(limit)s
"""

# -- campaign service: contacts, segments, templates, campaigns, suppressions --------------------

# Contacts in the order they came (id), after the cursor's id, with an optional status and the
# WHERE clause of a segment's compiled filter ({where}, outbound/segments.py; positional params).
CONTACTS_PAGE = """
SELECT id, email, status, attributes, created_at, updated_at FROM contacts
WHERE (%s::text IS NULL OR status = %s::text)
  AND (%s::bigint IS NULL OR id > %s::bigint)
  AND {where}
ORDER BY id
LIMIT %s
"""
CONTACT_EXISTS = "SELECT true AS found FROM contacts WHERE email = %(email)s"

# Segments and templates by name, after the cursor's name; one by name when `name` is given.
SEGMENTS_PAGE = """
SELECT name, filter, created_at, updated_at FROM segments
WHERE (%(name)s::text IS NULL OR name = %(name)s::text)
  AND (%(after)s::text IS NULL OR name COLLATE "C" > %(after)s::text COLLATE "C")
ORDER BY name COLLATE "C"
LIMIT %(limit)s
"""
TEMPLATES_PAGE = """
SELECT name, subject, html, text, created_at, updated_at FROM templates
WHERE (%(name)s::text IS NULL OR name = %(name)s::text)
  AND (%(after)s::text IS NULL OR name COLLATE "C" > %(after)s::text COLLATE "C")
ORDER BY name COLLATE "C"
LIMIT %(limit)s
"""

# Campaigns, newest first, after the cursor (created_at, id).
CAMPAIGNS_PAGE = """
SELECT id, name, status, recipients, sender, template, segment, stop_on_reply, tracking, scheduled_at,
       created_at, started_at, finished_at
FROM campaigns
WHERE (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(after_at)s::timestamptz IS NULL OR (created_at, id) < (%(after_at)s::timestamptz, %(after_id)s::uuid))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""

# A campaign's jobs (one per recipient, more after a resend) in id order, after the cursor's id,
# each with the last thing that came back for it (a bounce, complaint, reply...).
CAMPAIGN_RECIPIENTS_PAGE = """
SELECT j.id, j.email, j.state, j.attempts, j.last_code, j.last_reply, j.failure_kind,
       j.created_at, j.queued_at, j.started_at, j.accepted_at, j.finished_at,
       f.kind AS feedback_kind, f.reason AS feedback_reason, f.status AS feedback_status,
       f.hard AS feedback_hard, f.at AS feedback_at
FROM jobs j
LEFT JOIN LATERAL (
    SELECT fb.kind, fb.reason, fb.status, fb.hard, fb.at FROM feedback fb
    WHERE fb.job_id = j.id ORDER BY fb.at DESC LIMIT 1
) f ON true
WHERE j.campaign_id = %(campaign)s::uuid
  AND (%(state)s::text IS NULL OR j.state = %(state)s::text)
  AND (%(after)s::uuid IS NULL OR j.id > %(after)s::uuid)
ORDER BY j.id
LIMIT %(limit)s
"""

# Suppressions, newest first, after the cursor (created_at, subject).
SUPPRESSIONS_PAGE = """
SELECT email, subject, reason, detail, created_at FROM suppressions
WHERE (%(reason)s::text IS NULL OR reason = %(reason)s::text)
  AND (%(after_at)s::timestamptz IS NULL OR (created_at, subject) < (%(after_at)s::timestamptz, %(after_subject)s::text))
ORDER BY created_at DESC, subject DESC
LIMIT %(limit)s
"""
# One campaign by its primary key (GET /campaigns/{id} is the hot read: no OR for the planner).
CAMPAIGN_ROW = """
SELECT id, name, status, recipients, sender, template, segment, stop_on_reply, tracking, scheduled_at,
       created_at, started_at, finished_at
FROM campaigns WHERE id = %(id)s
"""
