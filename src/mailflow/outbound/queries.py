"""Outbound room: every SQL statement of the catalogue (contacts, segments, templates, suppressions,
senders), campaigns, the queuer, the workers and sending domains, by name."""

from mailflow.infra.locks import Lock

UPSERT_CONTACTS = """
INSERT INTO contacts AS c (tenant, subject, email, attributes, created_at, updated_at)
SELECT %(tenant)s, u.subject, coalesce(u.email, 'erased:' || u.subject), u.attributes, %(at)s, %(at)s
FROM unnest(%(subjects)s::text[], %(emails)s::text[], %(attributes)s::text[]::jsonb[]) AS u(subject, email, attributes)
ON CONFLICT (tenant, subject) DO UPDATE
SET attributes = c.attributes || excluded.attributes, updated_at = excluded.updated_at
RETURNING (xmax = 0) AS inserted
"""

DELETE_ERASED_PLACEHOLDERS = """
DELETE FROM contacts WHERE tenant = %s AND subject = ANY(%s::text[]) AND email = 'erased:' || subject
"""
COUNT_KNOWN_SUBJECTS = "SELECT count(*) AS known FROM contacts WHERE subject = ANY(%s)"

SET_CONTACT_STATUS = "UPDATE contacts SET status = %s, updated_at = %s WHERE tenant = %s AND subject = %s"

# Set keys are merged over the contact's attributes, then removed keys are dropped.
UPDATE_CONTACT_ATTRIBUTES = """
UPDATE contacts SET attributes = (attributes || %(attributes)s::jsonb) - %(removed)s::text[], updated_at = %(at)s
WHERE tenant = %(tenant)s AND subject = %(subject)s
"""
GET_CONTACT = """
SELECT c.email, c.subject, c.status, c.attributes, c.created_at, c.updated_at,
       s.reason AS suppression_reason, s.detail AS suppression_detail, s.created_at AS suppressed_at
FROM contacts c LEFT JOIN suppressions s ON s.tenant = c.tenant AND s.subject = c.subject
WHERE c.email = %s
"""
CONTACT_JOB_STATES = "SELECT state, count(*) AS jobs FROM jobs WHERE subject = %s GROUP BY state ORDER BY state"
# The contact row is locked too: a reactivation and an update of one address do not interleave.
LOCK_CONTACT = "SELECT status, attributes FROM contacts WHERE subject = %s FOR UPDATE"
DELETE_CONTACT = "DELETE FROM contacts WHERE tenant = %s AND subject = %s"
# Erasure: jobs keep their states and counts, not the address or the send's variables.
FORGET_JOB_RECIPIENT = "UPDATE jobs SET email = NULL, variables = '{}' WHERE tenant = %s AND subject = %s"
SUPPRESS_ERASED = """
INSERT INTO suppressions AS s (tenant, subject, email, reason, detail, created_at) VALUES (%s, %s, NULL, 'erased', '', %s)
ON CONFLICT (tenant, subject) DO UPDATE SET email = NULL, reason = 'erased', detail = ''
"""
# Jobs of a person that have not started, which erasing ends.
UNSENT_JOBS_OF = """
SELECT id, attempts FROM jobs WHERE subject = ANY(%s::text[]) AND state IN ('pending', 'retry') ORDER BY id FOR UPDATE
"""
JOBS_PER_SUBJECT = "SELECT subject, count(*) AS jobs FROM jobs WHERE subject = ANY(%s::text[]) GROUP BY subject"
# Everyone the tenant holds anything about and has not erased yet (erasing a tenant).
_HELD = """
(SELECT subject FROM contacts UNION SELECT subject FROM jobs UNION SELECT subject FROM suppressions
 UNION SELECT subject FROM subject_keys EXCEPT SELECT subject FROM erased_subjects)
"""
SUBJECTS_HELD = f"SELECT subject FROM {_HELD} AS held ORDER BY subject LIMIT %s"
COUNT_SUBJECTS_HELD = f"SELECT count(*) FROM {_HELD} AS held"
ERASE_TARGET = """
SELECT (SELECT count(*) FROM contacts WHERE subject = %(subject)s) AS contacts,
       (SELECT count(*) FROM jobs WHERE subject = %(subject)s) AS jobs,
       (SELECT reason FROM suppressions WHERE subject = %(subject)s) AS suppression
"""

# Unsubscribe requests for one address are decided one at a time (two-key advisory lock:
# class Lock.ADDRESS, then the subject), on what the contact and suppression tables say now.
LOCK_ADDRESS = f"SELECT pg_advisory_xact_lock({Lock.ADDRESS}, hashtext(%s))"
ADDRESS_STATE = """
SELECT (SELECT status FROM contacts WHERE subject = %(subject)s),
       EXISTS (SELECT 1 FROM suppressions WHERE subject = %(subject)s)
"""
# Reactivating sets the status and lifts the suppression, both at the event's time.
REACTIVATE_CONTACT = """
UPDATE contacts SET status = 'active', updated_at = %(at)s WHERE tenant = %(tenant)s AND subject = %(subject)s
"""

LIST_CONTACTS = """
SELECT email, status, attributes, created_at FROM contacts
WHERE {where}
ORDER BY id
LIMIT %s
"""

COUNT_CONTACTS = "SELECT count(*) FROM contacts WHERE {where}"

# Timestamps come from the events (the last argument), so a rebuild gives the same rows.
UPSERT_SEGMENT = """
INSERT INTO segments (tenant, name, filter, created_at, updated_at) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (tenant, name) DO UPDATE SET filter = excluded.filter, updated_at = excluded.updated_at
"""
GET_SEGMENT = "SELECT filter FROM segments WHERE name = %s"
LIST_SEGMENTS = "SELECT name, filter, updated_at FROM segments ORDER BY name"
LOCK_SEGMENT = "SELECT name FROM segments WHERE name = %s FOR UPDATE"
DELETE_SEGMENT = "DELETE FROM segments WHERE tenant = %s AND name = %s"

UPSERT_TEMPLATE = """
INSERT INTO templates (tenant, name, subject, html, text, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (tenant, name) DO UPDATE
SET subject = excluded.subject, html = excluded.html, text = excluded.text, updated_at = excluded.updated_at
"""
# By name in the connection's tenant, or in the tenant named (an operator's worker names it).
GET_TEMPLATE = """
SELECT name, subject, html, text FROM templates
WHERE tenant = coalesce(%(tenant)s, current_setting('mailflow.tenant', true)) AND name = %(name)s
"""
LIST_TEMPLATES = "SELECT name, subject, updated_at FROM templates ORDER BY name"
LOCK_TEMPLATE = "SELECT name FROM templates WHERE name = %s FOR UPDATE"
DELETE_TEMPLATE = "DELETE FROM templates WHERE tenant = %s AND name = %s"

# An erased subject's suppression is for good: nothing replaces or lifts it.
ADD_SUPPRESSION = """
INSERT INTO suppressions AS s (tenant, subject, email, reason, detail, created_at) VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (tenant, subject) DO UPDATE
SET email = coalesce(excluded.email, s.email), reason = excluded.reason, detail = excluded.detail
WHERE s.reason <> 'erased'
"""
REMOVE_SUPPRESSION = "DELETE FROM suppressions WHERE tenant = %s AND subject = %s AND reason <> 'erased'"
LIST_SUPPRESSIONS = """
SELECT email, subject, reason, detail, created_at FROM suppressions ORDER BY created_at DESC LIMIT %s
"""
IS_SUPPRESSED = "SELECT reason FROM suppressions WHERE subject = %s"
LOCK_SUPPRESSION = "SELECT reason FROM suppressions WHERE subject = %s FOR UPDATE"

UPSERT_SENDER = """
INSERT INTO senders (tenant, name, from_email, from_name, relay_url, dkim_selector, relay_secret, dkim_secret,
                     dkim_public_key, created_at, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (tenant, name) DO UPDATE SET from_email = excluded.from_email, from_name = excluded.from_name,
    relay_url = excluded.relay_url, dkim_selector = excluded.dkim_selector, relay_secret = excluded.relay_secret,
    dkim_secret = excluded.dkim_secret, dkim_public_key = excluded.dkim_public_key, updated_at = excluded.updated_at
"""
# Column names are Sender's fields; the secrets themselves are in the vault (infra/vault.py).
GET_SENDER = """
SELECT name, from_email, from_name, relay_url, dkim_selector, relay_secret::text, dkim_secret::text, dkim_public_key
FROM senders
WHERE tenant = coalesce(%(tenant)s, current_setting('mailflow.tenant', true)) AND name = %(name)s
"""
DELETE_SENDER_SECRETS = "DELETE FROM secrets WHERE tenant = current_setting('mailflow.tenant', true) AND owner = %s"
LIST_SENDERS = """
SELECT name, from_email, from_name, relay_url, dkim_public_key IS NOT NULL AS dkim FROM senders ORDER BY name
"""
LOCK_SENDER = "SELECT name FROM senders WHERE name = %s FOR UPDATE"
DELETE_SENDER = "DELETE FROM senders WHERE tenant = %s AND name = %s"

# Campaigns that still need a segment, template or sender (the column is a psycopg Identifier:
# segment, template or sender), the oldest first; deleting what they use is refused.
CAMPAIGNS_USING = """
SELECT name, status FROM campaigns
WHERE {column} = %s AND status IN ('draft', 'scheduled', 'running', 'paused')
ORDER BY created_at LIMIT 3
"""
# Transactional jobs not yet finished that still need a template or sender (column as above).
UNFINISHED_JOBS_USING = """
SELECT count(*) AS jobs FROM jobs
WHERE {column} = %s AND state IN ('pending', 'queued', 'active', 'retry')
"""

JOB_BY_KEY = "SELECT id FROM jobs WHERE idempotency_key = %s"

# -- the queuer -------------------------------------------------------------------------------

# Leases that expired more than hold_s ago (hold_s > 0 early in a queuer's term, see queuer.py).
EXPIRED_LEASES = """
SELECT id, tenant, attempts, coalesce(correlation_id, 'campaign-' || campaign_id, id::text) AS correlation_id
FROM jobs
WHERE state = 'active' AND lease_until < now() - make_interval(secs => %(hold_s)s)
ORDER BY lease_until
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

# Due work of one priority, per active tenant the oldest `limit` of its jobs (by the index
# jobs_due_by_tenant), so that the queuer can share each batch between tenants; campaign mail
# only while its campaign runs. With each tenant, how many more messages its hourly and daily
# limits allow (NULL: no limit); limits hold back normal and low work only.
DUE_JOBS = """
SELECT d.id, t.id AS tenant, d.sender, d.domain, d.correlation_id,
       CASE WHEN t.hourly_limit IS NOT NULL THEN t.hourly_limit - coalesce(
           (SELECT sum(u.messages) FROM tenant_usage u
            WHERE u.tenant = t.id AND u.hour = date_trunc('hour', now(), 'UTC')), 0) END AS hourly_left,
       CASE WHEN t.daily_limit IS NOT NULL THEN t.daily_limit - coalesce(
           (SELECT sum(u.messages) FROM tenant_usage u
            WHERE u.tenant = t.id AND u.hour >= date_trunc('day', now(), 'UTC')), 0) END AS daily_left
FROM (SELECT id, status, hourly_limit, daily_limit FROM tenants
      UNION ALL SELECT '_system', 'active', NULL, NULL) t  -- the duties' (periodic.py): no limits
CROSS JOIN LATERAL (
    SELECT j.id, j.sender, j.domain,
           coalesce(j.correlation_id, 'campaign-' || j.campaign_id, j.id::text) AS correlation_id
    FROM jobs j
    WHERE j.tenant = t.id AND j.state IN ('pending', 'retry') AND j.priority = %(priority)s AND j.due_at <= now()
      AND (j.campaign_id IS NULL
           OR EXISTS (SELECT 1 FROM campaigns c WHERE c.id = j.campaign_id AND c.status = 'running'))
    ORDER BY j.due_at
    LIMIT %(limit)s
) d
WHERE t.status = 'active'
ORDER BY t.id
"""

# Lock only the jobs the rate limits granted, by primary key; skip any that changed.
LOCK_GRANTED = """
SELECT id FROM jobs WHERE id = ANY(%s::uuid[]) AND state IN ('pending', 'retry')
  AND (campaign_id IS NULL
       OR EXISTS (SELECT 1 FROM campaigns c WHERE c.id = jobs.campaign_id AND c.status = 'running'))
FOR UPDATE SKIP LOCKED
"""

NEXT_QUEUE_SEQS = "SELECT nextval('job_queue_seq') FROM generate_series(1, %s)"

# How many jobs of each priority should be in their streams (the queuer's cheap check).
QUEUED_COUNTS = "SELECT priority, count(*) FROM jobs WHERE state = 'queued' GROUP BY priority"

# Every job of one priority that should be in its stream, for reconcile().
QUEUED_JOBS = """
SELECT id, queue_seq FROM jobs
WHERE state = 'queued' AND priority = %s
ORDER BY queue_seq
"""

# -- workers ------------------------------------------------------------------------------------

# Lock the jobs a worker was handed; only those still queued under that very entry start.
CLAIM_JOBS = """
SELECT j.id, j.tenant, j.state, j.queue_seq, j.attempts, j.subject, j.email, j.sender, j.template, j.variables, j.campaign_id,
       j.kind, j.args,
       s.reason AS suppressed, c.status AS contact_status, c.attributes, j.worker,
       coalesce(j.correlation_id, 'campaign-' || j.campaign_id, j.id::text) AS correlation_id,
       cp.status AS campaign_status, k.key AS subject_key,
       -- open and click tracking (docs/tracking.md): the campaign's choice, else its tenant's
       -- default; transactional mail (no campaign) never
       j.campaign_id IS NOT NULL AND coalesce(cp.tracking, t.tracking, false) AS tracking,
       EXISTS (SELECT 1 FROM campaign_stops st
               WHERE st.tenant = j.tenant AND st.campaign_id = j.campaign_id AND st.subject = j.subject) AS stopped
FROM jobs j
LEFT JOIN suppressions s ON s.tenant = j.tenant AND s.subject = j.subject
LEFT JOIN contacts c ON c.tenant = j.tenant AND c.subject = j.subject
LEFT JOIN campaigns cp ON cp.id = j.campaign_id
LEFT JOIN tenants t ON t.id = j.tenant
LEFT JOIN subject_keys k ON k.tenant = j.tenant AND k.subject = j.subject
WHERE j.id = ANY(%s::uuid[])
FOR UPDATE OF j
"""
# (By primary key only: a state condition here lets the planner walk a partial index of
# every queued job instead. The caller checks the state.)

# -- campaigns ----------------------------------------------------------------------------------

INSERT_CAMPAIGN = """
INSERT INTO campaigns (id, tenant, name, sender, template, segment, stop_on_reply, tracking, created_at, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO NOTHING
"""
SET_CAMPAIGN_STATUS = """
UPDATE campaigns SET status = %(status)s, updated_at = %(at)s,
    scheduled_at = coalesce(%(scheduled_at)s::timestamptz, scheduled_at),
    started_at = CASE WHEN %(status)s = 'running' AND started_at IS NULL THEN %(at)s ELSE started_at END,
    finished_at = CASE WHEN %(status)s IN ('completed', 'cancelled') THEN %(at)s ELSE NULL END,
    recipients = coalesce(%(recipients)s::int, recipients)
WHERE id = %(id)s
"""
GET_CAMPAIGN = "SELECT id::text, name, sender, template, segment, status FROM campaigns WHERE id = %s"
LOCK_CAMPAIGN = "SELECT id::text, name, sender, template, segment, status FROM campaigns WHERE id = %s FOR UPDATE"
# By name, by id, or by a prefix of the id (at most a few, to say the prefix is ambiguous).
FIND_CAMPAIGN = """
SELECT id, name FROM campaigns
WHERE name = %(ref)s OR id::text = lower(%(ref)s) OR id::text LIKE %(prefix)s
ORDER BY (name = %(ref)s) DESC, created_at DESC LIMIT 5
"""
CAMPAIGN_TENANT = "SELECT tenant FROM campaigns WHERE id = %s"
CAMPAIGN_NAMED = "SELECT id FROM campaigns WHERE name = %s"
# A campaign being created holds what it uses, so a delete of them waits and then sees it.
SHARE_CAMPAIGN_PARTS = """
SELECT (SELECT name FROM senders WHERE name = %(sender)s FOR KEY SHARE) AS sender,
       (SELECT name FROM templates WHERE name = %(template)s FOR KEY SHARE) AS template,
       (SELECT name FROM segments WHERE name = %(segment)s FOR KEY SHARE) AS segment
"""
# Two creations of one name serialise here, so the uniqueness check cannot race.
LOCK_CAMPAIGN_NAME = f"SELECT pg_advisory_xact_lock({Lock.CAMPAIGN_NAME}, hashtext(%s))"
# Jobs of a campaign that have not started, which cancelling ends.
UNSENT_CAMPAIGN_JOBS = """
SELECT id, attempts FROM jobs WHERE campaign_id = %s AND state IN ('pending', 'retry') ORDER BY id FOR UPDATE
"""
LIST_CAMPAIGNS = """
SELECT id, name, status, recipients, sender, template, segment, created_at, started_at, finished_at
FROM campaigns ORDER BY created_at DESC LIMIT %s
"""

# Recipients at start: active contacts of the segment who are not suppressed, with the key
# their job's address is sealed under.
SNAPSHOT_RECIPIENTS = """
SELECT c.subject, c.email, k.key FROM contacts c
JOIN subject_keys k ON k.tenant = c.tenant AND k.subject = c.subject
WHERE c.status = 'active'
  AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.tenant = c.tenant AND s.subject = c.subject)
  AND {where}
ORDER BY c.id
"""

CAMPAIGN_JOB_STATES = "SELECT state, count(*) FROM jobs WHERE campaign_id = %s GROUP BY state"
CAMPAIGN_FAILURES = """
SELECT failure_kind, count(*), min(last_reply) FROM jobs
WHERE campaign_id = %s AND state = 'failed' GROUP BY failure_kind ORDER BY 2 DESC
"""
CAMPAIGN_RETRIES = "SELECT coalesce(sum(greatest(attempts - 1, 0)), 0) FROM jobs WHERE campaign_id = %s"
FAILED_TO_RESEND = """
SELECT DISTINCT j.subject, j.email, sk.key FROM jobs j
JOIN subject_keys sk ON sk.tenant = j.tenant AND sk.subject = j.subject
WHERE j.campaign_id = %s AND j.state = 'failed' AND j.email IS NOT NULL
  AND coalesce(j.failure_kind, '') NOT IN ('bad_mailbox', 'suppressed')
  AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.campaign_id = j.campaign_id AND k.subject = j.subject
                  AND k.state NOT IN ('completed', 'failed'))
  AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.campaign_id = j.campaign_id AND k.subject = j.subject
                  AND k.state = 'completed')
"""

FINISHED_CAMPAIGNS = """
SELECT c.id, c.tenant,
       (SELECT count(*) FROM jobs j WHERE j.campaign_id = c.id AND j.state = 'completed'),
       (SELECT count(*) FROM jobs j WHERE j.campaign_id = c.id AND j.state = 'failed')
FROM campaigns c
WHERE c.status = 'running'
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.campaign_id = c.id AND j.state NOT IN ('completed', 'failed'))
FOR UPDATE OF c SKIP LOCKED
"""
DUE_SCHEDULED = """
SELECT c.id, c.tenant FROM campaigns c
WHERE c.status = 'scheduled' AND c.scheduled_at <= now()
  AND NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = c.tenant AND t.status <> 'active')
"""

# -- inspection ---------------------------------------------------------------------------------

GET_JOB = """
SELECT id, idempotency_key, priority, state, email, sender, template, campaign_id, attempts, due_at,
       queue_seq, lease_until, worker, last_code, last_reply, failure_kind, created_at, queued_at,
       started_at, accepted_at, finished_at
FROM jobs WHERE id = %s
"""

# Leases of jobs a live worker is still sending are extended (not a state change, so no event).
RENEW_LEASES = """
UPDATE jobs SET lease_until = %s
WHERE id = ANY(%s) AND state = 'active' AND worker = %s
"""

# Results are recorded only for jobs still active under this worker and attempt; a job whose
# lease expired was handed to someone else, and its state must not be overwritten.
STILL_MINE = """
SELECT id, state, worker, attempts FROM jobs
WHERE id = ANY(%s::uuid[])
FOR UPDATE
"""
# Which of these result events are stored already (a retried write whose first commit was not seen).
EVENTS_RECORDED = "SELECT id FROM events WHERE id = ANY(%s::uuid[])"

# -- views ------------------------------------------------------------------------------------
# Read by outbound/views.py by column name (as are GET_JOB and LIST_CAMPAIGNS above): each
# column is named as the field it fills.

JOB_SUMMARIES = """
SELECT id, priority, state, email, campaign_id, attempts, last_code, failure_kind, created_at, finished_at
FROM jobs
WHERE (%(state)s::text IS NULL OR state = %(state)s::text)
  AND (%(priority)s::text IS NULL OR priority = %(priority)s::text)
  AND (%(campaign)s::uuid IS NULL OR campaign_id = %(campaign)s::uuid)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""

# A prefix of a job id is the range of ids from prefix-000... to prefix-fff... (uuids sort by
# their bytes), so the primary key answers it. Two rows are enough to call a prefix ambiguous.
JOBS_IN_ID_RANGE = "SELECT id FROM jobs WHERE id BETWEEN %(low)s::uuid AND %(high)s::uuid ORDER BY id LIMIT 2"

# Per priority: jobs by state, how long the oldest waiting job has waited, and the latency
# (created -> accepted) of the last hour's accepted jobs. Waiting means work the pipeline owes
# now: queued, waiting to retry, or pending and due - jobs of a campaign that is not running
# (paused, cancelled) are not owed. A pending job waits from its due time, others from creation.
QUEUE_LOAD = """
SELECT priority,
       count(*) FILTER (WHERE state = 'pending') AS pending,
       count(*) FILTER (WHERE state = 'retry') AS retry,
       count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'active') AS active,
       count(*) FILTER (WHERE state = 'completed') AS completed,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       extract(epoch FROM now() - min(created_at) FILTER (WHERE state IN ('pending', 'queued', 'active', 'retry')))
           AS oldest_unfinished_s,
       extract(epoch FROM now() - min(CASE WHEN state = 'pending' THEN due_at ELSE created_at END) FILTER (
           WHERE state = 'queued'
              OR (state IN ('pending', 'retry') AND (state = 'retry' OR due_at <= now())
                  AND (campaign_id IS NULL
                       OR EXISTS (SELECT 1 FROM campaigns c WHERE c.id = jobs.campaign_id AND c.status = 'running')))))
           AS oldest_waiting_s,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - created_at))
           FILTER (WHERE accepted_at > now() - interval '1 hour') AS latency_p50_s,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - created_at))
           FILTER (WHERE accepted_at > now() - interval '1 hour') AS latency_p99_s
FROM jobs GROUP BY priority
"""

# -- feedback: what came back (feedback.py) ----------------------------------------------------

FEEDBACK_JOBS = """
SELECT j.id::text AS job_id, j.subject, j.campaign_id::text AS campaign_id, j.sender,
       coalesce(split_part(lower(s.from_email), '@', 2), '') AS domain,
       coalesce(cp.stop_on_reply, true) AS stop_on_reply
FROM jobs j
LEFT JOIN senders s ON (s.tenant, s.name) = (j.tenant, j.sender)
LEFT JOIN campaigns cp ON cp.id = j.campaign_id
WHERE j.tenant = %s AND j.id = ANY(%s::uuid[])
"""
FEEDBACK_PEOPLE = """
SELECT p.subject, c.status AS contact_status, s.reason AS suppressed
FROM unnest(%s::text[]) AS p(subject)
LEFT JOIN contacts c ON c.tenant = %s AND c.subject = p.subject
LEFT JOIN suppressions s ON s.tenant = %s AND s.subject = p.subject
"""
SOFT_BOUNCES = """
SELECT count(*) FROM feedback
WHERE tenant = %s AND subject = %s AND kind = 'bounce' AND NOT hard AND at > now() - make_interval(secs => %s)
  AND message_id <> %s
"""
FEEDBACK_KIND = "SELECT kind, reason, status, hard FROM feedback WHERE tenant = %s AND message_id = %s AND subject = %s"
ADD_FEEDBACK = """
INSERT INTO feedback (tenant, message_id, subject, job_id, campaign_id, kind, reason, status, hard, at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (tenant, message_id, subject) DO UPDATE
SET kind = excluded.kind, reason = excluded.reason, status = excluded.status, hard = excluded.hard,
    job_id = coalesce(excluded.job_id, feedback.job_id), campaign_id = coalesce(excluded.campaign_id, feedback.campaign_id)
"""
ADD_CAMPAIGN_STOP = """
INSERT INTO campaign_stops (tenant, campaign_id, subject, reason, message_id, at) VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
"""
ADD_ALERT = """
INSERT INTO deliverability_alerts (tenant, sender, domain, kind, reason, job_id, message_id, at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
"""
# A contact's jobs of a campaign that have not started: a reply stops them.
UNSENT_CONTACT_JOBS = """
SELECT id::text, attempts FROM jobs
WHERE tenant = %s AND campaign_id = %s AND subject = %s AND state IN ('pending', 'retry') ORDER BY id FOR UPDATE
"""
# What came back for a campaign, per kind: how many people.
CAMPAIGN_FEEDBACK = """
SELECT kind, hard, count(DISTINCT subject) FROM feedback WHERE campaign_id = %s GROUP BY kind, hard
"""

# -- engagement: opens and clicks (engagement.py) ----------------------------------------------

# The tracked message's job, in the tenant's scope (another tenant's job is not found), locked
# so that one message's clicks are judged one after another (the scanner rule compares them).
LOCK_TRACKED_JOB = """
SELECT id, coalesce(correlation_id, 'campaign-' || campaign_id, id::text) AS correlation_id
FROM jobs WHERE id = %s FOR NO KEY UPDATE
"""

# -- sending domains (domains.py) -------------------------------------------------------------

SENDING_DOMAIN_COLUMNS = """
domain, dkim_selector, dkim_secret::text AS dkim_secret, dkim_public_key, dkim_fingerprint, status,
last_check, last_checked_at, created_at
"""
ADD_SENDING_DOMAIN = """
INSERT INTO sending_domains (tenant, domain, dkim_selector, dkim_secret, dkim_public_key, dkim_fingerprint, created_at)
VALUES (%(tenant)s, %(domain)s, %(selector)s, %(secret)s, %(public_key)s, %(fingerprint)s, %(at)s)
"""
SET_SENDING_DOMAIN_CHECK = """
UPDATE sending_domains SET status = %(status)s, last_check = %(checks)s::jsonb, last_checked_at = %(at)s
WHERE tenant = %(tenant)s AND domain = %(domain)s
"""
REMOVE_SENDING_DOMAIN = "DELETE FROM sending_domains WHERE tenant = %(tenant)s AND domain = %(domain)s"
GET_SENDING_DOMAIN = f"SELECT {SENDING_DOMAIN_COLUMNS} FROM sending_domains WHERE domain = %s"
LOCK_SENDING_DOMAIN = f"SELECT {SENDING_DOMAIN_COLUMNS} FROM sending_domains WHERE domain = %s FOR UPDATE"
LIST_SENDING_DOMAINS = f"SELECT {SENDING_DOMAIN_COLUMNS} FROM sending_domains ORDER BY domain"
# Domains (of every tenant, for the operator) not checked for interval_s, the longest unchecked first.
DUE_SENDING_DOMAINS = """
SELECT tenant, domain FROM sending_domains
WHERE last_checked_at IS NULL OR last_checked_at < now() - make_interval(secs => %(interval_s)s)
ORDER BY last_checked_at NULLS FIRST, domain LIMIT %(limit)s
"""
# The senders whose From is at the domain (its Unicode or A-label form) and that have no DKIM key
# of their own: they sign with the domain's.
SENDERS_SIGNING_WITH_DOMAIN = """
SELECT name FROM senders
WHERE lower(split_part(from_email, '@', 2)) = ANY(%(names)s::text[]) AND dkim_secret IS NULL ORDER BY name
"""
# The sending domain's DKIM key for a sender without one (sending.load_sender).
SENDING_DOMAIN_KEY = """
SELECT dkim_selector, dkim_secret::text AS dkim_secret, dkim_public_key FROM sending_domains
WHERE tenant = coalesce(%(tenant)s, current_setting('mailflow.tenant', true)) AND domain = %(domain)s
"""
DELETE_SENDING_DOMAIN_SECRETS = (
    "DELETE FROM secrets WHERE tenant = current_setting('mailflow.tenant', true) AND owner = %s"
)

# -- contacts deleted (contacts.delete) ----------------------------------------------------------

# A deleted contact's campaign jobs that have not started, which deleting ends.
UNSENT_CAMPAIGN_JOBS_OF = """
SELECT id, attempts FROM jobs
WHERE subject = %s AND campaign_id IS NOT NULL AND state IN ('pending', 'retry') ORDER BY id FOR UPDATE
"""

# -- periodic duties (periodic.py) -----------------------------------------------------------------

DUE_PERIODIC = """
SELECT p.name, p.kind, p.priority, p.every, p.delay, p.args, p.next_due,
       coalesce(j.state NOT IN ('completed', 'failed'), false) AS running
FROM periodic p
LEFT JOIN jobs j ON j.id = p.last_job
WHERE p.enabled AND p.next_due <= %s
ORDER BY p.next_due
FOR UPDATE OF p SKIP LOCKED
"""
SET_PERIODIC_NEXT = """
UPDATE periodic SET next_due = %s, last_job = coalesce(%s::uuid, last_job), last_due = %s WHERE name = %s
"""
PERIODIC = """
SELECT p.name, p.kind, p.priority, p.every, p.delay, p.enabled, p.next_due, p.last_due,
       j.state AS last_state, j.finished_at AS last_finished_at, j.last_reply
FROM periodic p
LEFT JOIN jobs j ON j.id = p.last_job
ORDER BY p.name
"""
