"""Policy service settings: environment variables ``CPL_POLICY_*`` (docs/services.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.gateway.settings import GatewaySettings


class PolicySettings(GatewaySettings):
    model_config = SettingsConfigDict(env_prefix="CPL_POLICY_", extra="ignore", protected_namespaces=())

    port: int = Field(default=8001, ge=0, le=65535, description="port the gateway listens on")
    served_model_name: str = Field(default="policy", description="model name vLLM answers to (OpenAI `model`)")
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = Field(
        default="raw_logprobs",
        description=(
            "--logprobs-mode: raw_logprobs = the model's own log-probs, before temperature (what the search "
            "and Step-APO need); processed_logprobs = after temperature and other sampling processors"
        ),
    )
