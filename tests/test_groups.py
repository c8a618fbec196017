"""The consumer-group toolkit against real Redis: groups, reads, claims, acks, and a Redis that lost its data."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio as aredis

from mailflow.consumers import groups

from .conftest import wait_until

pytestmark = pytest.mark.integration


def _error(call) -> redis.ResponseError:
    with pytest.raises(redis.ResponseError) as info:
        call()
    return info.value


def test_creating_a_group_twice_is_fine_and_says_whether_it_created_it(r, prefix):
    stream = f"{prefix}:s"
    assert groups.ensure_group(r, stream, "g") is True
    assert groups.ensure_group(r, stream, "g") is False  # BUSYGROUP is tolerated
    assert r.exists(stream)  # MKSTREAM
    assert [g["name"] for g in r.xinfo_groups(stream)] == [b"g"]


def test_a_group_created_at_an_id_hands_out_only_later_entries(r, prefix):
    stream = f"{prefix}:s"
    for i in range(1, 6):
        r.xadd(stream, {"n": str(i)}, id=f"{i}-0")
    groups.ensure_group(r, stream, "g", start_id="3-0")
    [(name, entries)] = groups.read(r, "g", "c1", {stream: ">"}, count=10)
    assert name == stream and [e[0] for e in entries] == [b"4-0", b"5-0"]
    assert groups.read(r, "g", "c1", {stream: ">"}, count=10, block=50) == []  # BLOCK timed out


def test_every_way_redis_says_it_lost_a_stream_or_group_is_lost_data(r, prefix):
    stream = f"{prefix}:gone"
    nogroup = _error(lambda: r.xreadgroup("g", "c", {stream: ">"}))
    no_such_key = _error(lambda: r.xinfo_consumers(stream, "g"))  # "no such key"
    claim_nogroup = _error(lambda: r.xautoclaim(stream, "g", "c", 0))
    assert str(nogroup).startswith("NOGROUP") and str(no_such_key).lower().startswith("no such key")
    for exc in (nogroup, no_such_key, claim_nogroup):
        assert groups.lost_data(exc), exc  # infra.services.redis_lost_data, which this replaces, missed "no such key"
    # Redis 6.2 and 7 tell a reader blocked at the time in their own words.
    assert groups.lost_data(
        redis.ResponseError("NOGROUP the consumer group this client was blocked on no longer exists")
    )
    assert groups.lost_data(redis.ResponseError("UNBLOCKED the stream key no longer exists"))
    assert groups.lost_data(redis.ResponseError("the stream key no longer exists"))
    busy = _error(lambda: (r.xgroup_create(stream, "g", mkstream=True), r.xgroup_create(stream, "g")))
    assert not groups.lost_data(busy) and groups.group_exists(busy)
    assert not groups.lost_data(redis.ResponseError("WRONGTYPE Operation against a key"))
    assert not groups.lost_data(redis.ConnectionError("Connection refused"))


def test_reads_claims_and_member_cleanup_raise_stream_lost_after_a_flushall(private_redis_like_tested, prefix):
    pr = redis.Redis.from_url(private_redis_like_tested.url)
    stream = f"{prefix}:s"
    groups.ensure_group(pr, stream, "g")
    pr.xadd(stream, {"n": "1"})
    assert groups.read(pr, "g", "c", {stream: ">"}, count=1)
    pr.flushall()  # a server of this test's own
    with pytest.raises(groups.StreamLost) as lost:
        groups.read(pr, "g", "c", {stream: ">"}, count=1)
    assert lost.value.stream == stream and lost.value.group == "g" and "NOGROUP" in lost.value.reply
    with pytest.raises(groups.StreamLost):
        list(groups.claim_stale(pr, stream, "g", "c", min_idle_ms=0))
    with pytest.raises(groups.StreamLost):
        groups.forget_idle_consumers(pr, stream, "g", keep="c", idle_ms=0)  # XINFO says "no such key"
    assert groups.ack(pr, stream, "g", [b"1-0"]) == 0  # nothing to acknowledge, no error
    assert groups.ensure_group(pr, stream, "g") is True  # and the group comes back
    pr.close()


def test_a_reader_blocked_while_its_stream_is_deleted_gets_stream_lost_or_an_empty_read(r, redis_url, prefix):
    """Redis 7 unblocks the reader ("UNBLOCKED ... no longer exists"); 6.2 lets it time out."""
    stream = f"{prefix}:s"
    groups.ensure_group(r, stream, "g")
    outcome: list[object] = []

    def blocked() -> None:
        reader = redis.Redis.from_url(redis_url)
        try:
            outcome.append(groups.read(reader, "g", "c", {stream: ">"}, block=3000))
        except groups.StreamLost as exc:
            outcome.append(exc)
        finally:
            reader.close()

    t = threading.Thread(target=blocked)
    t.start()
    wait_until(lambda: any(c.get("cmd") == "xreadgroup" for c in r.client_list()), 5, what="the reader to block")
    time.sleep(0.05)
    r.delete(stream)
    t.join(10)
    [result] = outcome
    assert result == [] or (isinstance(result, groups.StreamLost) and "no longer exists" in result.reply)


def test_an_idle_entry_is_claimed_by_another_member_and_deleted_ones_are_reported(r, prefix):
    stream = f"{prefix}:s"
    groups.ensure_group(r, stream, "g")
    ids = [r.xadd(stream, {"n": str(i)}) for i in range(5)]
    [(_, read)] = groups.read(r, "g", "dead", {stream: ">"}, count=5)  # read, then its process died
    assert len(read) == 5
    r.xdel(stream, ids[1])
    early = list(groups.claim_stale(r, stream, "g", "alive", min_idle_ms=60_000))
    assert [eid for p in early for eid, _ in p.entries] == []  # not idle yet (Redis 7 reports the deleted one already)
    time.sleep(0.05)
    pages = list(groups.claim_stale(r, stream, "g", "alive", min_idle_ms=20, count=2))
    assert len(pages) >= 2  # the cursor went round in pages of two
    live = [eid for p in pages for eid, _ in p.entries]
    deleted = [eid for p in early + pages for eid in p.deleted]
    assert live == [ids[0], *ids[2:]] and deleted == [ids[1]]
    assert all(fields == {b"n": str(ids.index(eid)).encode()} for p in pages for eid, fields in p.entries)
    assert groups.ack(r, stream, "g", live + deleted) in (4, 5)  # Redis 7 dropped the deleted one itself, 6.2 did not
    assert r.xpending(stream, "g")["pending"] == 0
    # The dead member has nothing pending and is idle: it is forgotten, the caller kept.
    time.sleep(0.02)
    assert groups.forget_idle_consumers(r, stream, "g", keep="alive", idle_ms=10) == ["dead"]
    assert [c["name"] for c in r.xinfo_consumers(stream, "g")] == [b"alive"]


def test_the_async_wrappers_do_what_the_sync_ones_do(redis_url, prefix):
    stream, other = f"{prefix}:a", f"{prefix}:b"

    async def scenario() -> None:
        ar = aredis.Redis.from_url(redis_url)
        try:
            assert await groups.ensure_group_async(ar, stream, "g") is True
            assert await groups.ensure_group_async(ar, stream, "g") is False
            await groups.ensure_group_async(ar, other, "g")
            eid = await ar.xadd(other, {"n": "1"})
            [(name, entries)] = await groups.read_async(ar, "g", "dead", {stream: ">", other: ">"}, count=1)
            assert name == other and entries == [(eid, {b"n": b"1"})]
            await asyncio.sleep(0.03)
            pages = [p async for p in groups.claim_stale_async(ar, other, "g", "alive", min_idle_ms=10)]
            assert [e for p in pages for e, _ in p.entries] == [eid]
            pipe = ar.pipeline(transaction=False)
            groups.queue_ack(pipe, other, "g", [eid], delete=True)
            assert await pipe.execute() == [1, 1]
            assert await ar.xlen(other) == 0
            await ar.delete(stream, other)
            with pytest.raises(groups.StreamLost):
                await groups.read_async(ar, "g", "c", {stream: ">"})
            with pytest.raises(groups.StreamLost):
                [p async for p in groups.claim_stale_async(ar, stream, "g", "c", min_idle_ms=0)]
            assert await groups.ack_async(ar, stream, "g", [eid]) == 0
        finally:
            await ar.aclose()

    asyncio.run(scenario())
