"""The parts of a gateway app that policy and value share: life cycle, health, readiness, metrics, model info,
the authenticated hot-swap endpoint, error mapping, and the upstream call helper."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from services.common.auth import admin_auth
from services.common.checkpoints import CheckpointError
from services.common.engine import EngineCallError, EngineService
from services.common.gate import EngineUnavailable
from services.common.metrics import MetricsMiddleware
from services.common.model_version import VersionLabel
from services.common.request_errors import error_responses, validation_error_handler

try:  # msgspec comes with vLLM; it decodes vLLM's answers ~3x faster than json (they carry per-token lists)
    from msgspec.json import decode as _decode_json
except ImportError:  # pragma: no cover
    _decode_json = json.loads

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Model-Version"


class SwapRequest(BaseModel):
    path: str = Field(description="checkpoint directory: absolute, or relative to the checkpoint root")
    version: VersionLabel | None = Field(default=None, description="version label (default: the load counter)")


class SwapResponse(BaseModel):
    version: str
    previous_version: str
    checkpoint: str
    loaded_at: str
    swap_seconds: float


class Health(BaseModel):
    status: str = Field(description="'alive', or why the gateway is not healthy")


class Readiness(BaseModel):
    ready: bool
    status: str = Field(description="'ready', or why not: starting, swapping, restarting, ...")
    model_version: str


class ModelInfo(BaseModel):
    version: str
    checkpoint: str
    loaded_at: str
    served_model_name: str
    loads: int


JSON_HEADERS = {"Content-Type": "application/json"}
_RETRY_AFTER_HEADER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


async def post_upstream(service: EngineService, path: str, payload: dict[str, Any]) -> Any:
    """POST JSON to vLLM and decode the answer; failures become :class:`EngineCallError` (502/503/504/400)."""
    session = service.upstream
    if session is None:
        raise EngineUnavailable("starting", service.settings.retry_after_s)
    try:
        async with session.post(path, data=json.dumps(payload), headers=JSON_HEADERS) as response:
            content = await response.read()
            status = response.status
    except TimeoutError as exc:
        raise EngineCallError(504, f"vLLM {path} timed out: {exc!r}") from exc
    except aiohttp.ClientError as exc:
        raise EngineCallError(503, f"vLLM {path} unreachable: {exc!r}") from exc
    if status >= 400:
        code = 400 if status < 500 else 502
        text = content[:800].decode("utf-8", "replace")
        raise EngineCallError(code, f"vLLM {path} answered HTTP {status}: {text}")
    return _decode_json(content)


async def gather_all(aws: list[Awaitable[Any]]) -> list[Any]:
    """``asyncio.gather`` that cancels the siblings when one fails (and re-raises that one failure)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(aw) for aw in aws]  # type: ignore[arg-type]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


def create_app(
    service: EngineService,
    *,
    title: str,
    register: Callable[[FastAPI, EngineService], None],
) -> FastAPI:
    """A FastAPI app that starts ``service`` in the background and serves the shared endpoints."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start_in_background()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.service = service
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
        return JSONResponse(
            {"detail": f"{service.name} service: {exc.reason}"},
            status_code=503,
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    @app.exception_handler(EngineCallError)
    async def _engine_error(request: Request, exc: EngineCallError) -> JSONResponse:
        headers = {"Retry-After": str(service.settings.retry_after_s)} if exc.status == 503 else None
        return JSONResponse(
            {"detail": f"{service.name} service: {exc.message}"}, status_code=exc.status, headers=headers
        )

    @app.exception_handler(CheckpointError)
    async def _checkpoint_error(request: Request, exc: CheckpointError) -> JSONResponse:
        headers = {"Retry-After": str(service.settings.retry_after_s)} if exc.status in (409, 503) else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "not healthy"}})
    async def health() -> JSONResponse:
        ok, detail = service.health()
        return JSONResponse({"status": detail}, status_code=200 if ok else 503)

    @app.get(
        "/ready",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready", "headers": _RETRY_AFTER_HEADER}},
    )
    async def ready() -> JSONResponse:
        ok, detail = await service.ready()
        return JSONResponse(
            {"ready": ok, "status": detail, "model_version": service.version},
            status_code=200 if ok else 503,
            headers=None if ok else {"Retry-After": str(service.settings.retry_after_s)},
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

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
    endpoints = {route.path for route in app.routes if hasattr(route, "path")}
    app.add_middleware(MetricsMiddleware, metrics=service.metrics, endpoints=endpoints)
    return app
