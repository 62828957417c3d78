"""The gateway app builder policy and value share: the common service app (:mod:`services.common.app`) plus the
vLLM child's life cycle, model info, the authenticated hot-swap endpoint, and the upstream call helper."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import aiohttp
from fastapi import Depends, FastAPI, Header
from pydantic import BaseModel, Field

from services.common.app import create_service_app
from services.common.auth import admin_auth
from services.common.request_errors import error_responses
from services.gateway.gate import EngineUnavailable, preferred_wait
from services.gateway.model_version import VersionLabel
from services.gateway.vllm_gateway import VLLMGateway

try:  # msgspec comes with vLLM; it decodes vLLM's answers ~3x faster than json (they carry per-token lists)
    from msgspec.json import decode as _decode_json
except ImportError:  # pragma: no cover
    _decode_json = json.loads

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Model-Version"
# What vLLM answers (HTTP 400) when its answer holds NaN or inf (Starlette's JSONResponse refuses them).
NON_FINITE_MARK = "Out of range float values are not JSON compliant"


class SwapRequest(BaseModel):
    path: str = Field(description="checkpoint directory: absolute, or relative to the checkpoint root")
    version: VersionLabel | None = Field(default=None, description="version label (default: the load counter)")


class SwapResponse(BaseModel):
    version: str
    previous_version: str
    checkpoint: str
    loaded_at: str
    swap_seconds: float


class ModelInfo(BaseModel):
    version: str
    checkpoint: str
    loaded_at: str
    served_model_name: str
    loads: int


JSON_HEADERS = {"Content-Type": "application/json"}


def gate_wait(
    prefer: Annotated[
        str | None,
        Header(description="`wait=0` (RFC 7240): during a swap, answer 503 at once instead of waiting (replicas)"),
    ] = None,
) -> float | None:
    """How long the client lets a request wait at the swap gate (None: the service's ``swap_wait_s``)."""
    return preferred_wait(prefer)


GateWait = Annotated[float | None, Depends(gate_wait)]


async def post_upstream(service: VLLMGateway, path: str, payload: dict[str, Any]) -> Any:
    """POST JSON to vLLM and decode the answer; failures become :class:`VLLMCallError` (502/503/504/400)."""
    session = service.upstream
    if session is None:
        raise EngineUnavailable(service.name, "starting", service.settings.retry_after_s)
    try:
        async with session.post(path, data=json.dumps(payload), headers=JSON_HEADERS) as response:
            content = await response.read()
            status = response.status
    except TimeoutError as exc:
        raise service.call_error(504, f"vLLM {path} timed out: {exc!r}") from exc
    except aiohttp.ClientError as exc:
        raise service.call_error(503, f"vLLM {path} unreachable: {exc!r}") from exc
    if status >= 400:
        text = content[:800].decode("utf-8", "replace")
        if NON_FINITE_MARK in text:
            # vLLM could not serialise its own answer: the model produced NaN/inf. Not the client's fault (a 400
            # would not be retried); /ready re-runs the probe and fails while the model keeps doing it.
            service.probe_stale()
            raise service.call_error(502, f"the model produced non-finite numbers (NaN/inf) for {path}: {text}")
        code = 400 if status < 500 else 502
        raise service.call_error(code, f"vLLM {path} answered HTTP {status}: {text}")
    return _decode_json(content)


def non_finite(values: Any) -> bool:
    """Whether any number in ``values`` (a number or a list, possibly with None entries) is NaN or inf."""
    if isinstance(values, list):
        return any(non_finite(v) for v in values)
    return isinstance(values, float) and not math.isfinite(values)


async def gather_all(aws: list[Awaitable[Any]]) -> list[Any]:
    """``asyncio.gather`` that cancels the siblings when one fails (and re-raises that one failure)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(aw) for aw in aws]  # type: ignore[arg-type]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


def create_gateway_app(
    service: VLLMGateway,
    *,
    title: str,
    register: Callable[[FastAPI, VLLMGateway], None],
) -> FastAPI:
    """A service app that starts ``service``'s vLLM child in the background and serves model info and the
    hot-swap; ``register`` adds the gateway's own routes."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start_in_background()
        try:
            yield
        finally:
            await service.stop()

    app = create_service_app(
        title=title,
        metrics=service.metrics,
        ready=service.ready,
        health=service.health,
        ready_info=lambda: {"model_version": service.version},
        retry_after_s=service.settings.retry_after_s,
        lifespan=lifespan,
    )
    app.state.service = service

    def request_exit() -> None:
        hook = getattr(app.state, "request_exit", None)  # set by services.common.serve.run_app
        if hook is not None:
            hook()
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    service.request_exit = request_exit

    @app.get("/v1/model", response_model=ModelInfo)
    async def model() -> dict[str, Any]:
        return service.model_info()

    require_admin = admin_auth(service.settings.resolved_admin_token)

    @app.post(
        "/admin/checkpoint",
        response_model=SwapResponse,
        dependencies=[Depends(require_admin)],
        responses=error_responses(400, 401, 403, 404, 409, 422, 500, 503),
    )
    async def swap_checkpoint(body: SwapRequest) -> dict[str, Any]:
        """Hot-swap the weights (bearer token). 4xx: refused, old weights serving; 5xx: see the message."""
        return await service.swap(body.path, body.version)

    register(app, service)
    return app
