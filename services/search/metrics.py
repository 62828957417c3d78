"""``GET /metrics`` of the search API (names ``cpl_search_``): the request metrics every service has, plus the
state of the whole search system read from Redis every few seconds: queue depth, searches by status, and the
workers' counters (simulations, expand and value calls and seconds; ``rate()`` of them gives simulations per
second and mean latencies)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from services.common.metrics import ServiceMetrics
from services.search.keys import Keys
from services.search.store import SearchStore

REFRESH_S = 2.0


class _StoreCollector(Collector):
    def __init__(self) -> None:
        self.queue_depth: float | None = None
        self.by_status: dict[str, int] = {}
        self.stats: dict[str, float] = {}

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self.queue_depth is not None:
            yield GaugeMetricFamily("cpl_search_queue_depth", "search tasks waiting in the queue", self.queue_depth)
        status = GaugeMetricFamily("cpl_search_searches", "searches stored, by status", labels=["status"])
        for name, count in sorted(self.by_status.items()):
            status.add_metric([name], count)
        yield status
        descriptions = {
            "simulations": "MCTS simulations run by the workers",
            "expand_calls": "policy /v1/expand calls made by the workers",
            "expand_seconds": "seconds the workers waited for /v1/expand",
            "value_calls": "value /v1/values calls made by the workers",
            "value_seconds": "seconds the workers waited for /v1/values",
        }
        for name, text in descriptions.items():
            yield CounterMetricFamily(f"cpl_search_worker_{name}", text, value=self.stats.get(name, 0.0))


class SearchMetrics(ServiceMetrics):
    def __init__(self, store: SearchStore, keys: Keys) -> None:
        super().__init__("search")
        self.store = store
        self.keys = keys
        self.created = Counter("cpl_search_created", "searches created through the API", registry=self.registry)
        self._collector = _StoreCollector()
        self.registry.register(self._collector)

    async def refresh(self) -> None:
        c = self._collector
        queue_key = f"{self.keys.prefix}:celery:{self.keys.queue}"
        c.queue_depth = float(await self.store.redis.llen(queue_key))
        c.by_status = await self.store.status_counts()
        c.stats = await self.store.stats()

    async def refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except RedisError as exc:
                logging.getLogger(__name__).warning("metrics refresh failed", extra={"error": str(exc)})
            await asyncio.sleep(REFRESH_S)
