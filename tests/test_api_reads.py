"""The API's one-round-trip read (consumers/inline.read_one) on a real PostgreSQL: it sees only
its tenant's rows, its statement timeout cancels a slow read, and nothing of its scope stays on
the pooled connection for the next caller."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from mailflow.consumers import inline
from mailflow.infra.services import open_async_pool
from mailflow.infra.tenancy import OPERATOR_ROLE, SETTING, TENANT_ROLE, Scope
from mailflow.outbound import campaigns, segments, sending, templates
from mailflow.outbound.senders import Sender
from mailflow.runtime.wiring import Runtime
from mailflow.tenants import registry

pytestmark = pytest.mark.integration

CAMPAIGN = "SELECT id, name FROM campaigns WHERE id = %(id)s"


def _campaign(store) -> str:
    sending.save_sender(store, Sender("news", "news@acme.example", "Acme", "smtp://127.0.0.1:9"))
    templates.save(store, templates.Template("hello", "Hello", "<p>hi</p>", "hi"))
    segments.define(store, "all", {})
    return campaigns.create(store, name="spring", sender="news", template="hello", segment="all")


async def _with_pool(db_url: str, work):
    pool = await open_async_pool(db_url, scope=Scope.operator(), max_size=1)  # one connection: reused
    try:
        return await work(pool)
    finally:
        await pool.close()


def test_a_read_sees_its_tenants_row_and_not_anothers(settings, db_url):
    rt = Runtime(settings, operator=True)
    try:
        for tenant in ("acme", "rival"):
            registry.create(rt.store, tenant, tenant.title())
        campaign_id = _campaign(rt.store.for_tenant("acme"))
    finally:
        rt.close()

    async def work(pool):
        mine = await inline.read_one(pool, "acme", CAMPAIGN, {"id": campaign_id}, timeout_ms=5000)
        theirs = await inline.read_one(pool, "rival", CAMPAIGN, {"id": campaign_id}, timeout_ms=5000)
        return mine, theirs

    mine, theirs = asyncio.run(_with_pool(db_url, work))
    assert mine == {"id": uuid.UUID(campaign_id), "name": "spring"}
    assert theirs is None  # row-level security, not a WHERE tenant = ... of the query


def test_nothing_of_the_scope_stays_on_the_connection(db_url):
    async def work(pool):
        inside = await inline.read_one(
            pool,
            "acme",
            "SELECT current_user AS who, current_setting(%(s)s, true) AS tenant, "
            "current_setting('statement_timeout') AS timeout",
            {"s": SETTING},
            timeout_ms=1234,
        )
        async with pool.connection() as conn:  # the same connection, as the next request gets it
            after = await (
                await conn.execute(
                    "SELECT current_user, current_setting(%s, true), current_setting('statement_timeout')", (SETTING,)
                )
            ).fetchone()
            status = conn.info.transaction_status
        return inside, after, status

    inside, after, status = asyncio.run(_with_pool(db_url, work))
    assert inside == {"who": TENANT_ROLE, "tenant": "acme", "timeout": "1234ms"}
    assert after[0] == OPERATOR_ROLE and after[1] in (None, "") and after[2] != "1234ms"
    assert status == psycopg.pq.TransactionStatus.IDLE


def test_a_slow_read_is_cancelled_by_its_timeout_and_the_connection_is_usable_after(db_url):
    async def work(pool):
        with pytest.raises(psycopg.errors.QueryCanceled):
            await inline.read_one(pool, "acme", "SELECT pg_sleep(5)", {}, timeout_ms=50)
        return await inline.read_one(pool, "acme", "SELECT 1 AS one", {}, timeout_ms=50)

    assert asyncio.run(_with_pool(db_url, work)) == {"one": 1}


def test_parameters_are_quoted_not_spliced(db_url):
    hostile = "x'; SET ROLE postgres; SELECT '"

    async def work(pool):
        row = await inline.read_one(
            pool, "acme", "SELECT %(v)s::text AS v, current_user AS who", {"v": hostile}, timeout_ms=5000
        )
        return row

    assert asyncio.run(_with_pool(db_url, work)) == {"v": hostile, "who": TENANT_ROLE}
