"""Tenants room: every SQL statement of the tenants table, by name."""

# Timestamps come from the events, so a rebuild gives the same rows.
INSERT_TENANT = """
INSERT INTO tenants (id, name, created_at, updated_at) VALUES (%(id)s, %(name)s, %(at)s, %(at)s)
ON CONFLICT (id) DO NOTHING
"""
SET_STATUS = "UPDATE tenants SET status = %(status)s, updated_at = %(at)s WHERE id = %(id)s"
SET_LIMITS = """
UPDATE tenants SET hourly_limit = %(hourly)s, daily_limit = %(daily)s, updated_at = %(at)s WHERE id = %(id)s
"""
SET_TRACKING = "UPDATE tenants SET tracking = %(tracking)s, updated_at = %(at)s WHERE id = %(id)s"
# The default tenant exists without an event (migration 0007 made it); a rebuild puts it back
# first, as it was made: in the migration's transaction, whose start is its applied_at.
SEED_DEFAULT = """
INSERT INTO tenants (id, name, created_at, updated_at)
SELECT 'default', 'default', t, t
FROM coalesce((SELECT applied_at FROM schema_migrations WHERE name = '0007_tenants.sql'), now()) AS t
ON CONFLICT (id) DO NOTHING
"""

LOCK_TENANT = "SELECT id, status FROM tenants WHERE id = %s FOR UPDATE"
GET_TENANT = """
SELECT id, name, status, hourly_limit, daily_limit, tracking, created_at, updated_at FROM tenants WHERE id = %s
"""
LIST_TENANTS = """
SELECT t.id, t.name, t.status, t.hourly_limit, t.daily_limit, t.tracking, t.created_at,
       (SELECT count(*) FROM contacts c WHERE c.tenant = t.id) AS contacts,
       (SELECT count(*) FROM campaigns c WHERE c.tenant = t.id) AS campaigns,
       (SELECT count(*) FROM jobs j WHERE j.tenant = t.id AND j.state IN ('pending', 'queued', 'active', 'retry'))
           AS unfinished_jobs
FROM tenants t
WHERE %(id)s::text IS NULL OR t.id = %(id)s::text
ORDER BY t.id
"""
TENANT_STATUS = "SELECT status FROM tenants WHERE id = %s"
TENANT_TRACKING = "SELECT tracking FROM tenants WHERE id = %s"

DELETE_TENANT_SECRETS = "DELETE FROM secrets WHERE tenant = %s"

# -- API keys (tenants/keys.py) --------------------------------------------------------------

INSERT_KEY = """
INSERT INTO api_keys (tenant, id, name, scopes, networks, expires_at, created_at, created_by)
VALUES (%(tenant)s, %(id)s, %(name)s, %(scopes)s, %(networks)s::cidr[], %(expires_at)s, %(at)s, %(created_by)s)
ON CONFLICT DO NOTHING
"""
INSERT_KEY_HASH = "INSERT INTO api_key_hashes (tenant, id, hash) VALUES (%(tenant)s, %(id)s, %(hash)s)"
REVOKE_KEY = "UPDATE api_keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL"
LOCK_KEY = "SELECT revoked_at FROM api_keys WHERE id = %s FOR UPDATE"
LIST_KEYS = """
SELECT id, name, scopes, networks, expires_at, created_at, created_by, revoked_at, last_used_at
FROM api_keys WHERE %(id)s::text IS NULL OR id = %(id)s
ORDER BY created_at, id
"""
# An operator's lookup: the key names its tenant.
KEY_FOR_AUTH = """
SELECT k.tenant, k.id, k.scopes, k.networks, k.expires_at, k.revoked_at, h.hash
FROM api_keys k JOIN api_key_hashes h USING (tenant, id)
WHERE k.id = %s
"""
TOUCH_KEY = "UPDATE api_keys SET last_used_at = now() WHERE id = %s"

# -- users of the browser pages and their sessions (tenants/users.py) ------------------------
# The users projection: timestamps from the events, tenant named (a rebuild runs as operator).

INSERT_USER = """
INSERT INTO users (tenant, id, subject, email, role, created_at, updated_at)
VALUES (%(tenant)s, %(id)s, %(subject)s, %(email)s, %(role)s, %(at)s, %(at)s)
ON CONFLICT (tenant, id) DO NOTHING
"""
SET_USER_ROLE = "UPDATE users SET role = %(role)s, updated_at = %(at)s WHERE tenant = %(tenant)s AND id = %(id)s"
TOUCH_USER = "UPDATE users SET updated_at = %(at)s WHERE tenant = %(tenant)s AND id = %(id)s"
# A removed user's row stays (its counts are history), without the address.
REMOVE_USER = """
UPDATE users SET status = 'removed', email = NULL, updated_at = %(at)s WHERE tenant = %(tenant)s AND id = %(id)s
"""
USER_LOGGED_IN = "UPDATE users SET last_login_at = %(at)s WHERE tenant = %(tenant)s AND id = %(id)s"
CLEAR_LOGIN_FAILURES = "DELETE FROM login_failures WHERE tenant = %(tenant)s AND subject = %(subject)s"
USER_LOGIN_FAILED = """
UPDATE users SET failed_logins = failed_logins + 1, last_failed_login_at = %(at)s
WHERE tenant = %(tenant)s AND id = %(id)s
"""
# Failures counted in a window that starts at the first failure; one that comes after the
# window is over starts the next window.
COUNT_LOGIN_FAILURE = """
INSERT INTO login_failures AS f (tenant, subject, failures, window_started_at, last_failed_at, total)
VALUES (%(tenant)s, %(subject)s, 1, %(at)s, %(at)s, 1)
ON CONFLICT (tenant, subject) DO UPDATE SET
    failures = CASE WHEN f.window_started_at + %(window)s <= EXCLUDED.last_failed_at THEN 1 ELSE f.failures + 1 END,
    window_started_at = CASE WHEN f.window_started_at + %(window)s <= EXCLUDED.last_failed_at
                             THEN EXCLUDED.last_failed_at ELSE f.window_started_at END,
    last_failed_at = EXCLUDED.last_failed_at,
    total = f.total + 1
"""

# Commands, in the tenant's scope (row-level security keeps them to its rows).
LOCK_USER = """
SELECT id, role, created_at FROM users WHERE subject = %s AND status = 'active' FOR UPDATE
"""
COUNT_OWNERS = "SELECT count(*) AS owners FROM users WHERE role = 'owner' AND status = 'active'"
PUT_PASSWORD = """
INSERT INTO user_passwords (tenant, user_id, hash, updated_at) VALUES (%(tenant)s, %(id)s, %(hash)s, now())
ON CONFLICT (tenant, user_id) DO UPDATE SET hash = EXCLUDED.hash, updated_at = EXCLUDED.updated_at
"""
# A rehash (new argon2 parameters) of the hash that was just verified, unless it changed meanwhile.
REHASH_PASSWORD = """
UPDATE user_passwords SET hash = %(new)s, updated_at = now() WHERE user_id = %(id)s AND hash = %(old)s
"""
DELETE_PASSWORD = "DELETE FROM user_passwords WHERE user_id = %s"
LIST_USERS = """
SELECT u.id::text AS id, u.email, u.role, u.status, u.failed_logins, u.last_failed_login_at, u.last_login_at,
       u.created_at, u.updated_at,
       (SELECT count(*) FROM web_sessions s
        WHERE s.user_id = u.id AND s.revoked_at IS NULL AND s.expires_at > now()) AS sessions
FROM users u
WHERE %(all)s OR u.status = 'active'
ORDER BY u.status, u.email NULLS LAST, u.created_at
"""
# Failed logins for addresses that are no active user's (guesses), since their last success.
UNKNOWN_LOGIN_FAILURES = """
SELECT coalesce(sum(f.total), 0) AS failures FROM login_failures f
WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.subject = f.subject AND u.status = 'active')
"""
TENANT_FOR_LOGIN = "SELECT status FROM tenants WHERE id = %s"
LOGIN_CANDIDATE = """
SELECT u.id::text AS id, u.email, u.role, p.hash
FROM users u LEFT JOIN user_passwords p ON p.user_id = u.id
WHERE u.subject = %s AND u.status = 'active'
"""
# The same, locked, in the transaction that records the login (a removal or a new password
# locks the row too, so the login sees the outcome).
LOGIN_CANDIDATE_LOCKED = """
SELECT u.id::text AS id, p.hash
FROM users u LEFT JOIN user_passwords p ON p.user_id = u.id
WHERE u.subject = %s AND u.status = 'active'
FOR UPDATE OF u
"""
# With the database's clock, the one the failures' times come from.
LOGIN_THROTTLE = """
SELECT f.failures, f.window_started_at, now() AS now
FROM (SELECT 1) AS one LEFT JOIN login_failures f ON f.subject = %s
"""

INSERT_SESSION = """
INSERT INTO web_sessions (tenant, id, user_id, token_hash, created_at, expires_at, last_seen_at)
VALUES (%(tenant)s, %(id)s, %(user_id)s, %(token_hash)s, %(at)s, %(expires_at)s, %(at)s)
"""
SESSION_BY_TOKEN = """
SELECT s.id::text AS id, s.user_id::text AS user_id, s.created_at, s.expires_at, s.revoked_at, s.last_seen_at,
       u.email, u.role, u.status
FROM web_sessions s JOIN users u ON u.id = s.user_id
WHERE s.token_hash = %s
"""
# last_seen_at is written at most once per `every` (a page load is not a write each time).
TOUCH_SESSION = """
UPDATE web_sessions SET last_seen_at = %(at)s WHERE id = %(id)s AND last_seen_at < %(at)s - %(every)s::interval
"""
REVOKE_SESSION = """
UPDATE web_sessions SET revoked_at = %(at)s WHERE id = %(id)s AND revoked_at IS NULL RETURNING user_id::text AS user_id
"""
REVOKE_USER_SESSIONS = """
UPDATE web_sessions SET revoked_at = %(at)s
WHERE user_id = %(user_id)s AND revoked_at IS NULL AND expires_at > %(at)s
RETURNING id::text AS id
"""

# Erasure (infra/personal.py on_erasure): an erased person's user, password and sessions go.
ERASE_USERS = """
WITH gone AS (
    DELETE FROM users WHERE tenant = %(tenant)s AND (%(subjects)s::text[] IS NULL OR subject = ANY(%(subjects)s::text[]))
    RETURNING id
), passwords AS (
    DELETE FROM user_passwords WHERE tenant = %(tenant)s AND user_id IN (SELECT id FROM gone)
)
DELETE FROM web_sessions WHERE tenant = %(tenant)s AND user_id IN (SELECT id FROM gone)
"""
ERASE_LOGIN_FAILURES = """
DELETE FROM login_failures WHERE tenant = %(tenant)s AND (%(subjects)s::text[] IS NULL OR subject = ANY(%(subjects)s::text[]))
"""

# Sessions that ended (expired or revoked) more than %(days)s days ago: the cleanup duty.
FORGET_ENDED_SESSIONS = """
DELETE FROM web_sessions
WHERE least(expires_at, coalesce(revoked_at, expires_at)) < now() - make_interval(days => %(days)s)
"""
