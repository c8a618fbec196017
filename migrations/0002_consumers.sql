-- Consumer runtime: checkpoints stored with projection writes, and dead letters.

CREATE TABLE consumer_checkpoints (
    consumer   text PRIMARY KEY,
    position   bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Entries a consumer gave up on. PostgreSQL is the truth; mailflow:dlq:<consumer>
-- in Redis mirrors the open ones for integrators.
CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer    text NOT NULL,
    -- An event the consumer could not apply: its position, id and type.
    position    bigint,
    event_id    uuid,
    event_type  text,
    -- A stream entry that was not a valid envelope (not written by the relay): as received.
    entry_id    text,
    entry       jsonb,
    attempts    integer NOT NULL,
    error       text NOT NULL,
    status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'retried', 'dropped')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    CHECK ((position IS NOT NULL AND event_id IS NOT NULL AND event_type IS NOT NULL) OR entry_id IS NOT NULL),
    UNIQUE (consumer, position)
);
CREATE INDEX dead_letters_open ON dead_letters (consumer, position) WHERE status = 'open';

-- Failed attempts not yet dead-lettered, so a crash loop still counts toward the limit.
CREATE TABLE consumer_failures (
    consumer   text NOT NULL,
    position   bigint NOT NULL,
    attempts   integer NOT NULL,
    last_error text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, position)
);
