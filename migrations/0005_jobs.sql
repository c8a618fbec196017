-- Outbound: senders, campaigns and jobs (one job per recipient message).
-- Every change to a job is a JobXxx event on stream job-<id>, applied to this table in the
-- same transaction (src/mailflow/projectors/jobs.py).

CREATE TABLE senders (
    name          text PRIMARY KEY,
    from_email    text NOT NULL,
    from_name     text NOT NULL DEFAULT '',
    relay_url     text NOT NULL,
    dkim_selector text,
    dkim_key_pem  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE campaigns (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    sender       text NOT NULL,
    template     text NOT NULL,
    segment      text NOT NULL,
    status       text NOT NULL DEFAULT 'draft'
                 CHECK (status IN ('draft', 'scheduled', 'running', 'paused', 'completed', 'cancelled')),
    scheduled_at timestamptz,
    started_at   timestamptz,
    finished_at  timestamptz,
    recipients   integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE job_queue_seq;

CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    idempotency_key text NOT NULL CONSTRAINT jobs_idempotency_key UNIQUE,
    priority        text NOT NULL CHECK (priority IN ('high', 'normal', 'low')),
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'queued', 'active', 'completed', 'failed', 'retry')),
    campaign_id     uuid,
    email           text NOT NULL,
    domain          text NOT NULL,
    sender          text NOT NULL,
    template        text NOT NULL,
    variables       jsonb NOT NULL DEFAULT '{}',
    attempts        integer NOT NULL DEFAULT 0,
    due_at          timestamptz NOT NULL DEFAULT now(),
    queue_seq       bigint,
    lease_until     timestamptz,
    worker          text,
    last_code       integer,
    last_reply      text,
    failure_kind    text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    queued_at       timestamptz,
    started_at      timestamptz,
    accepted_at     timestamptz,
    finished_at     timestamptz
);
CREATE INDEX jobs_due ON jobs (priority, due_at) WHERE state IN ('pending', 'retry');
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE state = 'active';
CREATE INDEX jobs_queued ON jobs (priority, queue_seq) WHERE state = 'queued';
CREATE INDEX jobs_campaign ON jobs (campaign_id, state);
