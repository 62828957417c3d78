"""A vLLM general plugin (entry point ``vllm.general_plugins`` in pyproject.toml): how long vLLM's processes spin
while they wait for the next message between the engine core and its model worker.

vLLM passes each engine step from the engine core to the model worker, and the result back, through a
shared-memory ring buffer. A reader that has read within the last second waits for the next message by spinning
on ``sched_yield`` (``SpinCondition.busy_loop_s``: 1 s, with no setting of its own); after that it sleeps on a
ZeroMQ notification, which the writer sends with every message. On a GPU host the spinning costs a host core
that nobody needed. On a CPU host the spinners take their fair share of the cores the models compute on.

``CPL_VLLM_BUSY_LOOP_S`` (seconds, > 0) sets that window in every vLLM process that loads the plugin (vLLM loads
general plugins in the API server, the engine core and each worker). When it is unset, vLLM's default stands.
It may not be 0: vLLM 0.32 loses some of those notifications, and a reader that never spins then
waits for its 5 s re-check (measured: value requests of 30 ms took 3.5-4.3 s). A window of milliseconds covers
the messages of one step, which follow each other closely.
The gateway sets it for its vLLM child from ``VLLM_BUSY_LOOP_S`` (docs/services.md); the reasons and the
figures are in docs/decisions/007-value-engine-does-not-spin.md.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any

ENV = "CPL_VLLM_BUSY_LOOP_S"

# Under vLLM's own logger, so the line reaches the gateway's log from every vLLM process (vLLM configures only
# the "vllm" logger there).
log = logging.getLogger("vllm.cpl_busy_loop")


def busy_loop_from_env() -> float | None:
    """The window that ``CPL_VLLM_BUSY_LOOP_S`` asks for (None: unset); a bad value is an error, not ignored."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{ENV} must be a number of seconds > 0, got {raw!r}")
    return seconds


def register() -> None:
    """Called by vLLM in each of its processes, possibly more than once."""
    seconds = busy_loop_from_env()
    if seconds is None:
        return
    from vllm.distributed.device_communicators import shm_broadcast

    cls = shm_broadcast.SpinCondition
    original = getattr(cls.__init__, "__wrapped__", cls.__init__)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["busy_loop_s"] = seconds
        original(self, *args, **kwargs)

    cls.__init__ = __init__
    log.info("vLLM readers spin for at most %s s before sleeping (%s)", seconds, ENV)
