"""Running a service app under uvicorn with the service's settings and JSON logs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from services.common.logging import configure_logging
from services.common.settings import ServerSettings


def run_app(name: str, settings: ServerSettings, factory: Callable[[Any], FastAPI]) -> FastAPI:
    """Serve ``factory(settings)`` until SIGINT/SIGTERM; answers the app so the caller can read its end state."""
    configure_logging(settings.log_level, settings.log_format, service=name)
    app = factory(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=30,
    )
    return app
