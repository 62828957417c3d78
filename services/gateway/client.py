"""What the clients of a vLLM gateway share: model info and the hot-swap admin call."""

from __future__ import annotations

from typing import Any

from services.common.client import ServiceClient


class GatewayClient(ServiceClient):
    async def model_info(self) -> dict[str, Any]:
        """``GET /v1/model``: version, checkpoint path, loaded at."""
        return await self.request_json("GET", "/v1/model")

    async def swap_checkpoint(self, path: str, version: str | None = None) -> dict[str, Any]:
        """``POST /admin/checkpoint`` with the admin token; sent once, never repeated by a retry."""
        body: dict[str, Any] = {"path": path}
        if version is not None:
            body["version"] = version
        return await self.admin("POST", "/admin/checkpoint", body)
