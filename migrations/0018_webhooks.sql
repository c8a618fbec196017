-- Webhook endpoints (src/mailflow/inbound/webhooks.py): each tenant's URLs that receive its
-- classified inbound mail (replies, bounces, complaints, ...) as signed Standard Webhooks POSTs.
--
-- webhook_endpoints and webhook_attempts are the `webhook_endpoints` inline projection of
-- WebhookEndpointAdded / Disabled / Enabled / Removed and of every attempt (WebhookDelivered,
-- WebhookDeliveryFailed). webhook_deliveries is written by the `webhooks` consumer (one row per
-- classified event and subscribed endpoint, in the consumer's transaction) and moved by the
-- attempts' events. A delivery row names its event (position and id), never its content: the
-- body, with the personal values opened, is built when it is sent, so an erased person is in
-- no later attempt. lease_until is not from the log: the claim of one deliverer process.

CREATE TABLE webhook_endpoints (
    tenant          text NOT NULL,
    id              text NOT NULL,
    url             text NOT NULL,
    events          text[] NOT NULL,          -- bounce, delayed, complaint, auto_reply, unsubscribe, reply, other
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    disabled_reason text,
    disabled_at     timestamptz,
    secret_id       uuid NOT NULL,            -- the signing secret, in the vault (secrets table)
    fingerprint     text NOT NULL,
    failure_streak  integer NOT NULL DEFAULT 0,  -- failed attempts since the last success
    failing_since   timestamptz,              -- the first failure of the streak
    last_success_at timestamptz,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE webhook_deliveries (
    tenant         text NOT NULL,
    id             uuid NOT NULL,             -- uuid5 of (tenant, endpoint, event id): webhook-id msg_<hex>
    endpoint_id    text NOT NULL,
    event_id       uuid NOT NULL,
    event_position bigint NOT NULL,
    type           text NOT NULL,             -- reply.received, bounce.detected, ...
    state          text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed', 'cancelled')),
    attempts       integer NOT NULL DEFAULT 0,
    next_at        timestamptz NOT NULL,      -- due at (pending): created, or the retry's time
    lease_until    timestamptz,
    last_status    integer,
    last_error     text,
    created_at     timestamptz NOT NULL,
    done_at        timestamptz,
    PRIMARY KEY (tenant, id)
);
CREATE UNIQUE INDEX webhook_deliveries_event ON webhook_deliveries (tenant, endpoint_id, event_id);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (tenant, next_at) WHERE state = 'pending';

CREATE TABLE webhook_attempts (
    tenant      text NOT NULL,
    delivery_id uuid NOT NULL,
    attempt     integer NOT NULL,
    endpoint_id text NOT NULL,
    type        text NOT NULL,
    at          timestamptz NOT NULL,
    outcome     text NOT NULL,                -- done | retry | final
    status      integer,                      -- the HTTP status; NULL: no answer
    error       text,
    duration_ms integer,
    PRIMARY KEY (tenant, delivery_id, attempt)
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (tenant, endpoint_id, at);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['webhook_endpoints', 'webhook_deliveries', 'webhook_attempts'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;
