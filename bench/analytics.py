"""Analytics benchmark: facts from events, the hourly aggregation, the dashboard's queries.

Run `python bench/analytics.py --json` (one JSON object on stdout; progress on stderr) against
the servers MAILFLOW_DATABASE_URL and MAILFLOW_REDIS_URL point to, or the embedded default. It
creates its own database (dropped at the end unless --keep) and measures:

1. `facts_ingest_per_s`: the `facts` projection rebuilt over a log of --ingest-events events of
   a realistic mix (per message: JobCreated, JobQueued, JobStarted, JobCompleted; some retries,
   bounces, complaints, replies, opens and clicks), by the consumer runtime as `mailflow
   projections rebuild facts` runs it: events read from PostgreSQL -> fact rows committed.
2. `aggregate_hour_s`: one hour holding --hour-facts facts (1,000,000) aggregated by the
   `aggregate` job's code (hourly rows, the day's and month's roll-ups).
3. `dashboard_p99_ms`: --dashboard-facts facts (10,000,000) spread over 90 days, aggregated,
   then the dashboard's snapshot (runtime/dashboard.py: counters, today, last 60 minutes,
   queues, the chart, the breakdowns by campaign, sender and recipient domain, the warnings)
   for the busiest tenant, on that tenant's connection, for each range the page offers
   (24h by hour, 7d by hour, 30d by day, 90d by day), --dashboard-rounds times each.

4. `live_latency_p99_ms`: event committed -> the number changed in a real browser page. `mailflow
   web`, the relay and the facts consumer run as processes; Debian's headless Chromium (through
   ChromeDriver, selenium) shows the dashboard of a logged-in user; --live-samples times, one
   message's JobCreated, JobStarted and JobCompleted are appended and the time from the append's
   return to the page's delivered counter changing (a MutationObserver in the page, the same
   clock) is taken.

`timescaledb` says whether the facts table is a TimescaleDB hypertable (it is when the
extension can be created) or native daily partitions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import finish, percentile, phase, rnd, say, scalar, scratch
from mailflow.config import load_settings
from mailflow.consumers.runtime import ConsumerRunner
from mailflow.events.envelope import Metadata, NewEvent
from mailflow.events.registry import registry
from mailflow.infra.services import connect
from mailflow.infra.tenancy import Scope
from mailflow.projectors import analytics
from mailflow.projectors.facts import Facts
from mailflow.runtime import dashboard
from mailflow.runtime.wiring import Runtime

GOALS = {
    "facts_ingest_per_s": (">=", 50_000.0),
    "aggregate_hour_s": ("<", 10.0),
    "dashboard_p99_ms": ("<", 100.0),
    "live_latency_p99_ms": ("<", 1000.0),
}
TENANT = "bench"


@dataclass
class Params:
    ingest_events: int = 300_000
    hour_facts: int = 1_000_000
    dashboard_facts: int = 10_000_000
    dashboard_days: int = 90
    dashboard_rounds: int = 30
    campaigns: int = 30
    domains: int = 300
    live_samples: int = 60
    live_gap_s: float = 0.4

    @classmethod
    def quick(cls) -> Params:
        return cls(
            ingest_events=30_000, hour_facts=100_000, dashboard_facts=300_000, dashboard_rounds=5, live_samples=15
        )


# -- 1. events -> facts ---------------------------------------------------------------------------


def message_events(i: int, campaigns: list[str], domains: int, tenant: str = TENANT) -> list[tuple[str, NewEvent]]:
    """One message's events, as the pipeline records them (every 10th retried, some feedback)."""
    job = str(uuid.uuid4())
    md = Metadata(tenant=tenant, correlation_id=job)
    stream = f"job-{job}"
    created = {
        "job_id": job,
        "idempotency_key": job,
        "priority": "normal" if i % 5 else "high",
        "subject": f"s{i}",
        "sealed": "sealed",
        "sender": f"sender{i % 4}",
        "template": "t",
        "domain": f"d{int(domains * ((i * 7919 % 1000) / 1000) ** 3)}.example",
        "campaign_id": campaigns[i % len(campaigns)] if i % 5 else None,
    }
    out = [("JobCreated", created), ("JobQueued", {"job_id": job, "queue_seq": i})]
    attempt = 1
    if i % 10 == 0:
        out += [
            ("JobStarted", {"job_id": job, "attempt": 1, "worker": "w", "lease_until": "2026-01-01T00:00:00+00:00"}),
            (
                "JobRetryScheduled",
                {"job_id": job, "attempt": 1, "reply": "451 later", "due_at": "2026-01-01T00:00:00+00:00"},
            ),
        ]
        attempt = 2
    out += [
        ("JobStarted", {"job_id": job, "attempt": attempt, "worker": "w", "lease_until": "2026-01-01T00:00:00+00:00"}),
        ("JobCompleted", {"job_id": job, "attempt": attempt, "code": 250, "reply": "250 ok", "size": 4000}),
    ]
    if i % 33 == 0:
        out.append(
            ("FeedbackReceived", {"message_id": job, "subject": f"s{i}", "job_id": job, "kind": "bounce", "hard": True})
        )
    if i % 3 == 0:
        out.append(("MessageOpened", {"job_id": job, "machine": i % 2 == 0}))
    if i % 12 == 0:
        out.append(("LinkClicked", {"job_id": job, "link": 0}))
    return [(stream, NewEvent(type=t, data=d, metadata=md, schema=registry.current_schema(t) or 1)) for t, d in out]


def bench_ingest(rt: Runtime, p: Params) -> dict[str, Any]:
    campaigns = [str(uuid.uuid4()) for _ in range(p.campaigns)]
    written, i, batch = 0, 0, []
    started = time.perf_counter()
    while written < p.ingest_events:
        batch += message_events(i, campaigns, p.domains)
        i += 1
        if len(batch) >= 2000:
            rt.store.append_many(batch)
            written += len(batch)
            batch = []
    if batch:
        rt.store.append_many(batch)
        written += len(batch)
    say(f"  {written} events of {i} messages written in {time.perf_counter() - started:.1f}s")
    rt.store.sync()
    runner = ConsumerRunner(Facts(), rt.store, rt.services.redis_url, rt.settings)
    try:
        started = time.perf_counter()
        applied = runner.rebuild(1)
        seconds = time.perf_counter() - started
    finally:
        runner.close()
    with rt.connect() as conn:
        facts = int(scalar(conn, "SELECT count(*) FROM facts"))
    return {
        "facts_ingest_per_s": rnd(applied / seconds, 0),
        "facts_ingest_events": applied,
        "facts_ingest_fact_rows": facts,
        "facts_ingest_fact_rows_per_s": rnd(facts / seconds, 0),
        "facts_ingest_s": rnd(seconds, 2),
    }


# -- 2 and 3: facts made in SQL, aggregated, read ---------------------------------------------------

# n facts at random moments within [start, start + span): the dimensions skewed as in real mail
# (a few big recipient domains, a long tail), kinds in a realistic mix.
GENERATE = """
INSERT INTO facts (at, position, tenant, campaign, sender, sending_domain, domain, priority, kind, job_id, link,
                   human, first, latency_ms, size_bytes)
SELECT %(start)s + ((g - 1 + random()) / %(n)s) * %(span)s,  -- in time order, as facts arrive
       %(base)s + g,
       CASE WHEN g %% 10 < 8 THEN %(tenant)s WHEN g %% 10 = 8 THEN 'other-a' ELSE 'other-b' END,
       CASE WHEN g %% 5 = 0 THEN '' ELSE md5('campaign' || (g %% %(campaigns)s))::uuid::text END,
       'sender' || (g %% 4), 'example.org',
       'd' || floor(%(domains)s * power(random(), 3))::int || '.example',
       'normal', k.kind, NULL, NULL, k.kind NOT IN ('opened', 'clicked') OR random() > 0.3, random() > 0.2,
       CASE WHEN k.kind = 'delivered' THEN (500 + random() * 5000)::int END,
       CASE WHEN k.kind = 'delivered' THEN 4000 END
FROM generate_series(1, %(n)s) AS g
CROSS JOIN LATERAL (
    SELECT (ARRAY['sent', 'sent', 'sent', 'delivered', 'delivered', 'delivered', 'opened', 'opened', 'clicked',
                  'deferred', 'bounced_hard', 'bounced_soft', 'complained', 'replied'])[1 + (g * 7 %% 14)] AS kind
) k
"""


def generate(conn: Any, n: int, start: datetime, span: timedelta, base: int, p: Params) -> None:
    day = start.date()
    while datetime(day.year, day.month, day.day, tzinfo=UTC) < start + span:
        conn.execute("SELECT mailflow_facts_partition(%s)", (day,))
        day += timedelta(days=1)
    step = 1_000_000
    for offset in range(0, n, step):
        chunk = min(step, n - offset)
        conn.execute(
            GENERATE,
            {
                "start": start + span * (offset / n),
                "span": span * (chunk / n),
                "base": base + offset,
                "tenant": TENANT,
                "campaigns": p.campaigns,
                "domains": p.domains,
                "n": chunk,
            },
        )
    conn.execute("ANALYZE facts")


def connector(db_url: str):
    @contextmanager
    def op():
        with connect(db_url, scope=Scope.operator()) as conn:
            yield conn

    return op


def bench_aggregate_hour(db_url: str, p: Params) -> dict[str, Any]:
    hour = (datetime.now(UTC) - timedelta(days=100)).replace(minute=0, second=0, microsecond=0)
    with connect(db_url) as conn:
        generate(conn, p.hour_facts, hour, timedelta(hours=1), 10**12, p)
        conn.execute("INSERT INTO facts_dirty (hour) VALUES (%s) ON CONFLICT DO NOTHING", (hour,))
    times = []
    for _ in range(2):  # the second run: the same hour again (idempotent, the same rows)
        with connect(db_url) as conn:
            conn.execute("INSERT INTO facts_dirty (hour) VALUES (%s) ON CONFLICT DO NOTHING", (hour,))
        done = analytics.aggregate(connector(db_url), before=hour + timedelta(hours=1), since=hour)
        assert done.hours == 1, done
        times.append(done.seconds)
    with connect(db_url) as conn:
        rows = int(scalar(conn, "SELECT count(*) FROM facts_hourly WHERE hour = %s", (hour,)))
        conn.execute("DELETE FROM facts WHERE at >= %s AND at < %s", (hour, hour + timedelta(hours=1)))
        for t in ("facts_hourly", "facts_daily", "facts_monthly"):
            conn.execute(f"DELETE FROM {t}")
    return {
        "aggregate_hour_s": rnd(min(times), 2),
        "aggregate_hour_runs_s": [rnd(t, 2) for t in times],
        "aggregate_hour_rows": rows,
    }


def bench_dashboard(db_url: str, p: Params) -> dict[str, Any]:
    now = datetime.now(UTC)
    start = now - timedelta(days=p.dashboard_days)
    t0 = time.perf_counter()
    with connect(db_url) as conn:
        generate(conn, p.dashboard_facts, start, now - start, 2 * 10**12, p)
        conn.execute(
            "INSERT INTO facts_dirty (hour) SELECT DISTINCT date_trunc('hour', at, 'UTC') FROM facts ON CONFLICT DO NOTHING"
        )
    loaded = time.perf_counter() - t0
    say(f"  {p.dashboard_facts} facts over {p.dashboard_days} days loaded in {loaded:.0f}s; aggregating")
    done = analytics.aggregate(connector(db_url))
    with connect(db_url) as conn:
        conn.execute("VACUUM ANALYZE facts_hourly")
        conn.execute("VACUUM ANALYZE facts_daily")
        conn.execute("VACUUM ANALYZE facts_hourly_cube")
        conn.execute("VACUUM ANALYZE facts_daily_cube")
        hourly = int(scalar(conn, "SELECT count(*) FROM facts_hourly"))
        daily = int(scalar(conn, "SELECT count(*) FROM facts_daily"))
    timings: dict[str, list[float]] = {}
    views = (("hour", "24h"), ("hour", "7d"), ("day", "30d"), ("day", "90d"))
    with connect(db_url, scope=Scope.of(TENANT)) as conn:
        for by, range_ in views:
            dashboard.snapshot(conn, TENANT, by=by, range_=range_)  # warm
        for _ in range(p.dashboard_rounds):
            for by, range_ in views:
                t = time.perf_counter()
                snap = dashboard.snapshot(conn, TENANT, by=by, range_=range_)
                timings.setdefault(f"{range_}_by_{by}", []).append((time.perf_counter() - t) * 1000)
    every = sorted(x for v in timings.values() for x in v)
    size = len(orjson.dumps(snap))
    return {
        "dashboard_p99_ms": rnd(percentile(every, 99), 1),
        "dashboard_p50_ms": rnd(percentile(every, 50), 1),
        "dashboard_max_ms": rnd(every[-1], 1),
        "dashboard_p99_ms_by_view": {k: rnd(percentile(sorted(v), 99), 1) for k, v in timings.items()},
        "dashboard_snapshot_bytes": size,
        "dashboard_facts": p.dashboard_facts,
        "dashboard_load_s": rnd(loaded, 1),
        "dashboard_aggregate_s": rnd(done.seconds, 1),
        "dashboard_aggregate_hours": done.hours,
        "dashboard_hourly_rows": hourly,
        "dashboard_daily_rows": daily,
    }


# -- 4. live: committed -> the number changed in the browser ------------------------------------------

WATCH = """
window.__changes = [];
const el = document.querySelector('[data-counter="delivered"]');
new MutationObserver(() => window.__changes.push([Date.now(), el.textContent])).observe(
    el, {childList: true, characterData: true, subtree: true});
"""


def bench_live(s: Any, settings: Any, p: Params) -> dict[str, Any]:
    import shutil
    import subprocess

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mailflow.config import settings_env
    from mailflow.infra.net import free_port
    from mailflow.tenants import registry as tenants
    from mailflow.tenants import users

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_bin:
        return {
            "live_latency_p99_ms": None,
            "live_error": "chromium and chromedriver are needed (scripts/install-peers)",
        }
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFLOW_")}
    env.update(settings_env(settings.model_copy(update={"periodic_duties": False})))
    env["MAILFLOW_LOG_FORMAT"] = "json"
    port = free_port()
    rt = Runtime(settings, pool_size=2, operator=True)
    procs: list[subprocess.Popen[bytes]] = []
    driver = None
    try:
        tenants.create(rt.store, "live")
        users.add(rt.store.for_tenant("live"), "ops@live.example", "correct horse battery", "owner")
        logs = s.workdir
        for name, args in (
            ("web", ["web", "--port", str(port)]),
            ("relay", ["relay"]),
            ("facts", ["consume", "facts", "--consumer-id", "live"]),
        ):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mailflow", *args],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=(logs / f"{name}.log").open("wb"),
                )
            )
        opts = Options()
        opts.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                driver.get(url + "/login?next=/dashboard")
                driver.find_element(By.NAME, "workspace")
                break
            except Exception:  # the server is starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        for name, value in (
            ("workspace", "live"),
            ("email", "ops@live.example"),
            ("password", "correct horse battery"),
        ):
            field = driver.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "open")
        time.sleep(1.0)
        driver.execute_script(WATCH)
        latencies = []
        for i in range(p.live_samples):
            before = len(driver.execute_script("return window.__changes"))
            rt.store.append_many(message_events(i + 1, [str(uuid.uuid4())], 5, tenant="live"))
            committed_ms = time.time() * 1000
            end = time.monotonic() + 10
            while time.monotonic() < end:
                changes = driver.execute_script("return window.__changes")
                if len(changes) > before:
                    latencies.append(changes[before][0] - committed_ms)
                    break
                time.sleep(0.005)
            time.sleep(p.live_gap_s)
        final = driver.find_element(By.CSS_SELECTOR, '[data-counter="delivered"]').text
    finally:
        if driver is not None:
            driver.quit()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        rt.close()
    ordered = sorted(latencies)
    return {
        "live_latency_p99_ms": rnd(percentile(ordered, 99), 1),
        "live_latency_p50_ms": rnd(percentile(ordered, 50), 1),
        "live_latency_max_ms": rnd(ordered[-1], 1) if ordered else None,
        "live_samples_seen": len(latencies),
        "live_samples": p.live_samples,
        "live_final_delivered_shown": final,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--phases", default="ingest,aggregate,dashboard,live")
    for name in ("ingest_events", "hour_facts", "dashboard_facts", "dashboard_rounds"):
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    args = ap.parse_args()
    p = Params.quick() if args.quick else Params()
    for name in ("ingest_events", "hour_facts", "dashboard_facts", "dashboard_rounds"):
        if getattr(args, name) is not None:
            setattr(p, name, getattr(args, name))
    phases = args.phases.split(",")
    load_start, elapsed, t_total = os.getloadavg()[0], {}, time.perf_counter()
    out: dict[str, Any] = {}
    with scratch("analytics", args.keep, elapsed) as s:
        out.update(s.info)
        with connect(s.db_url) as conn:
            out["timescaledb"] = bool(scalar(conn, "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"))
        settings = load_settings().model_copy(
            update={"database_url": s.db_url, "redis_url": s.redis_url, "redis_prefix": s.prefix, "home": s.workdir}
        )
        rt = Runtime(settings, pool_size=4, operator=True)
        try:
            if "ingest" in phases:
                with phase(elapsed, "ingest"):
                    say(f"facts: {p.ingest_events} events -> facts")
                    out.update(bench_ingest(rt, p))
            if "aggregate" in phases:
                with phase(elapsed, "aggregate"):
                    say(f"aggregate: one hour of {p.hour_facts} facts")
                    out.update(bench_aggregate_hour(s.db_url, p))
            if "dashboard" in phases:
                with phase(elapsed, "dashboard"):
                    say(f"dashboard: {p.dashboard_facts} facts over {p.dashboard_days} days")
                    out.update(bench_dashboard(s.db_url, p))
            if "live" in phases:
                with phase(elapsed, "live"):
                    say(f"live: {p.live_samples} deliveries, committed -> the browser's counter")
                    out.update(bench_live(s, settings, p))
        finally:
            rt.close()
    notes = {
        "facts_ingest_per_s": "events read from PostgreSQL and applied by the facts projection, per second",
        "live_latency_p99_ms": "append returned -> the page's delivered counter changed (MutationObserver)",
    }
    result = finish(out, GOALS, p, notes, load_start, elapsed, t_total)
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for k, v in result.items():
            if not isinstance(v, dict):
                print(f"{k:32} {v}")
        for k, g in result["goals"].items():
            print(f"{k:32} {g['goal']:>12}  met={g['met']}")


if __name__ == "__main__":
    main()
