"""The Redis key layout of the search service (docs/search-service.md). Every key starts with the configured
prefix, so several deployments (or test sessions) share one Redis without meeting."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def search(self, search_id: str) -> str:
        """Hash: ``record`` (JSON), ``status``, ``attempt`` (fencing token), ``version`` (ETag), ``slices``,
        ``deliveries``."""
        return f"{self.prefix}:search:{search_id}"

    def tree(self, search_id: str) -> str:
        """String: the tree snapshot, zlib-compressed ``cpl.tree.Tree`` JSON, written whole."""
        return f"{self.prefix}:tree:{search_id}"

    def events(self, search_id: str) -> str:
        """Stream: progress events (``XADD MAXLEN ~``); entry ids are the SSE event ids."""
        return f"{self.prefix}:events:{search_id}"

    def lease(self, search_id: str) -> str:
        """String: the worker holding the search (``SET NX PX``, renewed by a heartbeat)."""
        return f"{self.prefix}:lease:{search_id}"

    def cancel(self, search_id: str) -> str:
        """String: present when the search was asked to stop (read between simulations)."""
        return f"{self.prefix}:cancel:{search_id}"

    def request(self, kind: str, request_id: str) -> str:
        """String: the id of the search or batch created for an idempotency key."""
        return f"{self.prefix}:request:{kind}:{request_id}"

    @property
    def index(self) -> str:
        """Sorted set: every search id, scored by creation time (ms)."""
        return f"{self.prefix}:index"

    def status_index(self, status: str) -> str:
        """Sorted set per status: the ids having it, scored by creation time (ms)."""
        return f"{self.prefix}:status:{status}"

    @property
    def status_index_prefix(self) -> str:
        return f"{self.prefix}:status:"

    def batch(self, batch_id: str) -> str:
        """String: the batch (its config, size, creation time) as JSON."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_members(self, batch_id: str) -> str:
        """Sorted set: the batch's search ids, scored by their position in the batch."""
        return f"{self.prefix}:batch:{batch_id}:searches"

    @property
    def batches(self) -> str:
        """Sorted set: every batch id, scored by creation time (ms)."""
        return f"{self.prefix}:batches"

    @property
    def stats(self) -> str:
        """Hash: counters the workers add to (simulations, inference call counts and seconds)."""
        return f"{self.prefix}:stats"

    @property
    def queue(self) -> str:
        """The Celery queue of search tasks (a Redis list, under the broker's own key prefix)."""
        return f"{self.prefix}:tasks"
