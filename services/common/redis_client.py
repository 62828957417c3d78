"""The asyncio Redis client of the services: commands retried across a Redis restart, every command bounded in
time, and task cancellation that is never lost on the way through redis-py.

Why a connection class of our own: redis-py (8.1) bounds a command's write with ``asyncio.wait_for`` when
``socket_timeout`` is set. On Python 3.11, ``wait_for`` swallows the cancellation of its caller when the awaited
write finishes at the same moment (CPython gh-86296, fixed in 3.12), which for a short write is most of the time:
a task cancelled during a Redis command then carries on as if nothing had happened. In the search worker that
kept a lease heartbeat renewing after its slice had ended, and the search sat "running" until the slice's overrun
timeout, five minutes later. :class:`CancellableConnection` bounds the write with ``asyncio.timeout`` instead,
which passes cancellation through; ``tests/search/test_redis_client.py`` cancels commands mid-flight against
a real Redis and checks that every cancellation arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError)
REDIS_SOCKET_TIMEOUT_S = 30.0  # longer than any command of ours takes (the API's XREAD blocks 5 s at most)


class CancellableConnection(aioredis.Connection):
    """A connection whose writes are bounded by ``asyncio.timeout`` rather than ``asyncio.wait_for`` (module
    docstring); reads are redis-py's own, already bounded by ``asyncio.timeout``."""

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        timeout = self.socket_timeout
        # Without a socket timeout redis-py writes directly; the bound is ours, around the whole send.
        self.socket_timeout = None
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)
        except TimeoutError as exc:  # asyncio's (the builtin), not redis-py's
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from exc
        finally:
            self.socket_timeout = timeout


def redis_client(url: str, attempts: int = 20) -> aioredis.Redis:
    """A Redis client that rides out a restart: commands are retried with backoff (20 attempts: ~30 s).

    Every command has a read and write timeout: an answer lost with a half-open connection becomes a retried
    TimeoutError instead of an await that never returns.
    """
    return aioredis.from_url(
        url,
        connection_class=CancellableConnection,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), attempts),
        retry_on_error=list(REDIS_ERRORS),
        health_check_interval=10,
        socket_connect_timeout=5,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
    )
