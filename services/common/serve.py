"""Running a service app under uvicorn with the service's settings and JSON logs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from services.common.logging import configure_logging
from services.common.settings import ServerSettings

S = TypeVar("S", bound=ServerSettings)


def load_settings(name: str, cls: type[S], overrides: dict[str, Any]) -> S:
    """The service's settings from the environment and ``overrides``; exit 2 with one line per bad setting."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            lines.append(f"  {prefix}{field.upper()}: {error['msg']}")
        print(f"{name} service: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        sys.exit(2)


def run_app(name: str, settings: ServerSettings, factory: Callable[[Any], FastAPI]) -> FastAPI:
    """Serve ``factory(settings)`` until SIGINT/SIGTERM; answers the app so the caller can read its end state."""
    configure_logging(settings.log_level, settings.log_format, service=name)
    app = factory(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=settings.access_log,
            timeout_graceful_shutdown=30,
        )
    )
    # A service that must stop on its own (a gateway whose engine is gone for good) asks here rather than sending
    # itself SIGTERM: uvicorn re-raises a caught signal after shutting down, so the process would end "killed by
    # SIGTERM" instead of with the exit code its caller chooses.
    app.state.request_exit = lambda: setattr(server, "should_exit", True)
    server.run()
    return app
