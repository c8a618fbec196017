-- Inbound route actions (src/mailflow/inbound/actions.py): the http POSTs and SMTP forwards that
-- routes decided for received messages, and where each one is. An inline projection of the
-- `messages` projection: MessageRouted creates the rows (state pending), RouteActionDone and
-- RouteActionFailed move them (a failure that is not final stays pending until next_at).
-- lease_until is not from the log: the claim of one inbound process, so that two never send
-- the same action at once (a rebuild clears it: an action in flight may be sent again).

CREATE TABLE route_actions (
    tenant      text NOT NULL,
    message_id  uuid NOT NULL,
    recipient   text NOT NULL,
    action      text NOT NULL CHECK (action IN ('http', 'forward')),
    target      text NOT NULL,                 -- the URL, or the address to forward to
    route_id    text,
    captures    jsonb NOT NULL DEFAULT '{}',   -- the route's captures, for the POST's body
    state       text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    attempts    integer NOT NULL DEFAULT 0,
    next_at     timestamptz NOT NULL,          -- due at (pending): routed, or the retry's time
    last_status integer,                       -- the last attempt's HTTP status or SMTP reply code
    last_error  text,
    lease_until timestamptz,                   -- claimed by an inbound process until then
    created_at  timestamptz NOT NULL,
    done_at     timestamptz,                   -- done, or given up
    PRIMARY KEY (tenant, message_id, recipient, action, target)
);
CREATE INDEX route_actions_due ON route_actions (tenant, next_at) WHERE state = 'pending';
CREATE INDEX route_actions_message ON route_actions (message_id);

-- A tenant's webhook signing secret (routes' http POSTs, Standard Webhooks) is one row of the
-- secrets table: never two, so two processes creating it at once agree on one.
CREATE UNIQUE INDEX secrets_webhook ON secrets (tenant) WHERE kind = 'webhook_secret';

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['route_actions'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;
