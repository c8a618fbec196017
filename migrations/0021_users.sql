-- Users of the browser pages, their roles per tenant, and browser sessions
-- (src/mailflow/tenants/users.py, src/mailflow/web/sessions.py; docs/users.md).
--
-- users and login_failures are the `users` inline projection of UserAdded / UserRoleChanged /
-- UserPasswordChanged / UserRemoved / UserLoggedIn / UserLoginFailed. A user is named in the
-- log by subject (the keyed hash of the address, infra/personal.py) with the address sealed
-- under the subject's key; `email` here is the opened value. login_failures counts failed
-- logins per typed address (known or not) in a window, for the login throttle.
--
-- user_passwords and web_sessions are not from the log, like secrets: an argon2 hash and a
-- session token's hash are secrets (docs/privacy.md). They are written beside the events that
-- tell of them (UserAdded, UserPasswordChanged, UserLoggedIn, SessionRevoked) in the same
-- transaction, and a projection rebuild leaves them as they are.

CREATE TABLE users (
    tenant               text NOT NULL,
    id                   uuid NOT NULL,
    subject              text NOT NULL,         -- keyed hash of the address (infra/personal.py)
    email                text,                  -- the opened address; NULL once the user is removed
    role                 text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    status               text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'removed')),
    failed_logins        integer NOT NULL DEFAULT 0,  -- every failed login since the user was added
    last_failed_login_at timestamptz,
    last_login_at        timestamptz,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    PRIMARY KEY (tenant, id)
);
-- One active user per address and tenant; a removed one may be added again.
CREATE UNIQUE INDEX users_subject ON users (tenant, subject) WHERE status = 'active';

CREATE TABLE login_failures (
    tenant            text NOT NULL,
    subject           text NOT NULL,            -- of the address typed (a user's or not)
    failures          integer NOT NULL,         -- in the window that started at window_started_at
    window_started_at timestamptz NOT NULL,
    last_failed_at    timestamptz NOT NULL,
    total             integer NOT NULL,         -- every failure since the last successful login
    PRIMARY KEY (tenant, subject)
);

CREATE TABLE user_passwords (
    tenant     text NOT NULL,
    user_id    uuid NOT NULL,
    hash       text NOT NULL,                   -- argon2id, PHC string (argon2-cffi)
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, user_id)
);

CREATE TABLE web_sessions (
    tenant       text NOT NULL,
    id           uuid NOT NULL,                 -- the session's public name (in events)
    user_id      uuid NOT NULL,
    token_hash   text NOT NULL,                 -- SHA-256 of the cookie's secret token
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,          -- the absolute end, whatever the activity
    revoked_at   timestamptz,
    last_seen_at timestamptz NOT NULL,          -- the idle timeout counts from here
    PRIMARY KEY (tenant, id)
);
CREATE UNIQUE INDEX web_sessions_token ON web_sessions (token_hash);
CREATE INDEX web_sessions_user ON web_sessions (tenant, user_id) WHERE revoked_at IS NULL;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'login_failures', 'user_passwords', 'web_sessions'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;
