"""Entry point of the value service: ``serve()`` (wired to ``cpl serve value``), or
``python -m services.value.main``. Settings come from ``CPL_VALUE_*`` environment variables; keyword arguments
override them."""

from __future__ import annotations

from typing import Any

from services.common.serve import load_settings
from services.gateway.serve import run_gateway
from services.value.app import create_value_app
from services.value.settings import ValueSettings


def serve(**overrides: Any) -> None:
    settings = load_settings("value", ValueSettings, overrides)
    run_gateway("value", settings, create_value_app)


if __name__ == "__main__":
    serve()
