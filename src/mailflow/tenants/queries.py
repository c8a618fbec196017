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
SELECT id, name, status, hourly_limit, daily_limit, created_at, updated_at FROM tenants WHERE id = %s
"""
LIST_TENANTS = """
SELECT t.id, t.name, t.status, t.hourly_limit, t.daily_limit, t.created_at,
       (SELECT count(*) FROM contacts c WHERE c.tenant = t.id) AS contacts,
       (SELECT count(*) FROM campaigns c WHERE c.tenant = t.id) AS campaigns,
       (SELECT count(*) FROM jobs j WHERE j.tenant = t.id AND j.state IN ('pending', 'queued', 'active', 'retry'))
           AS unfinished_jobs
FROM tenants t
WHERE %(id)s::text IS NULL OR t.id = %(id)s::text
ORDER BY t.id
"""
TENANT_STATUS = "SELECT status FROM tenants WHERE id = %s"

DELETE_TENANT_SECRETS = "DELETE FROM secrets WHERE tenant = %s"
