"""Async client of the value service; implements :class:`cpl.protocols.ValueModel`.

    async with ValueClient("http://value:8002") as value:
        values = await value.evaluate(states)

Pooled connections, timeouts, retries with backoff on 502/503/504 and connection errors; a failure raises
:class:`services.common.client.ServiceError` naming the service and the cause.
"""

from __future__ import annotations

from collections.abc import Sequence

from cpl.protocols import State, ValueResult
from services.common.client import ServiceError
from services.gateway.client import GatewayClient
from services.value.schemas import ValuesRequest, ValuesResponse

__all__ = ["ServiceError", "ValueClient"]


class ValueClient(GatewayClient):
    service = "value"

    async def evaluate(self, states: Sequence[State]) -> list[ValueResult]:
        """V(s) in [-1, 1] for each state (one HTTP call for the whole batch)."""
        if not states:
            return []
        body = ValuesRequest(states=list(states)).model_dump(mode="json")
        data = await self.request_json("POST", "/v1/values", body, retry_safe=True)
        values = ValuesResponse.model_validate(data).values
        if len(values) != len(states):
            raise ServiceError(
                self.service, self.base_url, f"/v1/values returned {len(values)} values for {len(states)} states"
            )
        return values
