"""The swap gate: requests pass while the engine is serving, wait while it is swapping (or starting), and get a
retryable 503 if the wait grows too long. A swap closes the gate and waits for the requests in flight to finish,
so every request is served wholly by one model version, the one it reads when it is admitted.

A client with another replica to go to asks not to wait (``Prefer: wait=0``, RFC 7240): it gets the 503 at once
and sends the request elsewhere, so a rolling deployment does not pause its requests
(:class:`services.common.client.ServiceClient`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from services.common.errors import APIError


class EngineUnavailable(APIError):
    """The engine is swapping or restarting and the request waited long enough: answer 503 + Retry-After."""

    def __init__(self, service: str, reason: str, retry_after_s: int) -> None:
        super().__init__(503, f"{service} service: {reason}", retry_after=retry_after_s)
        self.reason = reason


def preferred_wait(prefer: str | None) -> float | None:
    """The ``wait`` preference of a ``Prefer`` header (RFC 7240: ``Prefer: wait=0``), or None."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.partition("=")
        if name.strip().lower() == "wait":
            try:
                return max(0.0, float(value.strip().strip('"')))
            except ValueError:
                return None
    return None


class DrainTimeout(Exception):
    """In-flight requests did not finish in time for a swap."""


class SwapGate:
    def __init__(self, *, service: str, wait_s: float, retry_after_s: int) -> None:
        self.service = service
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self._open = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self.reason = "starting"

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def open(self) -> None:
        self.reason = ""
        self._open.set()

    def close(self, reason: str) -> None:
        self.reason = reason
        self._open.clear()

    async def acquire(self, wait_s: float | None = None) -> None:
        """Admit one request; ``wait_s`` (the client's ``Prefer: wait``) shortens the wait, never lengthens it."""
        deadline = time.monotonic() + (self.wait_s if wait_s is None else min(wait_s, self.wait_s))
        while not self._open.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineUnavailable(
                    self.service, f"engine {self.reason or 'unavailable'}; retry later", self.retry_after_s
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._open.wait()
        self._in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        self._in_flight -= 1
        if self._in_flight <= 0:
            self._in_flight = 0
            self._idle.set()

    @contextlib.asynccontextmanager
    async def admit(self, wait_s: float | None = None) -> AsyncIterator[None]:
        await self.acquire(wait_s)
        try:
            yield
        finally:
            self.release()

    @contextlib.asynccontextmanager
    async def closed(self, reason: str, drain_timeout_s: float) -> AsyncIterator[None]:
        """Close the gate, wait for the requests in flight, run the body, reopen (also on failure)."""
        self.close(reason)
        try:
            try:
                async with asyncio.timeout(drain_timeout_s):
                    await self._idle.wait()
            except TimeoutError as exc:
                raise DrainTimeout(
                    f"{self._in_flight} requests still in flight after {drain_timeout_s:.0f}s; swap abandoned"
                ) from exc
            yield
        finally:
            self.open()
