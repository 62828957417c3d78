"""Running a gateway app under uvicorn with the service's settings and JSON logs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from services.common.logging import configure_logging
from services.common.settings import EngineServiceSettings


def run_app(name: str, settings: EngineServiceSettings, factory: Callable[[Any], FastAPI]) -> None:
    """Serve ``factory(settings)`` until SIGINT/SIGTERM; exit 1 if the engine failed to start."""
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
    fatal = app.state.service.fatal
    if fatal:
        print(f"{name} service: {fatal}", file=sys.stderr)
        sys.exit(1)
