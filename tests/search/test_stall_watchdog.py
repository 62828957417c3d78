"""The worker's stall watchdog: a search whose await never returns is cancelled after ``stall_timeout_s`` without
progress, with the await chain in the error; progress resets the clock; a finished search passes through."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.search.worker import Stalled, _watched, await_chain


async def _answer_that_never_comes(never: asyncio.Event) -> None:
    await never.wait()


async def _search_that_hangs_after(steps: int, progress_at: list[float], cancelled: list[bool]) -> str:
    for _ in range(steps):
        await asyncio.sleep(0.05)
        progress_at[0] = time.monotonic()
    try:
        await _answer_that_never_comes(asyncio.Event())
    except asyncio.CancelledError:
        cancelled.append(True)
        raise
    return "unreachable"


def test_a_hung_search_is_cancelled_and_the_error_says_where_it_waited():
    progress_at = [time.monotonic()]
    cancelled: list[bool] = []

    async def run() -> None:
        await _watched(_search_that_hangs_after(4, progress_at, cancelled), progress_at, stall_timeout_s=0.5)

    start = time.monotonic()
    with pytest.raises(Stalled) as info:
        asyncio.run(run())
    elapsed = time.monotonic() - start
    assert cancelled == [True], "the hung coroutine is cancelled, not left running"
    message = str(info.value)
    assert "no simulation completed for 0.5 s" in message
    assert "_search_that_hangs_after" in message and "_answer_that_never_comes" in message, message
    assert "Event.wait" in message or "Future" in message, message
    assert elapsed >= 0.5 + 4 * 0.05 * 0.9, "progress reset the clock: the stall counts from the last step"


def test_a_search_that_keeps_progressing_is_left_alone():
    progress_at = [time.monotonic()]

    async def steady() -> str:
        for _ in range(10):
            await asyncio.sleep(0.1)
            progress_at[0] = time.monotonic()
        return "done"

    assert asyncio.run(_watched(steady(), progress_at, stall_timeout_s=0.3)) == "done"


def test_await_chain_of_a_suspended_coroutine():
    async def run() -> str:
        never = asyncio.Event()
        task = asyncio.ensure_future(_answer_that_never_comes(never))
        await asyncio.sleep(0)
        chain = await_chain(task.get_coro())
        task.cancel()
        return chain

    chain = asyncio.run(run())
    lines = chain.splitlines()
    assert "_answer_that_never_comes" in lines[0] and "wait" in lines[1] and "awaiting" in lines[-1], chain
