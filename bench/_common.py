"""Helpers shared by the benchmark scripts (progress lines, phases, child processes, servers)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from queue import Empty
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import make_conninfo

from mailflow.services import connect, redis_client


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
    return bool(value == target)


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
