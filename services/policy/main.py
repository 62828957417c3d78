"""Entry point of the policy service: ``serve()`` (wired to ``cpl serve policy``), or
``python -m services.policy.main``. Settings come from ``CPL_POLICY_*`` environment variables; keyword
arguments override them."""

from __future__ import annotations

from typing import Any

from services.common.serve import load_settings
from services.gateway.serve import run_gateway
from services.policy.app import create_policy_app
from services.policy.settings import PolicySettings


def serve(**overrides: Any) -> None:
    settings = load_settings("policy", PolicySettings, overrides)
    run_gateway("policy", settings, create_policy_app)


if __name__ == "__main__":
    serve()
