"""Async client of the policy service; implements :class:`cpl.protocols.PolicyModel`.

    async with PolicyClient("http://policy:8001") as policy:
        results = await policy.expand([ExpandRequest(state=state, n=3)])

One pooled connection pool per client (share one client between many concurrent searches), timeouts, retries
with backoff on 502/503/504 and connection errors; a failure raises
:class:`services.common.client.ServiceError` naming the service and the cause.
"""

from __future__ import annotations

from collections.abc import Sequence

from cpl.protocols import ExpandRequest, ExpandResult
from services.common.client import ServiceError
from services.gateway.client import GatewayClient
from services.policy.schemas import ExpandBatchRequest, ExpandBatchResponse

__all__ = ["PolicyClient", "ServiceError"]


class PolicyClient(GatewayClient):
    service = "policy"

    async def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        """Sample ``n`` candidate next steps for each state (one HTTP call for the whole batch)."""
        if not requests:
            return []
        body = ExpandBatchRequest(requests=list(requests)).model_dump(mode="json")
        data = await self.request_json("POST", "/v1/expand", body, retry_safe=True)
        results = ExpandBatchResponse.model_validate(data).results
        if len(results) != len(requests):
            raise ServiceError(
                self.service, self.base_url, f"/v1/expand returned {len(results)} results for {len(requests)} states"
            )
        return results
