-- What came back: the classifier's verdict per received message (src/mailflow/inbound/
-- classifier.py) and outbound's read model of the effects (src/mailflow/outbound/feedback.py).

-- One row per received message the inbound_classifier consumer has classified: what it
-- decided (kind, and a digest of the whole verdict, so that `mailflow inbound reprocess`
-- records only what changed). Written in the consumer's own transaction with the event it
-- records: a message is classified once, however often it is redelivered or replayed.
CREATE TABLE inbound_classifications (
    tenant        text NOT NULL,
    message_id    uuid NOT NULL,
    kind          text NOT NULL,
    digest        text NOT NULL,
    job_id        uuid,
    classified_at timestamptz NOT NULL,
    PRIMARY KEY (tenant, message_id)
);
CREATE INDEX inbound_classifications_kind ON inbound_classifications (tenant, kind, classified_at);

-- The `feedback` inline projection (outbound): one row per (received message, person) that
-- a job or an address got back - a bounce, a complaint, an auto-reply, a reply, an
-- unsubscribe by mail. The per-recipient history and the campaigns' counts read it; the
-- soft-bounce rule counts its soft rows in a window.
CREATE TABLE feedback (
    tenant      text NOT NULL,
    message_id  uuid NOT NULL,
    subject     text NOT NULL,              -- the person (keyed hash of the address)
    job_id      uuid,
    campaign_id uuid,
    kind        text NOT NULL,              -- bounce | delayed | complaint | auto_reply | reply | unsubscribe
    reason      text NOT NULL DEFAULT '',
    status      text NOT NULL DEFAULT '',
    hard        boolean NOT NULL DEFAULT false,
    at          timestamptz NOT NULL,
    PRIMARY KEY (tenant, message_id, subject)
);
CREATE INDEX feedback_job ON feedback (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX feedback_campaign ON feedback (campaign_id, kind) WHERE campaign_id IS NOT NULL;
CREATE INDEX feedback_soft ON feedback (tenant, subject, at) WHERE kind = 'bounce' AND NOT hard;

-- A campaign stopped for one contact (they replied): the worker sends none of its jobs to them.
CREATE TABLE campaign_stops (
    tenant      text NOT NULL,
    campaign_id uuid NOT NULL,
    subject     text NOT NULL,
    reason      text NOT NULL,
    message_id  uuid,
    at          timestamptz NOT NULL,
    PRIMARY KEY (tenant, campaign_id, subject)
);

-- Deliverability alerts: bounces that say the sender, not the address, is the problem
-- (blocked, filtered, spamdetected, policyviolation, ...) and complaints.
CREATE TABLE deliverability_alerts (
    tenant      text NOT NULL,
    id          bigint GENERATED ALWAYS AS IDENTITY,
    sender      text NOT NULL DEFAULT '',
    domain      text NOT NULL DEFAULT '',
    kind        text NOT NULL,              -- bounce | complaint
    reason      text NOT NULL,
    job_id      uuid,
    message_id  uuid,
    at          timestamptz NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX deliverability_alerts_at ON deliverability_alerts (tenant, at);

-- Stop on reply: a campaign's contacts get nothing more from it once they reply (the default).
ALTER TABLE campaigns ADD COLUMN stop_on_reply boolean NOT NULL DEFAULT true;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['inbound_classifications', 'feedback', 'campaign_stops', 'deliverability_alerts'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;
