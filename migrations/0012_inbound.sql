-- Inbound mail, part 1: the domains and mailboxes mailflow receives for, the raw messages it
-- accepted, and one row per accepted message (src/mailflow/inbound/).

-- A domain is received for by one tenant (its MX points at mailflow).
CREATE TABLE inbound_domains (
    domain     text PRIMARY KEY,
    tenant     text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX inbound_domains_tenant ON inbound_domains (tenant);

-- A mailbox is one address of one tenant (at one of its domains, or any address it owns).
CREATE TABLE mailboxes (
    address    text PRIMARY KEY,
    tenant     text NOT NULL,
    name       text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL
);
CREATE INDEX mailboxes_tenant ON mailboxes (tenant);

-- Raw messages, by content hash: the store an event refers to (not a projection: the bytes
-- are not in the log). `sender_subject` is whose message it is, for erasure.
CREATE TABLE raw_messages (
    tenant         text NOT NULL,
    sha256         text NOT NULL,
    size           integer NOT NULL,
    data           bytea NOT NULL,
    sender_subject text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, sha256)
);

-- One row per accepted message and tenant (an inline projection of MessageReceived).
CREATE TABLE inbound_messages (
    id           uuid PRIMARY KEY,
    tenant       text NOT NULL,
    received_at  timestamptz NOT NULL,
    sha256       text NOT NULL,
    size         integer NOT NULL,
    recipients   text[] NOT NULL,
    sender_subject text,
    helo         text NOT NULL DEFAULT '',
    tls          boolean NOT NULL DEFAULT false,
    state        text NOT NULL DEFAULT 'received'
);
CREATE INDEX inbound_messages_tenant ON inbound_messages (tenant, received_at);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['inbound_domains', 'mailboxes', 'raw_messages', 'inbound_messages'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;
