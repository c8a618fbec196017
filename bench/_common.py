"""Helpers shared by the benchmark scripts (progress lines, phases, child processes, servers, scratch
databases, the result's common tail)."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import make_conninfo

from mailflow.config import load_settings, mask_url
from mailflow.infra.migrate import migrate
from mailflow.infra.services import connect, redis_client, resolve


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def rnd(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


@contextlib.contextmanager
def phase(elapsed: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    say(f"{name} ...")
    try:
        yield
    finally:
        elapsed[name] = round(time.perf_counter() - t0, 2)
        say(f"{name} done in {elapsed[name]:.1f} s")


def collect(queue: Any, count: int, procs: list[Any], timeout: float, what: str) -> list[Any]:
    """Get `count` results from child processes; a child's exception is re-raised here."""
    results: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(results) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{what}: only {len(results)} of {count} results within {timeout:.0f} s")
        try:
            item = queue.get(timeout=min(left, 1.0))
        except Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"{what}: a child process exited with code {dead[0].exitcode}") from None
            continue
        if isinstance(item, tuple) and item and item[0] == "error":
            raise RuntimeError(f"{what}: child failed:\n{item[1]}")
        results.append(item)
    return results


def met(value: Any, op: str, target: float) -> bool | None:
    """Whether a measured value meets its goal (None when it was not measured)."""
    if value is None:
        return None
    if op == ">=":
        return bool(value >= target)
    if op == "<":
        return bool(value < target)
    if op == "<=":
        return bool(value <= target)
    if op == "==":
        return bool(value == target)
    raise ValueError(f"unknown goal operator {op!r}")


def scalar(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    """The first column of the one row `sql` returns."""
    row = conn.execute(sql, params).fetchone()
    if row is None:
        raise RuntimeError(f"no row from {sql!r}")
    return row[0]


def server_versions(db_url: str, redis_url: str) -> tuple[str, str]:
    with connect(db_url) as conn:
        pg = str(scalar(conn, "SHOW server_version"))
    r = redis_client(redis_url)
    try:
        rv = str(r.info("server")["redis_version"])
    finally:
        r.close()
    return pg, rv


def with_dbname(url: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    if url.startswith(("postgresql://", "postgres://")):
        return urlunsplit(urlsplit(url)._replace(path="/" + dbname))
    return make_conninfo(url, dbname=dbname)


@dataclass
class Scratch:
    """A benchmark's own database, Redis key prefix and temporary folder on the configured
    (or embedded) servers, with what the result JSON says about them."""

    kind: str  # configured | embedded | mixed
    admin_url: str
    db_url: str
    redis_url: str
    prefix: str
    workdir: Path
    info: dict[str, Any]


@contextlib.contextmanager
def scratch(tag: str, keep: bool, elapsed: dict[str, float]) -> Iterator[Scratch]:
    """Create and migrate `mailflow_<tag>_<pid>` and a `mailflow-<tag>-...` prefix; drop both
    (and the folder) at the end unless `keep`."""
    base = load_settings()
    services = resolve(base)
    if base.database_url and base.redis_url:
        kind = "configured"
    elif not base.database_url and not base.redis_url:
        kind = "embedded"
    else:
        kind = "mixed"
    dbname = f"mailflow_{tag.replace('-', '_')}_{os.getpid()}"
    prefix = f"mailflow-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    db_url = with_dbname(services.database_url, dbname)
    redis_url = services.redis_url
    say(f"services: {kind}; database {mask_url(db_url)}; redis {mask_url(redis_url)} prefix {prefix}")
    pg_version, redis_version = server_versions(services.database_url, redis_url)
    info: dict[str, Any] = {"services": kind, "postgres_version": pg_version, "redis_version": redis_version}
    workdir = Path(tempfile.mkdtemp(prefix=f"mailflow-{tag}-"))
    with connect(services.database_url) as admin:
        admin.execute(f'CREATE DATABASE "{dbname}"')
    try:
        with connect(db_url) as conn:
            migrate(conn)
            info["synchronous_commit"] = str(scalar(conn, "SHOW synchronous_commit"))
        yield Scratch(kind, services.database_url, db_url, redis_url, prefix, workdir, info)
    finally:
        with phase(elapsed, "cleanup"):
            if keep:
                say(f"kept database {mask_url(db_url)}, Redis prefix {prefix} and logs in {workdir}")
            else:
                with connect(services.database_url) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
                r = redis_client(redis_url)
                try:
                    stale = list(r.scan_iter(match=f"{prefix}:*", count=1000))
                    if stale:
                        r.delete(*stale)
                finally:
                    r.close()
                shutil.rmtree(workdir, ignore_errors=True)


def finish(
    out: dict[str, Any],
    goals: dict[str, tuple[str, float]],
    params: Any,
    notes: dict[str, str],
    load_start: float,
    elapsed: dict[str, float],
    t_total: float,
) -> dict[str, Any]:
    """The common tail of a result: goals met or not, parameters, notes, the machine, phase times."""
    elapsed["total"] = round(time.perf_counter() - t_total, 2)
    out["goals"] = {
        name: {"goal": f"{op} {target:g}", "met": met(out.get(name), op, target)}
        for name, (op, target) in goals.items()
        if name in out
    }
    out["params"] = asdict(params)
    out["notes"] = notes
    out["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1m_start": round(load_start, 2),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }
    out["elapsed_s"] = elapsed
    return out
