"""Runtime room: the SQL of `mailflow up`'s progress line and of the demo, by name, and rows() /
one() that run them and read the rows by column name.

Every demo query is scoped to one run: its campaign (`campaign_id`) and the transactional
jobs it created (`job_ids`), so a second demo in the same MAILFLOW_HOME reports only itself.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row


def rows(conn: psycopg.Connection, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def one(conn: psycopg.Connection, query: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row of a statement that always returns one (an aggregate)."""
    [row] = rows(conn, query, params)
    return row


# -- `mailflow up`: progress ------------------------------------------------------------------------

# Where counting starts: the newest event row now.
LAST_EVENT_SEQ = "SELECT coalesce(max(seq), 0) AS seq FROM events"
# Jobs finished since event row `after` (seq is the primary key: a range read of what is new).
# Approximate by design: a transaction that commits after a later one, with a smaller seq, is
# missed - it is a progress line, not a ledger.
FINISHED_SINCE = """
SELECT count(*) FILTER (WHERE type = 'JobCompleted') AS completed,
       count(*) FILTER (WHERE type = 'JobFailed') AS failed,
       coalesce(max(seq), %(after)s) AS seq
FROM events WHERE seq > %(after)s
"""
# Jobs not finished yet; each term matches one of the jobs table's partial indexes.
WAITING = """
SELECT (SELECT count(*) FROM jobs WHERE state IN ('pending', 'retry'))
     + (SELECT count(*) FROM jobs WHERE state = 'queued')
     + (SELECT count(*) FROM jobs WHERE state = 'active') AS waiting
"""

# -- the demo: one run's jobs ---------------------------------------------------------------------

_RUN = "(campaign_id = %(campaign_id)s OR id = ANY(%(job_ids)s::uuid[]))"

DEMO_FINISHED = f"SELECT count(*) AS done FROM jobs WHERE state IN ('completed', 'failed') AND {_RUN}"
DEMO_TRANSACTIONAL_STATES = "SELECT state, count(*) AS n FROM jobs WHERE id = ANY(%(job_ids)s::uuid[]) GROUP BY state"
DEMO_TRANSACTIONAL_FAILURES = """
SELECT failure_kind AS kind, count(*) AS n, min(last_reply) AS reply FROM jobs
WHERE id = ANY(%(job_ids)s::uuid[]) AND state = 'failed' GROUP BY failure_kind
"""
DEMO_TRANSACTIONAL_RETRIES = """
SELECT coalesce(sum(greatest(attempts - 1, 0)), 0) AS retries FROM jobs WHERE id = ANY(%(job_ids)s::uuid[])
"""
DEMO_ACTIVE_OF = f"SELECT count(*) AS n FROM jobs WHERE state = 'active' AND worker = %(worker)s AND {_RUN}"
DEMO_QUEUED = f"SELECT count(*) AS n FROM jobs WHERE state = 'queued' AND {_RUN}"
# Per priority: this run's jobs by state and its latency (created -> accepted by SMTP).
DEMO_LATENCY = f"""
SELECT priority,
       count(*) FILTER (WHERE state = 'completed') AS completed,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - created_at))
           FILTER (WHERE accepted_at IS NOT NULL) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM accepted_at - created_at))
           FILTER (WHERE accepted_at IS NOT NULL) AS p99
FROM jobs WHERE {_RUN} GROUP BY priority
"""

# The demo sender's relay password: its fingerprint and key, and how many events and sender
# rows hold it in the clear (none: it is only in the secrets table, encrypted).
DEMO_SENDER_SECRET = """
SELECT s.fingerprint, s.key_id,
       (SELECT count(*) FROM events e WHERE e.data::text LIKE %(password)s) AS events_with_password,
       (SELECT count(*) FROM senders d WHERE d.relay_url LIKE %(password)s) AS senders_with_password
FROM secrets s WHERE s.owner = 'sender:demo' AND s.kind = 'relay_password'
ORDER BY s.created_at DESC LIMIT 1
"""

# Rows that still name an address (any letter case), wherever the demo can look.
DEMO_ROWS_NAMING = """
SELECT (SELECT count(*) FROM events WHERE data::text ILIKE %(like)s OR stream ILIKE %(like)s)
     + (SELECT count(*) FROM contacts WHERE email ILIKE %(like)s OR attributes::text ILIKE %(like)s)
     + (SELECT count(*) FROM jobs WHERE email ILIKE %(like)s OR idempotency_key ILIKE %(like)s
                                   OR last_reply ILIKE %(like)s)
     + (SELECT count(*) FROM suppressions WHERE email ILIKE %(like)s) AS rows
"""

# Delivered messages of the campaign that the demo's peers answer (bounce, complain, reply).
DEMO_DELIVERED = """
SELECT id::text AS job_id, email FROM jobs
WHERE campaign_id = %(campaign_id)s AND state = 'completed' AND email IS NOT NULL ORDER BY id LIMIT %(n)s
"""
# What the classifier made of this run's received mail, in the order it came.
DEMO_CLASSIFIED = """
SELECT c.kind, c.job_id::text AS job_id, m.received_at FROM inbound_classifications c
JOIN inbound_messages m ON (m.tenant, m.id) = (c.tenant, c.message_id)
WHERE m.received_at >= %(since)s ORDER BY m.received_at, m.id
"""
DEMO_BOUNCES = """
SELECT job_id::text AS job_id, kind, reason, hard FROM feedback
WHERE at >= %(since)s AND job_id IS NOT NULL AND kind IN ('bounce', 'delayed', 'complaint')
"""
DEMO_WEBHOOK_DELIVERIES = "SELECT count(*) AS n FROM webhook_deliveries WHERE created_at >= %(since)s"
DEMO_CAME_BACK = """
SELECT (SELECT count(*) FROM suppressions WHERE created_at >= %(since)s) AS suppressed,
       (SELECT count(*) FROM campaign_stops WHERE campaign_id = %(campaign_id)s) AS stopped,
       (SELECT count(*) FROM deliverability_alerts WHERE at >= %(since)s) AS alerts,
       (SELECT count(*) FROM threads WHERE replies > 0 AND last_at >= %(since)s) AS threads
"""
DEMO_INBOUND_STORED = "SELECT count(*) AS n FROM inbound_messages WHERE %(mailbox)s = ANY(recipients)"

# The demo's API part: of the events of the jobs its requests created, how many carry one of
# its request ids as their correlation id.
DEMO_API_CORRELATED = """
SELECT count(*) AS events, count(*) FILTER (WHERE metadata->>'correlation_id' = ANY(%(request_ids)s)) AS correlated
FROM events
WHERE stream = ANY(SELECT tenant || '/job-' || id FROM jobs WHERE id = ANY(%(job_ids)s::uuid[]))
"""


# -- the dashboard (dashboard.py): the connection's tenant only, by row-level security -------------

# Work waiting or in flight per priority (the unfinished states only: the partial indexes).
DASHBOARD_QUEUES = """
SELECT priority, count(*) AS depth,
       extract(epoch FROM now() - min(CASE WHEN state = 'pending' THEN due_at ELSE created_at END)
               FILTER (WHERE state <> 'pending' OR due_at <= now())) AS oldest_s
FROM jobs WHERE state IN ('pending', 'retry', 'queued', 'active')
GROUP BY priority
"""
# Sent, delivered and bounced per minute over the last hour, from the raw facts.
# The last 60 minutes, from the facts projection's per-minute counts (0027_fact_minutes.sql).
DASHBOARD_MINUTES = """
SELECT minute,
       coalesce(sum(n_unique) FILTER (WHERE kind = 'sent'), 0) AS sent,
       coalesce(sum(n) FILTER (WHERE kind = 'delivered'), 0) AS delivered,
       coalesce(sum(n) FILTER (WHERE kind IN ('bounced_hard', 'bounced_soft')), 0) AS bounced
FROM facts_minutes WHERE minute >= %(since)s
GROUP BY 1
"""
DASHBOARD_CAMPAIGN_NAMES = "SELECT id::text AS id, name FROM campaigns WHERE id = ANY(%(ids)s::uuid[])"
DASHBOARD_DOMAIN_TROUBLE = """
SELECT domain, status FROM sending_domains WHERE status <> 'verified' ORDER BY domain LIMIT 20
"""
