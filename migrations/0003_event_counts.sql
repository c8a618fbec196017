-- Projection event_counts: events per type per hour (read by `mailflow events stats`).

CREATE TABLE event_counts (
    type  text NOT NULL,
    hour  timestamptz NOT NULL,
    count bigint NOT NULL CHECK (count >= 0),
    PRIMARY KEY (type, hour)
);
