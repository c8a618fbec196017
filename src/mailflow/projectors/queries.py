"""Projectors room: the named SQL of the facts projection and the analytics aggregation."""

# -- facts (facts.py) ---------------------------------------------------------------------------

# Facts are derived from the log in SQL, a batch of positions at a time: reading and decoding
# envelopes in Python cost more than everything else the projection does. A batch is the events
# with positions in (after, upto], or only `positions` among them when that is not NULL (what
# the runtime hands over live, or one event being retried). The JSON is parsed once per event
# (json_to_record); events of other types are not parsed at all.
#
# 1. The batch's send jobs go into fact_jobs (what a job's later facts are counted under; the
#    sending domain is the sender's address's, as it is when the job is first seen), and the
#    first and last times of the facts to come are returned, for the day partitions.
FACT_JOBS_OF_BATCH = """
WITH batch AS MATERIALIZED (
    SELECT p.position, e.type, e.recorded_at,
           CASE WHEN e.type = 'JobCreated' THEN e.data END AS data,
           CASE WHEN e.type = 'JobCreated' THEN e.metadata END AS metadata
    FROM event_positions p JOIN events e ON e.seq = p.seq
    WHERE p.position > %(after)s AND p.position <= %(upto)s
      AND (%(positions)s::bigint[] IS NULL OR p.position = ANY(%(positions)s::bigint[]))
), jobs AS (
    INSERT INTO fact_jobs (job_id, tenant, campaign, sender, sending_domain, domain, priority, created_at, position)
    SELECT d.job_id, m.tenant, coalesce(d.campaign_id, ''), d.sender,
           coalesce(lower(split_part(s.from_email, '@', -1)), ''), coalesce(d.domain, ''), d.priority,
           b.recorded_at, b.position
    FROM batch b
    CROSS JOIN LATERAL json_to_record(b.data) AS d(job_id uuid, kind text, campaign_id text, sender text,
                                                   domain text, priority text)
    CROSS JOIN LATERAL (SELECT coalesce(b.metadata->>'tenant', '') AS tenant) m
    LEFT JOIN senders s ON s.tenant = m.tenant AND s.name = d.sender
    WHERE b.type = 'JobCreated' AND coalesce(d.kind, 'send') = 'send'
    ON CONFLICT (job_id) DO NOTHING
)
SELECT min(recorded_at), max(recorded_at) FROM batch
WHERE type = ANY(%(types)s::text[]) AND recorded_at >= %(floor)s
"""
# 2. The batch's facts (projectors/facts.py says what each event is). A repeatable kind's fact
#    is its message's (and link's) first if it is the earliest of its key in the batch and the
#    key is not in fact_firsts yet (a window and an index probe: no join between the parts of
#    the statement, whose sizes the planner cannot know - a generic plan that guessed one row
#    each once made a batch quadratic). Facts go in skipping a position already there (a batch handed
#    over again changes nothing), and the hours of those that went in are marked dirty in the
#    same statement: a fact after the highest position marked for its hour keeps the hour's
#    watermark (`upto`: its roll-ups hold its facts up to there, readers add the rest); one
#    before it (a replayed dead letter) clears it and counts a reset (0026_partial_hours.sql);
#    those of the last day are counted per minute too (0027_fact_minutes.sql).
#    Returned: what went in, recorded since %(live)s, per (tenant, kind, human, unique), with
#    the count and the largest position - the live metric deltas (metrics.py).
FACTS_OF_BATCH = """
WITH ev AS (
    SELECT p.position, e.type, e.recorded_at AS at, coalesce(e.metadata->>'tenant', '') AS tenant, d.*
    FROM event_positions p JOIN events e ON e.seq = p.seq
    CROSS JOIN LATERAL json_to_record(e.data) AS d(job_id uuid, attempt int, kind text, reason text, hard boolean,
                                                   campaign_id text, status text, machine boolean, link int,
                                                   size int)
    WHERE p.position > %(after)s AND p.position <= %(upto)s
      AND (%(positions)s::bigint[] IS NULL OR p.position = ANY(%(positions)s::bigint[]))
      AND e.type = ANY(%(types)s::text[]) AND e.recorded_at >= %(floor)s
), typed AS (
    SELECT ev.position, ev.at, ev.tenant, ev.type, ev.job_id, ev.campaign_id, ev.link, ev.size,
        CASE ev.type
            WHEN 'JobStarted' THEN 'sent'
            WHEN 'JobCompleted' THEN 'delivered'
            WHEN 'JobFailed' THEN
                CASE WHEN ev.kind = ANY(%(refusals)s::text[]) THEN 'refused' ELSE 'failed' END
            WHEN 'JobRetryScheduled' THEN CASE WHEN ev.reason IS DISTINCT FROM 'lease_expired' THEN 'deferred' END
            WHEN 'FeedbackReceived' THEN
                CASE ev.kind
                    WHEN 'bounce' THEN CASE WHEN ev.hard THEN 'bounced_hard' ELSE 'bounced_soft' END
                    WHEN 'delayed' THEN 'delayed'
                    WHEN 'complaint' THEN 'complained'
                    WHEN 'reply' THEN 'replied'
                    WHEN 'auto_reply' THEN 'auto_replied'
                END
            WHEN 'ContactStatusChanged' THEN CASE WHEN ev.status = 'unsubscribed' THEN 'unsubscribed' END
            WHEN 'MessageOpened' THEN 'opened'
            WHEN 'LinkClicked' THEN 'clicked'
        END AS kind,
        ev.type IN ('MessageOpened', 'LinkClicked') AND coalesce(ev.machine, false) AS machine,
        CASE WHEN ev.type IN ('JobStarted', 'JobRetryScheduled') THEN ev.attempt IS NOT DISTINCT FROM 1
             ELSE true END AS once
    FROM ev
), f AS (
    SELECT t.position, t.at, t.kind, t.once, t.size, j.created_at,
        CASE WHEN t.kind <> 'unsubscribed' THEN t.job_id END AS job_id,
        CASE WHEN t.kind = 'clicked' THEN coalesce(t.link, 0) END AS link,
        NOT t.machine AS human,
        coalesce(j.tenant, t.tenant) AS tenant,
        coalesce(j.campaign, CASE WHEN t.type = 'FeedbackReceived' THEN t.campaign_id END, '') AS campaign,
        coalesce(j.sender, '') AS sender, coalesce(j.sending_domain, '') AS sending_domain,
        coalesce(j.domain, '') AS domain, coalesce(j.priority, '') AS priority,
        NOT t.machine AND t.kind <> 'unsubscribed' AND t.job_id IS NOT NULL AND t.kind = ANY(%(repeatable)s::text[])
            AS repeat
    FROM typed t
    LEFT JOIN fact_jobs j ON j.job_id = t.job_id AND t.kind <> 'unsubscribed'
    WHERE t.kind IS NOT NULL
      -- a job's own events count only under its JobCreated (not a duty's, nor one not kept)
      AND (j.job_id IS NOT NULL OR t.type NOT IN ('JobStarted', 'JobCompleted', 'JobFailed', 'JobRetryScheduled'))
), g AS (
    SELECT f.*, f.human AND f.once AS first FROM f WHERE NOT f.repeat
    UNION ALL
    SELECT f.*,
        row_number() OVER (PARTITION BY f.job_id, f.kind, f.link ORDER BY f.position) = 1
        AND NOT EXISTS (SELECT 1 FROM fact_firsts ff
                        WHERE ff.job_id = f.job_id AND ff.kind = f.kind AND ff.link = coalesce(f.link, -1))
    FROM f WHERE f.repeat
), fresh AS (
    INSERT INTO fact_firsts (job_id, kind, link, at)
    SELECT job_id, kind, coalesce(link, -1), at FROM g WHERE repeat AND first
    ON CONFLICT DO NOTHING
), added AS (
    INSERT INTO facts (at, position, tenant, campaign, sender, sending_domain, domain, priority, kind, job_id, link,
                       human, first, latency_ms, size_bytes)
    SELECT at, position, tenant, campaign, sender, sending_domain, domain, priority, kind, job_id, link, human, first,
        CASE WHEN kind = 'delivered' THEN greatest(floor(extract(epoch FROM at - created_at) * 1000), 0) END,
        CASE WHEN kind = 'delivered' THEN size END
    FROM g
    ON CONFLICT (position, at) DO NOTHING
    RETURNING at, position, tenant, kind, human, first
), minutes AS (
    INSERT INTO facts_minutes AS m (tenant, minute, kind, n, n_human, n_unique)
    SELECT tenant, date_trunc('minute', at, 'UTC'), kind,
           count(*), count(*) FILTER (WHERE human), count(*) FILTER (WHERE human AND first)
    FROM added WHERE at >= %(minutes_since)s
    GROUP BY 1, 2, 3
    ON CONFLICT (tenant, minute, kind) DO UPDATE
    SET n = m.n + excluded.n, n_human = m.n_human + excluded.n_human, n_unique = m.n_unique + excluded.n_unique
), hours AS (
    SELECT date_trunc('hour', at, 'UTC') AS hour, min(position) AS lo, max(position) AS hi FROM added GROUP BY 1
), dirty AS (
    INSERT INTO facts_dirty AS d (hour, high)
    SELECT hour, hi FROM hours
    ON CONFLICT (hour) DO UPDATE
    SET version = d.version + 1, marked_at = now(), high = greatest(d.high, excluded.high),
        upto = CASE WHEN (SELECT lo FROM hours h WHERE h.hour = excluded.hour) > coalesce(d.high, 0) THEN d.upto END,
        resets = d.resets + CASE WHEN (SELECT lo FROM hours h WHERE h.hour = excluded.hour) > coalesce(d.high, 0)
                                 THEN 0 ELSE 1 END
)
SELECT tenant, kind, human, human AND first AS uniq, count(*) AS n, max(position) AS position
FROM added WHERE at >= %(live)s
GROUP BY 1, 2, 3, 4
"""
MAKE_PARTITION = "SELECT mailflow_facts_partition(%s::date)"
DROP_PARTITIONS_BEFORE = "SELECT mailflow_facts_drop_before(%s::date)"

# A rewind: the hours of the facts it forgets (or of every aggregate) are aggregated again,
# and read from their raw facts until then (their roll-ups may hold forgotten facts).
_REWOUND = """
ON CONFLICT (hour) DO UPDATE
SET version = facts_dirty.version + 1, marked_at = now(), upto = NULL, resets = facts_dirty.resets + 1
"""
MARK_DIRTY_FROM_FACTS = (
    "INSERT INTO facts_dirty (hour) SELECT DISTINCT date_trunc('hour', at, 'UTC') FROM facts WHERE position >= %s"
    + _REWOUND
)
MARK_AGGREGATED_DIRTY = "INSERT INTO facts_dirty (hour) SELECT DISTINCT hour FROM facts_hourly" + _REWOUND
FORGET_ALL_FACTS = (
    "DELETE FROM facts",
    "DELETE FROM fact_firsts",
    "DELETE FROM fact_jobs",
    "DELETE FROM facts_minutes",
)
# ... and the per-minute counts of the facts a rewind forgets (those of kept minutes: a minute's
# facts were all counted if it was less than a day old when they came, as it still is).
FORGET_MINUTES_FROM = """
UPDATE facts_minutes m
SET n = m.n - x.n, n_human = m.n_human - x.n_human, n_unique = m.n_unique - x.n_unique
FROM (
    SELECT tenant, date_trunc('minute', at, 'UTC') AS minute, kind, count(*) AS n,
           count(*) FILTER (WHERE human) AS n_human, count(*) FILTER (WHERE human AND first) AS n_unique
    FROM facts WHERE position >= %(from)s AND at >= %(minutes_since)s
    GROUP BY 1, 2, 3
) x
WHERE m.tenant = x.tenant AND m.minute = x.minute AND m.kind = x.kind
"""
FORGET_OLD_MINUTES = "DELETE FROM facts_minutes WHERE minute < %s"
FORGET_FIRSTS_FROM = """
DELETE FROM fact_firsts ff USING facts f
WHERE f.position >= %s AND f.first AND ff.job_id = f.job_id AND ff.kind = f.kind AND ff.link = coalesce(f.link, -1)
"""
FORGET_FACTS_FROM = "DELETE FROM facts WHERE position >= %s"
FORGET_FACT_JOBS_FROM = "DELETE FROM fact_jobs WHERE position >= %s"

# -- aggregation (analytics.py) -----------------------------------------------------------------

DIRTY_HOURS = """
SELECT hour, version FROM facts_dirty
WHERE hour < %(before)s AND (%(since)s::timestamptz IS NULL OR hour >= %(since)s)
ORDER BY hour
LIMIT %(limit)s
"""
DIRTY_VERSION = "SELECT version FROM facts_dirty WHERE hour = %s FOR UPDATE"
CLEAN = "DELETE FROM facts_dirty WHERE hour = %s AND version = %s"
DELETE_HOURLY = "DELETE FROM facts_hourly WHERE hour = ANY(%s::timestamptz[])"
# The hours of one day at once: one scan of the day's facts (in time order, so the BRIN index
# narrows it to those hours), grouped by hour.
AGGREGATE_HOURS = """
WITH added AS (
    INSERT INTO facts_hourly (hour, tenant, campaign, sender, domain, kind, n, n_human, n_unique,
                              latency_ms_sum, latency_n, latency_ms_max, size_sum, upto)
    SELECT date_trunc('hour', at, 'UTC'), tenant, campaign, sender, domain, kind,
           count(*), count(*) FILTER (WHERE human), count(*) FILTER (WHERE human AND first),
           coalesce(sum(latency_ms), 0), count(latency_ms), max(latency_ms), coalesce(sum(size_bytes), 0), max(position)
    FROM facts
    WHERE at >= %(lo)s AND at < %(hi)s AND date_trunc('hour', at, 'UTC') = ANY(%(hours)s::timestamptz[])
    GROUP BY 1, tenant, campaign, sender, domain, kind
    RETURNING hour, upto
)
-- Per hour, its watermark and its resets as of the snapshot the facts were read in (one
-- statement, one snapshot): every fact of the hour up to the watermark is in the rows.
SELECT a.hour, max(a.upto) AS upto, count(*) AS rows, (SELECT d.resets FROM facts_dirty d WHERE d.hour = a.hour) AS resets
FROM added a GROUP BY a.hour
"""
# An hour left dirty after its aggregation keeps the watermark, unless a rewind came since.
MARK_PARTIAL = "UPDATE facts_dirty SET upto = %(upto)s WHERE hour = %(hour)s AND resets = %(resets)s"
DELETE_HOURLY_CUBE = "DELETE FROM facts_hourly_cube WHERE hour = ANY(%s::timestamptz[])"
CUBE_HOURS = """
INSERT INTO facts_hourly_cube (hour, tenant, dim, key, kind, n, n_human, n_unique, latency_ms_sum, latency_n, size_sum)
SELECT h.hour, h.tenant, d.dim, d.key, h.kind, sum(h.n), sum(h.n_human), sum(h.n_unique),
       sum(h.latency_ms_sum), sum(h.latency_n), sum(h.size_sum)
FROM facts_hourly h
CROSS JOIN LATERAL (VALUES ('all', ''), ('campaign', h.campaign), ('sender', h.sender), ('domain', h.domain)) AS d (dim, key)
WHERE h.hour = ANY(%s::timestamptz[])
GROUP BY h.hour, h.tenant, d.dim, d.key, h.kind
"""
DELETE_DAILY_CUBE = "DELETE FROM facts_daily_cube WHERE day = %s"
ROLL_UP_DAY_CUBE = """
INSERT INTO facts_daily_cube (day, tenant, dim, key, kind, n, n_human, n_unique, latency_ms_sum, latency_n, size_sum)
SELECT %(day)s, tenant, dim, key, kind, sum(n), sum(n_human), sum(n_unique), sum(latency_ms_sum), sum(latency_n),
       sum(size_sum)
FROM facts_hourly_cube
WHERE hour >= %(day)s AND hour < %(day)s + interval '1 day'
GROUP BY tenant, dim, key, kind
"""
DELETE_DAILY = "DELETE FROM facts_daily WHERE day = %s"
ROLL_UP_DAY = """
INSERT INTO facts_daily (day, tenant, campaign, sender, domain, kind, n, n_human, n_unique,
                         latency_ms_sum, latency_n, latency_ms_max, size_sum)
SELECT %(day)s, tenant, campaign, sender, domain, kind, sum(n), sum(n_human), sum(n_unique),
       sum(latency_ms_sum), sum(latency_n), max(latency_ms_max), sum(size_sum)
FROM facts_hourly
WHERE hour >= %(day)s AND hour < %(day)s + interval '1 day'
GROUP BY tenant, campaign, sender, domain, kind
"""
# A month moves by a day's difference (not a GROUP BY of the whole month for each day: a rebuild
# of 90 days would read every month 30 times): the day's old rows out before it is rolled up
# again, its new rows in after. The month's latency maximum is the largest seen.
MONTH_LESS_DAY = """
UPDATE facts_monthly m
SET n = m.n - d.n, n_human = m.n_human - d.n_human, n_unique = m.n_unique - d.n_unique,
    latency_ms_sum = m.latency_ms_sum - d.latency_ms_sum, latency_n = m.latency_n - d.latency_n,
    size_sum = m.size_sum - d.size_sum
FROM facts_daily d
WHERE d.day = %(day)s AND m.month = %(month)s
  AND (m.tenant, m.campaign, m.sender, m.domain, m.kind) = (d.tenant, d.campaign, d.sender, d.domain, d.kind)
"""
MONTH_PLUS_DAY = """
INSERT INTO facts_monthly AS m (month, tenant, campaign, sender, domain, kind, n, n_human, n_unique,
                                latency_ms_sum, latency_n, latency_ms_max, size_sum)
SELECT %(month)s, tenant, campaign, sender, domain, kind, n, n_human, n_unique, latency_ms_sum, latency_n,
       latency_ms_max, size_sum
FROM facts_daily WHERE day = %(day)s
ON CONFLICT (month, tenant, campaign, sender, domain, kind) DO UPDATE
SET n = m.n + excluded.n, n_human = m.n_human + excluded.n_human, n_unique = m.n_unique + excluded.n_unique,
    latency_ms_sum = m.latency_ms_sum + excluded.latency_ms_sum, latency_n = m.latency_n + excluded.latency_n,
    latency_ms_max = greatest(m.latency_ms_max, excluded.latency_ms_max), size_sum = m.size_sum + excluded.size_sum
"""
DROP_EMPTY_MONTH_ROWS = "DELETE FROM facts_monthly WHERE month = %s AND n = 0"
# The same for the narrow roll-ups: the day's old cube rows out of its month, its new ones in.
MONTH_CUBE_LESS_DAY = """
UPDATE facts_monthly_cube m
SET n = m.n - d.n, n_human = m.n_human - d.n_human, n_unique = m.n_unique - d.n_unique,
    latency_ms_sum = m.latency_ms_sum - d.latency_ms_sum, latency_n = m.latency_n - d.latency_n,
    size_sum = m.size_sum - d.size_sum
FROM facts_daily_cube d
WHERE d.day = %(day)s AND m.month = %(month)s
  AND (m.tenant, m.dim, m.key, m.kind) = (d.tenant, d.dim, d.key, d.kind)
"""
MONTH_CUBE_PLUS_DAY = """
INSERT INTO facts_monthly_cube AS m (month, tenant, dim, key, kind, n, n_human, n_unique, latency_ms_sum, latency_n,
                                     size_sum)
SELECT %(month)s, tenant, dim, key, kind, n, n_human, n_unique, latency_ms_sum, latency_n, size_sum
FROM facts_daily_cube WHERE day = %(day)s
ON CONFLICT (tenant, dim, month, key, kind) DO UPDATE
SET n = m.n + excluded.n, n_human = m.n_human + excluded.n_human, n_unique = m.n_unique + excluded.n_unique,
    latency_ms_sum = m.latency_ms_sum + excluded.latency_ms_sum, latency_n = m.latency_n + excluded.latency_n,
    size_sum = m.size_sum + excluded.size_sum
"""
DROP_EMPTY_MONTH_CUBE_ROWS = "DELETE FROM facts_monthly_cube WHERE month = %s AND n = 0"
FACT_HOURS_SINCE = """
INSERT INTO facts_dirty (hour)
SELECT DISTINCT date_trunc('hour', at, 'UTC') FROM facts WHERE at >= %(since)s
UNION SELECT hour FROM facts_hourly WHERE hour >= %(since)s
ON CONFLICT (hour) DO UPDATE SET version = facts_dirty.version + 1, marked_at = now()
"""

# Retention of the raw facts' bookkeeping (the facts themselves go with their partitions).
RETENTION = {
    "fact_jobs": "DELETE FROM fact_jobs WHERE created_at < %s",
    "fact_firsts": "DELETE FROM fact_firsts WHERE at < %s",
    "facts_dirty": "DELETE FROM facts_dirty WHERE hour < %s",
    "facts_hourly": "DELETE FROM facts_hourly WHERE hour < %s",
    "facts_hourly_cube": "DELETE FROM facts_hourly_cube WHERE hour < %s",
}

# -- reading (analytics.series) -----------------------------------------------------------------
# Each returns, per bucket, group key (%(grp)s: campaign | sender | domain | '') and kind:
# n, human, uniq, latency_ms_sum, latency_n. A bucket's clean part comes from its own level, the
# part holding dirty hours from the level below, down to the raw facts of the dirty hours.

_FILTERS = """
      AND (%(campaign)s::text IS NULL OR {t}.campaign = %(campaign)s)
      AND (%(sender)s::text IS NULL OR {t}.sender = %(sender)s)
      AND (%(domain)s::text IS NULL OR {t}.domain = %(domain)s)"""
_KEY = "CASE %(grp)s WHEN 'campaign' THEN {t}.campaign WHEN 'sender' THEN {t}.sender WHEN 'domain' THEN {t}.domain ELSE '' END"
_AGG = "{t}.kind, {t}.n, {t}.n_human, {t}.n_unique, {t}.latency_ms_sum, {t}.latency_n"
_RAW = "f.kind, 1, f.human::int, (f.human AND f.first)::int, coalesce(f.latency_ms, 0), (f.latency_ms IS NOT NULL)::int"
_SUM = """
SELECT bucket, key, kind, sum(n)::bigint AS n, sum(human)::bigint AS human, sum(uniq)::bigint AS uniq,
       sum(latency_ms_sum)::bigint AS latency_ms_sum, sum(latency_n)::bigint AS latency_n
FROM ({parts}) AS x (bucket, key, kind, n, human, uniq, latency_ms_sum, latency_n)
GROUP BY bucket, key, kind
ORDER BY bucket, key, kind
"""
# A dirty hour with a watermark (upto) is read from its roll-ups plus its raw facts after upto;
# one without, from its raw facts alone.
_DIRTY = "dirty AS (SELECT hour, upto FROM facts_dirty WHERE hour >= %(since)s AND hour < %(until)s)"
# The raw part's range (the dirty hours', within the window) comes as parameters: partitions
# outside it are pruned before the join, not scanned for it.
DIRTY_RANGE = """
SELECT min(hour) AS lo, max(hour) + interval '1 hour' AS hi
FROM facts_dirty WHERE hour >= %(since)s AND hour < %(until)s
"""


def _dirty_raw(until: str) -> str:
    """The dirty hours' raw facts from %(raw_since)s to %(<until>)s, as `f`: all of an hour
    without a watermark (found by time), only those after it of one with (found by position:
    the newest few, where a scan by time would read a busy hour to keep none of it)."""
    return f"""(
        SELECT f.* FROM dirty d JOIN facts f ON f.at >= d.hour AND f.at < d.hour + interval '1 hour'
        WHERE d.upto IS NULL AND f.at >= %(raw_since)s AND f.at < %({until})s
        UNION ALL
        SELECT f.* FROM dirty d
        JOIN facts f ON f.position > d.upto AND f.at >= d.hour AND f.at < d.hour + interval '1 hour'
        WHERE d.upto IS NOT NULL AND f.at >= %(raw_since)s AND f.at < %({until})s
    ) f"""


def _part(select: str, t: str) -> str:
    return select.format(key=_KEY.format(t=t), agg=_AGG.format(t=t), filters=_FILTERS.format(t=t))


_RAW_PART = (
    """
    SELECT date_trunc('{unit}', f.at, 'UTC'), {key}, """
    + _RAW
    + """
    FROM """
    + _dirty_raw("raw_until")
    + """
    WHERE true{filters}"""
)

SERIES_BY_HOUR = (
    "WITH "
    + _DIRTY
    + _SUM.format(
        parts=_part(
            """
    SELECT h.hour, {key}, {agg} FROM facts_hourly h
    WHERE h.hour >= %(since)s AND h.hour < %(until)s
      AND NOT EXISTS (SELECT 1 FROM dirty d WHERE d.hour = h.hour AND d.upto IS NULL){filters}""",
            "h",
        )
        + "\n    UNION ALL"
        + _part(_RAW_PART.replace("{unit}", "hour"), "f")
    )
)

SERIES_BY_DAY = (
    "WITH "
    + _DIRTY
    + ", dirty_days AS (SELECT DISTINCT date_trunc('day', hour, 'UTC') AS day FROM dirty)"
    + _SUM.format(
        parts=_part(
            """
    SELECT a.day, {key}, {agg} FROM facts_daily a
    WHERE a.day >= %(since)s AND a.day < %(until)s
      AND NOT EXISTS (SELECT 1 FROM dirty_days x WHERE x.day = a.day){filters}""",
            "a",
        )
        + "\n    UNION ALL"
        + _part(
            """
    SELECT x.day, {key}, {agg} FROM dirty_days x
    JOIN facts_hourly h ON h.hour >= x.day AND h.hour < x.day + interval '1 day'
    WHERE h.hour >= %(raw_day)s AND h.hour < %(raw_day_until)s AND NOT EXISTS (SELECT 1 FROM dirty d WHERE d.hour = h.hour AND d.upto IS NULL){filters}""",
            "h",
        )
        + "\n    UNION ALL"
        + _part(_RAW_PART.replace("{unit}", "day"), "f")
    )
)

SERIES_BY_MONTH = (
    "WITH "
    + _DIRTY
    + ", dirty_days AS (SELECT DISTINCT date_trunc('day', hour, 'UTC') AS day FROM dirty)"
    + ", dirty_months AS (SELECT DISTINCT date_trunc('month', hour, 'UTC') AS month FROM dirty)"
    + _SUM.format(
        parts=_part(
            """
    SELECT m.month, {key}, {agg} FROM facts_monthly m
    WHERE m.month >= %(since)s AND m.month < %(until)s
      AND NOT EXISTS (SELECT 1 FROM dirty_months x WHERE x.month = m.month){filters}""",
            "m",
        )
        + "\n    UNION ALL"
        + _part(
            """
    SELECT x.month, {key}, {agg} FROM dirty_months x
    JOIN facts_daily a ON a.day >= x.month AND a.day < x.month + interval '1 month'
    WHERE a.day >= %(raw_month)s AND a.day < %(raw_month_until)s AND NOT EXISTS (SELECT 1 FROM dirty_days y WHERE y.day = a.day){filters}""",
            "a",
        )
        + "\n    UNION ALL"
        + _part(
            """
    SELECT date_trunc('month', x.day, 'UTC'), {key}, {agg} FROM dirty_days x
    JOIN facts_hourly h ON h.hour >= x.day AND h.hour < x.day + interval '1 day'
    WHERE h.hour >= %(raw_day)s AND h.hour < %(raw_day_until)s AND NOT EXISTS (SELECT 1 FROM dirty d WHERE d.hour = h.hour AND d.upto IS NULL){filters}""",
            "h",
        )
        + "\n    UNION ALL"
        + _part(_RAW_PART.replace("{unit}", "month"), "f")
    )
)


# The same reads from the narrow roll-ups, for one dimension (%(dim)s: all | campaign | sender |
# domain) and, if %(key)s is not NULL, one value of it. %(per_bucket)s false: totals per key
# (the breakdowns), bucket NULL.
_CUBE_FILTER = " AND {t}.dim = %(dim)s AND (%(key)s::text IS NULL OR {t}.key = %(key)s)"
_CUBE_AGG = "{t}.key, {t}.kind, {t}.n, {t}.n_human, {t}.n_unique, {t}.latency_ms_sum, {t}.latency_n"
_RAW_KEY = (
    "CASE %(dim)s WHEN 'campaign' THEN f.campaign WHEN 'sender' THEN f.sender WHEN 'domain' THEN f.domain ELSE '' END"
)
_CUBE_RAW = (
    """
    SELECT date_trunc('{unit}', f.at, 'UTC'), """
    + _RAW_KEY
    + ", "
    + _RAW
    + """
    FROM """
    + _dirty_raw("fact_until")
    + """
    WHERE (%(key)s::text IS NULL OR """
    + _RAW_KEY
    + " = %(key)s)"
)
_CUBE_SUM = """
SELECT CASE WHEN %(per_bucket)s THEN bucket END AS bucket, key, kind, sum(n)::bigint AS n, sum(human)::bigint AS human,
       sum(uniq)::bigint AS uniq, sum(latency_ms_sum)::bigint AS latency_ms_sum, sum(latency_n)::bigint AS latency_n
FROM ({parts}) AS x (bucket, key, kind, n, human, uniq, latency_ms_sum, latency_n)
GROUP BY 1, key, kind
ORDER BY 1, key, kind
"""


def _cube(select: str, t: str) -> str:
    return select.format(agg=_CUBE_AGG.format(t=t), filters=_CUBE_FILTER.format(t=t))


# The dirty hours' raw facts of a range, grouped once for every dimension (a dashboard
# snapshot's reads share them instead of each scanning the busy current hour): per hour, dim,
# key and kind, the measures of _RAW.
DIRTY_FACTS_CUBE = (
    """
WITH dirty AS (SELECT hour, upto FROM facts_dirty WHERE hour >= %(since)s AND hour < %(until)s)
SELECT date_trunc('hour', f.at, 'UTC') AS hour,
       CASE WHEN GROUPING(f.campaign) = 0 THEN 'campaign' WHEN GROUPING(f.sender) = 0 THEN 'sender'
            WHEN GROUPING(f.domain) = 0 THEN 'domain' ELSE 'all' END AS dim,
       coalesce(f.campaign, f.sender, f.domain, '') AS key, f.kind,
       count(*) AS n, count(*) FILTER (WHERE f.human) AS human, count(*) FILTER (WHERE f.human AND f.first) AS uniq,
       coalesce(sum(f.latency_ms), 0) AS latency_ms_sum, count(f.latency_ms) AS latency_n
FROM """
    + _dirty_raw("raw_until")
    + """
GROUP BY 1, f.kind, GROUPING SETS ((), (f.campaign), (f.sender), (f.domain))
"""
)

CUBE_BY_HOUR = (
    "WITH "
    + _DIRTY
    + _CUBE_SUM.format(
        parts=_cube(
            """
    SELECT c.hour, {agg} FROM facts_hourly_cube c
    WHERE c.hour >= %(since)s AND c.hour < %(until)s
      AND NOT EXISTS (SELECT 1 FROM dirty d WHERE d.hour = c.hour AND d.upto IS NULL){filters}""",
            "c",
        )
        + "\n    UNION ALL"
        + _CUBE_RAW.replace("{unit}", "hour")
    )
)

CUBE_BY_DAY = (
    "WITH "
    + _DIRTY
    + ", dirty_days AS (SELECT DISTINCT date_trunc('day', hour, 'UTC') AS day FROM dirty)"
    # Totals over a range (per_bucket false) take the whole months in [%(whole_since)s,
    # %(whole_until)s) from the monthly roll-up and only the days around them from the daily one
    # (analytics.series leaves that range empty when a dirty hour lies in it).
    + _CUBE_SUM.format(
        parts=_cube(
            """
    SELECT c.month, {agg} FROM facts_monthly_cube c
    WHERE c.month >= %(whole_since)s AND c.month < %(whole_until)s{filters}""",
            "c",
        )
        + "\n    UNION ALL"
        + _cube(
            """
    SELECT c.day, {agg} FROM facts_daily_cube c
    WHERE c.day >= %(since)s AND c.day < %(until)s
      AND (c.day < %(whole_since)s OR c.day >= %(whole_until)s)
      AND NOT EXISTS (SELECT 1 FROM dirty_days x WHERE x.day = c.day){filters}""",
            "c",
        )
        + "\n    UNION ALL"
        + _cube(
            """
    SELECT x.day, {agg} FROM dirty_days x
    JOIN facts_hourly_cube c ON c.hour >= x.day AND c.hour < x.day + interval '1 day'
    WHERE c.hour >= %(raw_day)s AND c.hour < %(raw_day_until)s AND NOT EXISTS (SELECT 1 FROM dirty d WHERE d.hour = c.hour AND d.upto IS NULL){filters}""",
            "c",
        )
        + "\n    UNION ALL"
        + _CUBE_RAW.replace("{unit}", "day")
    )
)
