"""The Redis store of the search service: search records, tree snapshots, event streams, indexes, leases.

Key layout: :mod:`services.search.keys` (docs/search-service.md). Our records are the source of truth for a
search's status (not Celery's result backend, which is off). Every write a worker makes goes through one Lua
script (:data:`COMMIT`) that checks the worker's fencing token (the attempt number it got when it claimed the
search) and then writes the record, the compressed tree snapshot, the status index and one event atomically:
a worker whose lease was taken over can never overwrite the newer worker's tree.

:class:`RedisTreeStore` is the :class:`cpl.store.TreeStore` view of one claim, for the search loop.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from cpl.search_stats import tree_stats
from cpl.tree import Tree
from services.search.keys import Keys
from services.search.schemas import FINAL, SearchRecord, SearchStatus

# KEYS: search hash, tree, events.  ARGV: fence ('' = the API, unfenced), record JSON, status, tree bytes ('' =
# keep), event type ('' = none), event JSON, events max, search id, status index prefix, index score,
# retention seconds (0 = keep), slice done (1/0).
# A running search asked to stop keeps the status 'cancelling' until the worker writes 'cancelled'.
COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return -1 end
local old = redis.call('HGET', KEYS[1], 'status')
local status = ARGV[3]
if old == 'cancelling' and status == 'running' then status = 'cancelling' end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'status', status)
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
if ARGV[12] == '1' then redis.call('HINCRBY', KEYS[1], 'slices', 1) end
if ARGV[4] ~= '' then redis.call('SET', KEYS[2], ARGV[4]) end
if old and old ~= status then redis.call('ZREM', ARGV[9] .. old, ARGV[8]) end
redis.call('ZADD', ARGV[9] .. status, ARGV[10], ARGV[8])
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'type', ARGV[5], 'data', ARGV[6])
end
local retention = tonumber(ARGV[11])
for i = 1, 3 do
  if retention > 0 then redis.call('EXPIRE', KEYS[i], retention) else redis.call('PERSIST', KEYS[i]) end
end
return version
"""

# KEYS: lease, search hash.  ARGV: worker token, lease ms.  Returns {attempt, deliveries, slices}, or {-1} when
# another worker holds the lease, {-2} when the search does not exist (expired or deleted).
CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {-2} end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {-1} end
local attempt = redis.call('HINCRBY', KEYS[2], 'attempt', 1)
local deliveries = redis.call('HINCRBY', KEYS[2], 'deliveries', 1)
local slices = tonumber(redis.call('HGET', KEYS[2], 'slices') or '0')
return {attempt, deliveries, slices}
"""

# KEYS: lease.  ARGV: token, lease ms.  1 when renewed, 0 when the lease is gone or someone else's.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease.  ARGV: token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('UNLINK', KEYS[1]) end
return 0
"""

# KEYS: request key, search hash, index, status index, batch members ('' key when none).
# ARGV: search id, record JSON, score, retention s (request key lives as long as a finished search).
CREATE = """
if KEYS[1] ~= '' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return existing end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
end
redis.call('HSET', KEYS[2], 'record', ARGV[2], 'status', 'queued', 'attempt', 0, 'version', 1, 'slices', 0,
  'deliveries', 0)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
if KEYS[5] ~= '' then redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1]) end
return ARGV[1]
"""


class FencedOut(Exception):
    """Another worker claimed the search after this one: this one's writes are refused."""


class SearchGone(Exception):
    """The search's record no longer exists (expired or deleted)."""


def compress_tree(tree: Tree) -> bytes:
    return zlib.compress(tree.model_dump_json().encode(), 6)


def decompress_tree(blob: bytes) -> bytes:
    return zlib.decompress(blob)


def score_of(created_at: datetime) -> int:
    """Index score: microseconds since the epoch (unique enough to page by, exact in a double)."""
    return int(created_at.timestamp() * 1_000_000)


@dataclass
class Claim:
    attempt: int
    deliveries: int
    slices: int

    @property
    def redeliveries(self) -> int:
        """Deliveries of the current slice beyond the first (a lost worker's task coming back)."""
        return self.deliveries - self.slices - 1


@dataclass
class StoredSearch:
    record: SearchRecord
    version: int

    @property
    def etag(self) -> str:
        return search_etag(self.record.id, self.version)


def search_etag(search_id: str, version: int) -> str:
    """The strong ETag of a search record: its id and its version counter (bumped by every write)."""
    return f'"{search_id}-{version}"'


class SearchStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, *, retention_s: int, events_max: int) -> None:
        self.redis = redis
        self.keys = keys
        self.retention_s = retention_s
        self.events_max = events_max
        self._commit = redis.register_script(COMMIT)
        self._claim = redis.register_script(CLAIM)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)
        self._create = redis.register_script(CREATE)

    # --- records -------------------------------------------------------------------------------------------

    async def create(self, record: SearchRecord, request_key: str | None = None) -> tuple[str, bool]:
        """Store a new queued search; with ``request_key`` an earlier search of that key wins. Answers the id
        and whether this call created it."""
        k = self.keys
        members = k.batch_members(record.batch_id) if record.batch_id else ""
        keys = [request_key or "", k.search(record.id), k.index, k.status_index(SearchStatus.QUEUED), members]
        args = [record.id, record.model_dump_json(), score_of(record.created_at), self.retention_s]
        found = (await self._create(keys=keys, args=args)).decode()
        return found, found == record.id

    async def get(self, search_id: str) -> StoredSearch | None:
        record, status, version, attempt = await self.redis.hmget(
            self.keys.search(search_id), ["record", "status", "version", "attempt"]
        )
        if record is None:
            return None
        parsed = SearchRecord.model_validate_json(record)
        parsed.status = SearchStatus(status.decode())
        parsed.attempts = int(attempt or 0)
        return StoredSearch(parsed, int(version or 0))

    async def version(self, search_id: str) -> int | None:
        """The record's version counter alone (what a conditional GET compares), or None if there is no search."""
        version = await self.redis.hget(self.keys.search(search_id), "version")
        return None if version is None else int(version)

    async def get_many(self, ids: list[str]) -> list[SearchRecord]:
        pipe = self.redis.pipeline(transaction=False)
        for search_id in ids:
            pipe.hmget(self.keys.search(search_id), ["record", "status", "attempt"])
        out = []
        for record, status, attempt in await pipe.execute():
            if record is None:
                continue  # expired since the index was read
            parsed = SearchRecord.model_validate_json(record)
            parsed.status = SearchStatus(status.decode())
            parsed.attempts = int(attempt or 0)
            out.append(parsed)
        return out

    async def tree_json(self, search_id: str) -> bytes | None:
        blob = await self.redis.get(self.keys.tree(search_id))
        return None if blob is None else decompress_tree(blob)

    async def load_tree(self, search_id: str) -> Tree | None:
        raw = await self.tree_json(search_id)
        return None if raw is None else Tree.model_validate_json(raw)

    async def commit(
        self,
        record: SearchRecord,
        *,
        fence: int | None,
        tree: Tree | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
        slice_done: bool = False,
    ) -> int:
        """Write ``record`` (and the tree snapshot, an event) in one step; answers the new ETag version.

        ``fence`` is the writer's attempt number (None for the API's own writes); a stale one raises
        :class:`FencedOut`. A final record starts the retention clock on the record, tree and events.
        """
        k = self.keys
        blob = compress_tree(tree) if tree is not None else b""
        if tree is not None:
            record.snapshot_bytes = len(blob)
        kind, data = event if event is not None else ("", {})
        retention = self.retention_s if record.status in FINAL else 0
        result = await self._commit(
            keys=[k.search(record.id), k.tree(record.id), k.events(record.id)],
            args=[
                "" if fence is None else str(fence),
                record.model_dump_json(),
                record.status.value,
                blob,
                kind,
                json.dumps(data, default=str),
                self.events_max,
                record.id,
                k.status_index_prefix,
                score_of(record.created_at),
                retention,
                "1" if slice_done else "0",
            ],
        )
        if result == -1:
            raise FencedOut(f"search {record.id}: attempt {fence} was superseded by a newer claim")
        if result == -2:
            raise SearchGone(f"search {record.id} no longer exists")
        return int(result)

    # --- paging --------------------------------------------------------------------------------------------

    async def page(
        self, *, status: SearchStatus | None, batch_id: str | None, cursor: int | None, limit: int
    ) -> tuple[list[SearchRecord], int | None]:
        """Newest first; ``cursor`` is the score to continue below (exclusive)."""
        k = self.keys
        if batch_id is not None:
            source = k.batch_members(batch_id)
        elif status is not None:
            source = k.status_index(status)
        else:
            source = k.index
        top = "+inf" if cursor is None else f"({cursor}"
        out: list[SearchRecord] = []
        chunk = limit + 1
        # Filtering by status inside a batch may drop rows: read on until one row past the page is found.
        while True:
            rows = await self.redis.zrevrangebyscore(source, top, "-inf", start=0, num=chunk, withscores=True)
            records = {r.id: r for r in await self.get_many([m.decode() for m, _ in rows])}
            for member, score in rows:
                record = records.get(member.decode())
                if record is None or (status is not None and record.status != status):
                    top = f"({int(score)}"
                    continue
                if len(out) == limit:
                    return out, score_of(out[-1].created_at)
                out.append(record)
                top = f"({int(score)}"
            if len(rows) < chunk:
                return out, None

    async def batch_ids(self, batch_id: str) -> list[str]:
        return [m.decode() for m in await self.redis.zrange(self.keys.batch_members(batch_id), 0, -1)]

    # --- batches -------------------------------------------------------------------------------------------

    async def save_batch(self, batch_id: str, data: dict[str, Any], created_at: datetime) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.batch(batch_id), json.dumps(data, default=str))
        pipe.zadd(self.keys.batches, {batch_id: score_of(created_at)})
        await pipe.execute()

    async def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.keys.batch(batch_id))
        return None if raw is None else json.loads(raw)

    async def claim_request(self, kind: str, request_id: str, new_id: str) -> str:
        """The id stored for this idempotency key: ``new_id`` if the key is new (then the caller creates it)."""
        key = self.keys.request(kind, request_id)
        if await self.redis.set(key, new_id, nx=True, ex=self.retention_s):
            return new_id
        existing = await self.redis.get(key)
        return existing.decode() if existing is not None else new_id

    # --- cancel --------------------------------------------------------------------------------------------

    async def request_cancel(self, search_id: str) -> StoredSearch | None:
        """Ask a search to stop: a queued one is cancelled at once, a running one becomes ``cancelling`` and its
        worker stops before its next simulation. Idempotent; final searches are left as they are."""
        await self.redis.set(self.keys.cancel(search_id), b"1", ex=self.retention_s)
        stored = await self.get(search_id)
        if stored is None or stored.record.status.final or stored.record.status is SearchStatus.CANCELLING:
            return stored
        record = stored.record
        if record.status is SearchStatus.QUEUED:
            record.status = SearchStatus.CANCELLED
            record.finished_at = datetime.now(UTC)
            event = ("cancelled", {"simulations_done": record.progress.simulations_done})
        else:
            record.status = SearchStatus.CANCELLING
            event = ("cancelling", {})
        try:
            await self.commit(record, fence=None, event=event)
        except SearchGone:
            return None
        return await self.get(search_id)

    async def set_task_ids(self, task_ids: dict[str, str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for search_id, task_id in task_ids.items():
            pipe.hset(self.keys.search(search_id), "task_id", task_id)
        await pipe.execute()

    async def task_id(self, search_id: str) -> str | None:
        value = await self.redis.hget(self.keys.search(search_id), "task_id")
        return None if value is None else value.decode()

    async def cancel_requested(self, search_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.cancel(search_id)))

    # --- leases --------------------------------------------------------------------------------------------

    async def claim(self, search_id: str, token: str, lease_ms: int) -> Claim | None:
        """Take the lease on a search and a new fencing token; None when another worker holds the lease."""
        result = await self._claim(
            keys=[self.keys.lease(search_id), self.keys.search(search_id)], args=[token, lease_ms]
        )
        if result[0] == -2:
            raise SearchGone(f"search {search_id} no longer exists")
        if result[0] == -1:
            return None
        return Claim(attempt=int(result[0]), deliveries=int(result[1]), slices=int(result[2]))

    async def renew(self, search_id: str, token: str, lease_ms: int) -> bool:
        return bool(await self._renew(keys=[self.keys.lease(search_id)], args=[token, lease_ms]))

    async def release(self, search_id: str, token: str) -> None:
        await self._release(keys=[self.keys.lease(search_id)], args=[token])

    # --- events and stats ------------------------------------------------------------------------------------

    async def read_events(
        self, search_id: str, after: str, block_ms: int | None, count: int = 100
    ) -> list[tuple[str, str, str]]:
        """Events after stream id ``after`` ('0' = from the start): (id, type, data JSON)."""
        result = await self.redis.xread({self.keys.events(search_id): after}, count=count, block=block_ms)
        out = []
        for _, entries in result or []:
            for entry_id, fields in entries:
                out.append((entry_id.decode(), fields[b"type"].decode(), fields[b"data"].decode()))
        return out

    async def add_stats(self, **increments: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for name, amount in increments.items():
            pipe.hincrbyfloat(self.keys.stats, name, amount)
        await pipe.execute()

    async def stats(self) -> dict[str, float]:
        raw = await self.redis.hgetall(self.keys.stats)
        return {k.decode(): float(v) for k, v in raw.items()}

    async def status_counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for status in SearchStatus:
            pipe.zcard(self.keys.status_index(status))
        return {s.value: int(n) for s, n in zip(SearchStatus, await pipe.execute(), strict=True)}


class RedisTreeStore:
    """:class:`cpl.store.TreeStore` over Redis for one claim: every write is fenced with the claim's attempt.

    ``record_for(tree, status)`` builds the search record that goes with a snapshot (progress, best, versions).
    """

    def __init__(
        self,
        store: SearchStore,
        fence: int,
        record_for: Callable[[Tree, SearchStatus], SearchRecord],
    ) -> None:
        self.store = store
        self.fence = fence
        self.record_for = record_for

    async def save_snapshot(self, tree: Tree) -> None:
        record = self.record_for(tree, SearchStatus.RUNNING)
        if record.status.final:
            return  # a snapshot never replaces a finished tree
        progress = record.progress.model_dump()
        await self.store.commit(record, fence=self.fence, tree=tree, event=("progress", progress))

    async def load(self, tree_id: str) -> Tree | None:
        return await self.store.load_tree(tree_id)

    async def list_ids(self) -> list[str]:
        return sorted(m.decode() for m in await self.store.redis.zrange(self.store.keys.index, 0, -1))

    async def mark_finished(self, tree: Tree) -> None:
        if not tree.finished:
            raise ValueError(f"tree {tree.id} has {tree.simulations_done}/{tree.config.simulations} simulations")
        record = self.record_for(tree, SearchStatus.SUCCEEDED)
        record.finished_at = datetime.now(UTC)
        record.tree_stats = tree_stats(tree)
        data = {"best": record.best.model_dump() if record.best else None, **record.progress.model_dump()}
        await self.store.commit(record, fence=self.fence, tree=tree, event=("succeeded", data))
