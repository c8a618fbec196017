-- Open and click tracking (docs/tracking.md; src/mailflow/mail/tracking.py, web/tracking.py).
-- Opt-in: a tenant's default (off until `mailflow tenants tracking TENANT on`), and per
-- campaign true / false / NULL (NULL: the tenant's default, read when each message is sent).
-- Transactional mail is never tracked. Nothing about a message's links is stored: the pixel's
-- and each link's signed token carry what the web side needs.
ALTER TABLE tenants ADD COLUMN tracking boolean NOT NULL DEFAULT false;
ALTER TABLE campaigns ADD COLUMN tracking boolean;
