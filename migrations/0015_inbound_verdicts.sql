-- Inbound mail: what mailflow found out about each message (authentication, spam score,
-- structural defects), where it went (routing, quarantine) and its state in each mailbox
-- (src/mailflow/inbound/). Every column is a projection of the message's events.

ALTER TABLE inbound_messages
    ADD COLUMN auth    jsonb,                        -- SPF, DKIM, ARC, DMARC verdicts
    ADD COLUMN spam    jsonb,                        -- score, rules, scorer, unscored
    ADD COLUMN defects text[] NOT NULL DEFAULT '{}', -- malformed: what the parser found
    ADD COLUMN routing jsonb NOT NULL DEFAULT '[]',  -- the deliveries MessageRouted decided
    ADD COLUMN reason  text;                         -- why quarantined or rejected
-- state: received -> routed | quarantined | rejected; quarantined -> routed (released) | rejected (dropped)
CREATE INDEX inbound_messages_state ON inbound_messages (tenant, state, received_at);

-- One row per message and mailbox it was delivered to (a message to two mailboxes is in both).
CREATE TABLE mailbox_messages (
    tenant       text NOT NULL,
    message_id   uuid NOT NULL,
    mailbox      text NOT NULL,
    recipient    text NOT NULL,
    route_id     text,
    delivered_at timestamptz NOT NULL,
    read_at      timestamptz,
    PRIMARY KEY (tenant, message_id, mailbox)
);
CREATE INDEX mailbox_messages_box ON mailbox_messages (tenant, mailbox, delivered_at DESC);

-- A tenant's spam thresholds (a tenant without a row has the defaults: inbound/spam.py).
CREATE TABLE inbound_thresholds (
    tenant     text PRIMARY KEY,
    quarantine double precision NOT NULL,
    reject     double precision NOT NULL,
    updated_at timestamptz NOT NULL
);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['mailbox_messages', 'inbound_thresholds'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;
