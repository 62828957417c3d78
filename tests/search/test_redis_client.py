"""The services' Redis client against the real shared Redis: a task cancelled in the middle of a command ends
(redis-py's ``wait_for`` on writes swallowed most such cancellations on Python 3.11, which kept a search's lease
heartbeat alive for minutes: services/common/redis_client.py), and the connection is still usable afterwards;
``cancel_and_wait`` lets a cancellation of its caller through."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from services.common.aio import cancel_and_wait
from services.common.redis_client import redis_client
from services.search.keys import Keys
from services.search.store import SearchStore
from tests.search.conftest import REDIS_URL, unlink_prefix

TRIALS = 200


def test_a_task_cancelled_during_redis_commands_always_ends():
    prefix = f"cpltest:{uuid.uuid4().hex[:10]}"

    async def main() -> int:
        client = redis_client(REDIS_URL)
        store = SearchStore(client, Keys(prefix), retention_s=60, events_max=10)

        async def heartbeat() -> None:  # the worker's lease renewal, without its pauses
            while True:
                await store.renew("s", "token", 15_000)

        rng = random.Random(0)
        lost = 0
        try:
            for _ in range(TRIALS):
                task = asyncio.create_task(heartbeat())
                await asyncio.sleep(rng.uniform(0, 0.005))  # lands inside a command nearly every time
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=0.3)
                if not done:
                    lost += 1
                    while not task.done():  # a swallowed cancellation: ask again until one lands
                        task.cancel()
                        await asyncio.wait({task}, timeout=0.5)
            assert await client.ping()  # the connections cancelled mid-command were not left half-read
            await client.set(f"{prefix}:k", "v")
            assert await client.get(f"{prefix}:k") == b"v"
        finally:
            await client.aclose()
        return lost

    try:
        lost = asyncio.run(main())
    finally:
        import redis

        sync = redis.Redis.from_url(REDIS_URL)
        unlink_prefix(sync, prefix)
        sync.close()
    assert lost == 0, f"{lost} of {TRIALS} cancellations were swallowed by the Redis client"


def test_cancel_and_wait_does_not_swallow_the_callers_cancellation():
    async def main() -> None:
        async def stubborn() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await asyncio.sleep(0.2)  # takes a while to end, as a task finishing its cleanup does
                raise

        async def caller(task: asyncio.Task[None]) -> str:
            await cancel_and_wait(task)
            return "returned normally"

        inner = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        outer = asyncio.create_task(caller(inner))
        await asyncio.sleep(0.05)  # the caller is waiting for the inner task to end
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        await asyncio.wait({inner})
        assert inner.cancelled()

    asyncio.run(main())
