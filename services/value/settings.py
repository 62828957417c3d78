"""Value service settings: environment variables ``CPL_VALUE_*`` (docs/services.md)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.gateway.settings import GatewaySettings


class ValueSettings(GatewaySettings):
    model_config = SettingsConfigDict(env_prefix="CPL_VALUE_", extra="ignore", protected_namespaces=())

    port: int = Field(default=8002, ge=0, le=65535, description="port the gateway listens on")
    served_model_name: str = Field(default="value", description="model name vLLM answers to")
    chunk_size: int = Field(
        default=64, ge=1, description="states per vLLM /classify request; chunks of a batch go concurrently"
    )
