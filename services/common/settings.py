"""Settings mixins every service shares, read from the environment (pydantic-settings).

A service's settings class combines the mixins it needs and sets its own ``env_prefix`` (``CPL_POLICY_``,
``CPL_SEARCH_``, ...), so ``CPL_SEARCH_PORT=8003`` sets the search API's port. List settings take JSON.
docs/services.md and docs/search-service.md list every setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """An HTTP server under uvicorn: address, port, logs."""

    model_config = SettingsConfigDict(extra="ignore", protected_namespaces=())

    host: str = Field(default="0.0.0.0", description="address the server listens on")
    port: int = Field(default=8000, ge=0, le=65535, description="port the server listens on")
    log_level: str = Field(default="INFO", description="log level")
    log_format: Literal["json", "text"] = Field(default="json", description="json: one JSON object per line")
    access_log: bool = Field(default=False, description="log every HTTP request (uvicorn access log)")


def _read_secret(value: SecretStr | None, path: Path | None) -> str | None:
    if value is not None and value.get_secret_value():
        return value.get_secret_value()
    if path is not None:
        return path.read_text().strip() or None
    return None


class AdminTokenSettings(BaseSettings):
    """The bearer token of a service's admin endpoints, given directly or as a file (a mounted secret)."""

    model_config = SettingsConfigDict(extra="ignore", protected_namespaces=())

    admin_token: SecretStr | None = Field(
        default=None, description="bearer token of the admin endpoints; unset disables them"
    )
    admin_token_file: Path | None = Field(default=None, description="file holding the admin token instead")

    @field_validator("admin_token_file", mode="after")
    @classmethod
    def _expand_admin_file(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    def resolved_admin_token(self) -> str | None:
        return _read_secret(self.admin_token, self.admin_token_file)


class ApiKeySettings(BaseSettings):
    """The API keys a client presents as ``Authorization: Bearer <key>`` (JSON list, or a file with one a line)."""

    model_config = SettingsConfigDict(extra="ignore", protected_namespaces=())

    api_keys: list[SecretStr] = Field(
        default_factory=list, description="accepted API keys, as a JSON list; with none set every request gets 403"
    )
    api_keys_file: Path | None = Field(default=None, description="file with one accepted API key a line")

    def resolved_api_keys(self) -> set[str]:
        keys = {k.get_secret_value() for k in self.api_keys if k.get_secret_value()}
        if self.api_keys_file is not None:
            keys |= {line.strip() for line in self.api_keys_file.expanduser().read_text().splitlines() if line.strip()}
        return keys
