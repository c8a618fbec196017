-- Conversation threads (src/mailflow/inbound/threads.py decides, threads_projection.py keeps):
-- the `threads` inline projection of the classification events (BounceDetected ... OtherReceived).
-- No address and no text: people are subjects (keyed hashes), the subject line is a digest
-- keyed by the correspondent's own key, and what is shown (From, subject, a reply's text) is
-- opened from the sealed value when shown.

CREATE TABLE threads (
    tenant        text NOT NULL,
    id            uuid NOT NULL,
    mailbox       text NOT NULL DEFAULT '',   -- of its first message
    job_id        uuid,                       -- the outbound message it answers (its first message)
    correspondent text,                       -- who it is with (a subject)
    subject_key   text,                       -- the normalized subject's keyed digest
    first_at      timestamptz NOT NULL,
    last_at       timestamptz NOT NULL,
    messages      integer NOT NULL,
    replies       integer NOT NULL DEFAULT 0,
    auto_replies  integer NOT NULL DEFAULT 0,
    bounces       integer NOT NULL DEFAULT 0,
    complaints    integer NOT NULL DEFAULT 0,
    unsubscribes  integer NOT NULL DEFAULT 0,
    others        integer NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX threads_latest ON threads (tenant, last_at DESC, id);
CREATE INDEX threads_job ON threads (tenant, job_id) WHERE job_id IS NOT NULL;

-- One row per received message: what threading needs to place it again when a later message
-- links or merges threads (the projection recomputes the threads a new message touches).
CREATE TABLE thread_messages (
    tenant            text NOT NULL,
    message_id        uuid NOT NULL,             -- the received message (MessageReceived)
    thread_id         uuid NOT NULL,
    kind              text NOT NULL,             -- reply | auto_reply | bounce | complaint | unsubscribe | other
    at                timestamptz NOT NULL,      -- when it was first classified
    mailbox           text NOT NULL DEFAULT '',
    job_id            uuid,
    header_message_id text NOT NULL DEFAULT '',
    in_reply_to       text NOT NULL DEFAULT '',
    refs              text[] NOT NULL DEFAULT '{}',
    correspondent     text,                      -- who the conversation is with (a bounce's: the person bounced)
    sender            text,                      -- the From's subject, whose key opens `sealed`
    subject_key       text,
    sealed            text,                      -- {"sender", "subject", "text"} under sender's key; NULL once erased
    PRIMARY KEY (tenant, message_id)
);
CREATE INDEX thread_messages_thread ON thread_messages (tenant, thread_id, at);
CREATE INDEX thread_messages_subject ON thread_messages (tenant, mailbox, correspondent, subject_key)
    WHERE subject_key IS NOT NULL;
CREATE INDEX thread_messages_job ON thread_messages (tenant, job_id) WHERE job_id IS NOT NULL;
CREATE INDEX thread_messages_people ON thread_messages (tenant, correspondent);

-- Every Message-ID a thread's messages name - their own, and those only seen in References or
-- In-Reply-To (placeholders: a parent not received, the job's own id) - so that a later
-- message that names one is placed with that thread. A job's id is in each of its threads.
CREATE TABLE thread_ids (
    tenant    text NOT NULL,
    rfc_id    text NOT NULL,
    thread_id uuid NOT NULL,
    PRIMARY KEY (tenant, rfc_id, thread_id)
);
CREATE INDEX thread_ids_thread ON thread_ids (tenant, thread_id);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['threads', 'thread_messages', 'thread_ids'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON %I USING (tenant = current_setting(''mailflow.tenant'', true)) '
                       'WITH CHECK (tenant = current_setting(''mailflow.tenant'', true))', t);
    END LOOP;
END $$;
