-- Inbound routes (src/mailflow/inbound/routes.py): each tenant's ordered rules for the mail to
-- its inbound domains that no mailbox takes. An inline projection of RouteAdded / RouteRemoved.

CREATE TABLE routes (
    tenant            text NOT NULL,
    id                text NOT NULL,
    -- The order routes were added in: ties in priority are tried in it. A rebuild replays
    -- the events in order and restarts the sequence, so it numbers them the same way.
    seq               bigint GENERATED ALWAYS AS IDENTITY,
    priority          integer NOT NULL,
    pattern           text NOT NULL,             -- help@d, help+*@d, *@d, or /regex/
    headers           jsonb NOT NULL DEFAULT '[]', -- [[lower-case name, regex], ...], all must match
    action            text NOT NULL CHECK (action IN ('mailbox', 'forward', 'http', 'reject', 'drop')),
    target            text NOT NULL DEFAULT '',  -- mailbox or forward address, URL, reject text
    continue_matching boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX routes_order ON routes (tenant, priority, seq);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['routes'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;
