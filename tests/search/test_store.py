"""The Redis store against the real shared Redis, under a key prefix of this test alone: leases, fencing tokens,
the atomic commit, indexes, retention, bounded event streams, paging. No worker, no inference."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from cpl.config import SearchConfig
from cpl.tree import Tree
from services.search.keys import Keys
from services.search.schemas import Progress, SearchRecord, SearchStatus
from services.search.store import FencedOut, RedisTreeStore, SearchStore
from tests.search.conftest import REDIS_URL, unlink_prefix


def _record(i: int = 0, **over) -> SearchRecord:
    return SearchRecord(
        id=uuid.uuid4().hex,
        status=SearchStatus.QUEUED,
        question=f"q{i}",
        config=SearchConfig(simulations=4).model_dump(mode="json"),
        progress=Progress(simulations_total=4),
        created_at=datetime.now(UTC) + timedelta(microseconds=i),
        **over,
    )


def run(coro_fn, **kwargs):
    async def main():
        prefix = f"cpltest:{uuid.uuid4().hex[:10]}"
        client = aioredis.from_url(REDIS_URL)
        store = SearchStore(client, Keys(prefix), retention_s=kwargs.get("retention_s", 3600), events_max=10)
        try:
            return await coro_fn(store)
        finally:
            await client.aclose()
            import redis

            sync = redis.Redis.from_url(REDIS_URL)
            unlink_prefix(sync, prefix)
            sync.close()

    return asyncio.run(main())


def test_one_claim_at_a_time_and_stale_tokens_are_fenced_out():
    async def body(store: SearchStore):
        record = _record()
        await store.create(record)
        claims = await asyncio.gather(*(store.claim(record.id, f"w{i}", 5000) for i in range(8)))
        winners = [c for c in claims if c is not None]
        assert len(winners) == 1 and winners[0].attempt == 1
        first = winners[0]
        await store.release(record.id, "w-not-the-holder")  # only the holder may release
        assert await store.claim(record.id, "late", 5000) is None
        holder = next(f"w{i}" for i, c in enumerate(claims) if c is not None)
        await store.release(record.id, holder)
        second = await store.claim(record.id, "next", 5000)
        assert second is not None and second.attempt == 2
        tree = Tree.new(record.id, record.question, None, SearchConfig(simulations=4))
        record.status = SearchStatus.RUNNING
        with pytest.raises(FencedOut):
            await store.commit(record, fence=first.attempt, tree=tree)
        assert await store.tree_json(record.id) is None  # the stale write changed nothing
        version = await store.commit(record, fence=second.attempt, tree=tree, event=("progress", {"n": 1}))
        stored = await store.get(record.id)
        assert stored.version == version == 2 and stored.record.status is SearchStatus.RUNNING
        assert stored.record.snapshot_bytes == len(await store.redis.get(store.keys.tree(record.id)))
        assert Tree.model_validate_json(zlib.decompress(await store.redis.get(store.keys.tree(record.id)))) == tree

    run(body)


def test_lease_expires_and_heartbeat_renews_only_its_own():
    async def body(store: SearchStore):
        record = _record()
        await store.create(record)
        assert await store.claim(record.id, "a", 300) is not None
        assert await store.renew(record.id, "a", 300)
        assert not await store.renew(record.id, "b", 300)
        await asyncio.sleep(0.5)
        assert await store.claim(record.id, "b", 300) is not None  # a's lease ran out
        assert not await store.renew(record.id, "a", 300)

    run(body)


def test_status_indexes_retention_and_cancelling_is_kept():
    async def body(store: SearchStore):
        record = _record()
        await store.create(record)
        k = store.keys
        assert await store.redis.zscore(k.status_index("queued"), record.id) is not None
        claim = await store.claim(record.id, "w", 5000)
        record.status = SearchStatus.RUNNING
        await store.commit(record, fence=claim.attempt)
        assert await store.redis.zscore(k.status_index("queued"), record.id) is None
        assert await store.redis.zscore(k.status_index("running"), record.id) is not None
        assert (await store.request_cancel(record.id)).record.status is SearchStatus.CANCELLING
        await store.commit(record, fence=claim.attempt)  # a progress write does not undo the cancel
        assert (await store.get(record.id)).record.status is SearchStatus.CANCELLING
        assert await store.redis.ttl(k.search(record.id)) == -1  # running: never expires
        record.status = SearchStatus.CANCELLED
        tree = Tree.new(record.id, record.question, None, SearchConfig(simulations=4))
        await store.commit(record, fence=claim.attempt, tree=tree, event=("cancelled", {}))
        for key in (k.search(record.id), k.tree(record.id), k.events(record.id)):
            assert 0 < await store.redis.ttl(key) <= 3600
        assert await store.status_counts() == {**{s.value: 0 for s in SearchStatus}, "cancelled": 1}

    run(body)


def test_queued_cancel_is_final_at_once_and_idempotent():
    async def body(store: SearchStore):
        record = _record()
        await store.create(record)
        first = await store.request_cancel(record.id)
        again = await store.request_cancel(record.id)
        assert first.record.status is again.record.status is SearchStatus.CANCELLED
        assert first.version == again.version and first.record.finished_at is not None

    run(body)


def test_event_stream_is_bounded():
    async def body(store: SearchStore):
        record = _record()
        await store.create(record)
        claim = await store.claim(record.id, "w", 5000)
        record.status = SearchStatus.RUNNING
        for i in range(300):
            await store.commit(record, fence=claim.attempt, event=("progress", {"i": i}))
        length = await store.redis.xlen(store.keys.events(record.id))
        assert 10 <= length < 300  # MAXLEN ~ trims in whole macro nodes
        events = await store.read_events(record.id, "0", block_ms=None, count=1000)
        assert [e[1] for e in events] == ["progress"] * length

    run(body)


def test_request_ids_and_paging():
    async def body(store: SearchStore):
        first = _record(0)
        key = store.keys.request("search", "rid")
        assert await store.create(first, key) == (first.id, True)
        dup = _record(1)
        assert await store.create(dup, key) == (first.id, False)
        assert await store.get(dup.id) is None  # nothing stored for the duplicate
        records = [_record(i + 2) for i in range(7)]
        for r in records:
            await store.create(r)
        ids: list[str] = []
        cursor = None
        while True:
            page, cursor = await store.page(status=None, batch_id=None, cursor=cursor, limit=3)
            ids += [r.id for r in page]
            if cursor is None:
                break
        assert ids == [r.id for r in reversed([first, *records])]

    run(body)


def test_tree_store_protocol():
    from cpl.store import TreeStore

    async def body(store: SearchStore):
        record = _record()
        await store.create(record)
        claim = await store.claim(record.id, "w", 5000)
        tree = Tree.new(record.id, record.question, None, SearchConfig(simulations=1))

        def record_for(t: Tree, status: SearchStatus) -> SearchRecord:
            return record.model_copy(update={"status": status})

        tree_store = RedisTreeStore(store, claim.attempt, record_for)
        assert isinstance(tree_store, TreeStore)
        await tree_store.save_snapshot(tree)
        assert await tree_store.load(record.id) == tree
        assert await tree_store.list_ids() == [record.id]
        with pytest.raises(ValueError):
            await tree_store.mark_finished(tree)
        tree.simulations_done = 1
        tree.root.N = 1
        await tree_store.mark_finished(tree)
        stored = await store.get(record.id)
        assert stored.record.status is SearchStatus.SUCCEEDED and stored.record.tree_stats is not None

    run(body)
