"""The app factory every service uses: ``/health``, ``/ready``, ``/metrics``, request metrics, and the one
handler of :class:`services.common.errors.APIError`.

``/ready`` answers 200 only when the readiness callable says a request would succeed now (for a gateway: vLLM
answers; for the search API: Redis and both inference services answer), else 503 + ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import APIError
from services.common.metrics import MetricsMiddleware, ServiceMetrics
from services.common.request_errors import RETRY_AFTER_DOC, validation_error_handler

Readiness = Callable[[], Awaitable[tuple[bool, str]]]


class HealthBody(BaseModel):
    status: str = Field(description="'alive', or why the process should be restarted")


class ReadyBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # ready_info adds the service's fields (a gateway's model_version)

    ready: bool
    status: str = Field(description="'ready', or why not: starting, swapping, restarting, ...")


async def _alive() -> tuple[bool, str]:
    return True, "alive"


def _health_of(check: Callable[[], tuple[bool, str]] | None) -> Callable[[], Awaitable[tuple[bool, str]]]:
    if check is None:
        return _alive

    async def wrapped() -> tuple[bool, str]:
        return check()

    return wrapped


def create_service_app(
    *,
    title: str,
    metrics: ServiceMetrics,
    ready: Readiness,
    health: Callable[[], tuple[bool, str]] | None = None,
    ready_info: Callable[[], dict[str, Any]] | None = None,
    retry_after_s: int = 2,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]]
    | Callable[[FastAPI], AsyncIterator[None]]
    | None = None,
    **fastapi_kwargs: Any,
) -> FastAPI:
    """A FastAPI app with the shared endpoints; the service adds its routes to the returned app.

    ``health`` says whether the process should be restarted (liveness), ``ready`` whether it can serve now;
    ``ready_info`` adds fields to ``/ready``'s answer (a gateway's model version).
    """
    app = FastAPI(title=title, lifespan=lifespan, **fastapi_kwargs)  # type: ignore[arg-type]
    app.state.metrics = metrics
    check_health = _health_of(health)

    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers())

    @app.get(
        "/health",
        tags=["operations"],
        response_model=HealthBody,
        responses={503: {"model": HealthBody, "description": "not healthy: restart the process"}},
    )
    async def health_endpoint() -> JSONResponse:
        """Liveness: 200 while the process works, 503 when it should be restarted."""
        ok, detail = await check_health()
        return JSONResponse({"status": detail}, status_code=200 if ok else 503)

    @app.get(
        "/ready",
        tags=["operations"],
        response_model=ReadyBody,
        responses={503: {"model": ReadyBody, "description": "not ready", "headers": RETRY_AFTER_DOC}},
    )
    async def ready_endpoint() -> JSONResponse:
        """Readiness: 200 only when a request would succeed now; else 503 + Retry-After with the reason."""
        ok, detail = await ready()
        body: dict[str, Any] = {"ready": ok, "status": detail}
        if ready_info is not None:
            body.update(ready_info())
        return JSONResponse(
            body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": str(retry_after_s)}
        )

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def metrics_endpoint() -> Response:
        """Prometheus metrics (text exposition format)."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def routes() -> set[str]:
        return {route.path for route in app.routes if hasattr(route, "path")}

    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    return app
