"""Running a gateway app: the common uvicorn runner, then exit 1 if the vLLM child failed to start."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from services.common.serve import run_app
from services.gateway.settings import GatewaySettings


def run_gateway(name: str, settings: GatewaySettings, factory: Callable[[Any], FastAPI]) -> None:
    """Serve ``factory(settings)`` until SIGINT/SIGTERM; exit 1 if the engine failed to start."""
    app = run_app(name, settings, factory)
    fatal = app.state.service.fatal
    if fatal:
        print(f"{name} service: {fatal}", file=sys.stderr)
        sys.exit(1)
