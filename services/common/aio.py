"""Small asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended.

    Unlike ``with suppress(CancelledError): await task``, which cannot tell the task's CancelledError from the
    caller's own, a cancellation of the caller while it waits here still reaches the caller (a slice's overrun
    timeout must be able to end the slice). What the task ended with is retrieved, so asyncio does not warn about
    it; the caller has chosen not to care.
    """
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()
