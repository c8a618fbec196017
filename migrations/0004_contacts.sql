-- Outbound: contacts, suppressions, segments and templates (read models kept in step with
-- their events in the same transaction; see src/mailflow/outbound/).

CREATE TABLE contacts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email       text NOT NULL,
    attributes  jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(attributes) = 'object'),
    status      text NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'unsubscribed', 'bounced', 'complained')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT contacts_email_key UNIQUE (email)
);
CREATE INDEX contacts_attributes ON contacts USING gin (attributes jsonb_path_ops);
CREATE INDEX contacts_status ON contacts (status);

-- Addresses never to send to, whatever their contact status says.
CREATE TABLE suppressions (
    email      text PRIMARY KEY,
    reason     text NOT NULL,
    detail     text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE segments (
    name       text PRIMARY KEY,
    filter     jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE templates (
    name       text PRIMARY KEY,
    subject    text NOT NULL,
    html       text NOT NULL DEFAULT '',
    text       text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
