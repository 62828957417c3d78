"""The Celery worker of the search service (``cpl worker``).

One asyncio event loop per worker process runs in a background thread and owns the shared clients: one Redis
client, one :class:`~services.policy.client.PolicyClient` and one :class:`~services.value.client.ValueClient`
(each one pooled httpx client). Celery's threads pool runs many tasks at once; each task submits its search's
coroutine to that loop and waits, so the trees of every task share the connection pools and their expansions
reach the vLLM engines together (large batches).

A task searches one tree for at most ``slice_seconds`` (a slice), then snapshots it and re-enqueues itself, so no
message runs for hours. Before it touches the tree it takes the search's lease (``SET NX PX``, renewed by a
heartbeat) and a new fencing token (the attempt number); every write is checked against that token inside the
store's Lua script. A second delivery of the same task finds the lease taken and leaves; a task whose worker
died comes back after the visibility timeout and resumes the last snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.exceptions import Reject

from cpl.config import SearchConfig
from cpl.mcts import MCTS, SearchCancelled
from cpl.protocols import ExpandRequest, ExpandResult, State, ValueResult
from cpl.tree import Tree
from services.common.aio import cancel_and_wait
from services.common.client import ServiceError
from services.common.redis_client import REDIS_ERRORS, redis_client
from services.policy.client import PolicyClient
from services.search.celery_app import TASK_RUN, create_celery
from services.search.keys import Keys
from services.search.records import with_tree
from services.search.schemas import ErrorInfo, SearchRecord, SearchStatus
from services.search.settings import SearchSettings
from services.search.store import Claim, FencedOut, RedisTreeStore, SearchGone, SearchStore
from services.value.client import ValueClient

log = logging.getLogger(__name__)


class InferenceStats:
    """Counters of one slice, added to the store's stats hash at each snapshot (read by the API's /metrics)."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def add(self, name: str, amount: float) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + amount

    def take(self) -> dict[str, float]:
        counts, self.counts = self.counts, {}
        return counts


class TimedPolicy:
    """The shared policy client, timed per call (a :class:`cpl.protocols.PolicyModel`)."""

    def __init__(self, client: PolicyClient, stats: InferenceStats) -> None:
        self.client = client
        self.stats = stats

    async def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        start = time.perf_counter()
        results = await self.client.expand(requests)
        self.stats.add("expand_seconds", time.perf_counter() - start)
        self.stats.add("expand_calls", 1)
        return results


class RecordingValue:
    """The shared value client, timed, noting the model versions that answered this search."""

    def __init__(self, client: ValueClient, stats: InferenceStats, versions: set[str]) -> None:
        self.client = client
        self.stats = stats
        self.versions = versions

    async def evaluate(self, states: Sequence[State]) -> list[ValueResult]:
        start = time.perf_counter()
        results = await self.client.evaluate(states)
        self.stats.add("value_seconds", time.perf_counter() - start)
        self.stats.add("value_calls", 1)
        self.versions.update(r.model_version for r in results if r.model_version)
        return results


class WorkerRuntime:
    """The worker process's event loop (a daemon thread) and the clients living on it."""

    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="cpl-search-loop", daemon=True)
        self._thread.start()
        self.submit(self._open()).result()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _open(self) -> None:
        s = self.settings
        self.redis = redis_client(s.redis_url)
        self.store = SearchStore(self.redis, Keys(s.key_prefix), retention_s=s.retention_s, events_max=s.events_max)
        common: dict[str, Any] = {
            "timeout_s": s.client_timeout_s,
            "retries": s.client_retries,
            "max_backoff_s": s.client_max_backoff_s,
            "api_key": s.inference_token(),
            "max_connections": max(64, s.worker_concurrency * 2),
        }
        self.policy = PolicyClient(s.policy_url, **common)
        self.value = ValueClient(s.value_url, **common)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the shared loop and wait for it (called from a Celery pool thread)."""
        return self.submit(coro).result()

    def close(self) -> None:
        async def _close() -> None:
            await self.policy.aclose()
            await self.value.aclose()
            await self.redis.aclose()

        with contextlib.suppress(Exception):
            self.submit(_close()).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def await_chain(coro: Any) -> str:
    """Where a suspended coroutine waits: its frame, the frame of what it awaits, and so on, down to the future."""
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:  # a future, a task or another awaitable: the end of the chain
            lines.append(f"  awaiting {coro!r}"[:400])
            break
        lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}')
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
    return "\n".join(lines)


class Stalled(Exception):
    """No simulation completed for ``stall_timeout_s``; the message says where the search was waiting."""


async def _watched(search: Coroutine[Any, Any, Tree], progress_at: list[float], stall_timeout_s: float) -> Tree:
    """Run ``search``; cancel it and raise :class:`Stalled` once ``progress_at[0]`` is ``stall_timeout_s`` old.

    Every await of a search is bounded (HTTP and Redis timeouts, grading's timeout), so a stall is a bug or a lost
    answer somewhere; without this watchdog its lease would stay renewed and the search would stay running for
    ever. The await chain at the moment of the stall is in the message, for the log.
    """
    task = asyncio.ensure_future(search)
    try:
        while True:
            remaining = progress_at[0] + stall_timeout_s - time.monotonic()
            done, _ = await asyncio.wait({task}, timeout=max(0.0, min(remaining, 5.0)))
            if done:
                return task.result()
            if time.monotonic() - progress_at[0] >= stall_timeout_s:
                raise Stalled(
                    f"no simulation completed for {stall_timeout_s:g} s; the search waited at:\n"
                    + await_chain(task.get_coro())
                )
    finally:
        if not task.done():
            await cancel_and_wait(task)


async def _heartbeat(store: SearchStore, search_id: str, token: str, lease_ms: int, lost: asyncio.Event) -> None:
    while True:
        await asyncio.sleep(lease_ms / 3000)
        try:
            renewed = await store.renew(search_id, token, lease_ms)
        except REDIS_ERRORS:
            log.warning("lease renewal failed; retrying", extra={"search_id": search_id})
            continue
        if not renewed:
            log.warning("lease lost; stopping", extra={"search_id": search_id})
            lost.set()
            return


async def run_slice(rt: WorkerRuntime, search_id: str) -> str:
    """One delivery of a search's task. Answers what happened: ``continue`` means "re-enqueue me"."""
    store = rt.store
    stored = await store.get(search_id)
    if stored is None:
        log.warning("search not found (expired or deleted)", extra={"search_id": search_id})
        return "gone"
    if stored.record.status.final:
        return "final"
    token = f"{rt.worker_id}:{uuid.uuid4().hex[:12]}"
    try:
        claim = await store.claim(search_id, token, rt.settings.lease_ms)
    except SearchGone:
        return "gone"
    if claim is None:
        log.info("search is held by another worker; this delivery leaves it", extra={"search_id": search_id})
        return "duplicate"
    # A slice lasts SLICE_SECONDS plus one simulation; the watchdog inside bounds the search, this bounds the rest
    # of the slice too (its commits), so a lost answer can never keep the lease renewed for ever.
    overrun_s = rt.settings.slice_seconds + rt.settings.stall_after_s
    try:
        async with asyncio.timeout(overrun_s):
            return await _run_claimed(rt, search_id, claim, token)
    except TimeoutError:
        log.error("slice overran; abandoned", extra={"search_id": search_id, "seconds": overrun_s})
        return "stalled"
    except FencedOut as exc:
        log.warning("superseded by a newer claim", extra={"search_id": search_id, "reason": str(exc)})
        return "fenced"
    except SearchGone:
        return "gone"
    finally:
        with contextlib.suppress(*REDIS_ERRORS):
            await store.release(search_id, token)


async def _run_claimed(rt: WorkerRuntime, search_id: str, claim: Claim, token: str) -> str:
    s = rt.settings
    store = rt.store
    fence = claim.attempt
    stored = await store.get(search_id)
    if stored is None:
        return "gone"
    record = stored.record
    if record.status.final:
        return "final"
    config = SearchConfig.model_validate(record.config)
    tree = await store.load_tree(search_id) or Tree.new(search_id, record.question, record.answer, config)
    value_versions = set(record.model_versions.value)

    def record_for(t: Tree, status: SearchStatus) -> SearchRecord:
        updated = with_tree(record, t, value_versions)
        updated.status = status
        return updated

    async def finish(status: SearchStatus, event: str, error: ErrorInfo | None = None) -> None:
        final = record_for(tree, status)
        final.finished_at = datetime.now(UTC)
        final.error = error
        data: dict[str, Any] = {"status": status.value, **final.progress.model_dump()}
        if error is not None:
            data["error"] = error.model_dump()
        await store.commit(final, fence=fence, tree=tree, event=(event, data))

    if claim.redeliveries > s.max_redeliveries:
        await finish(
            SearchStatus.FAILED,
            "failed",
            ErrorInfo(
                code="redelivered",
                message=(
                    f"the search's task was delivered {claim.redeliveries + 1} times without finishing a slice "
                    "(its worker was lost, or the slice stalled, each time); "
                    f"gave up after CPL_SEARCH_MAX_REDELIVERIES={s.max_redeliveries}"
                ),
            ),
        )
        return "failed"
    if await store.cancel_requested(search_id):
        await finish(SearchStatus.CANCELLED, "cancelled")
        return "cancelled"

    if record.started_at is None:
        record.started_at = datetime.now(UTC)
    await store.commit(
        record_for(tree, SearchStatus.RUNNING),
        fence=fence,
        tree=tree,
        event=("running", {"attempt": fence, "worker": rt.worker_id, "simulations_done": tree.simulations_done}),
    )
    stats = InferenceStats()
    mcts = MCTS(TimedPolicy(rt.policy, stats), RecordingValue(rt.value, stats, value_versions), config)
    tree_store = RedisTreeStore(store, fence, record_for)
    lost = asyncio.Event()
    heartbeat = asyncio.create_task(_heartbeat(store, search_id, token, s.lease_ms, lost))
    deadline = time.monotonic() + s.slice_seconds
    stop_reason = ""
    last_snapshot = time.monotonic()
    simulations_at_snapshot = tree.simulations_done

    async def flush_stats() -> None:
        nonlocal simulations_at_snapshot
        counts = stats.take()
        counts["simulations"] = tree.simulations_done - simulations_at_snapshot
        simulations_at_snapshot = tree.simulations_done
        with contextlib.suppress(*REDIS_ERRORS):
            await store.add_stats(**counts)

    async def should_stop() -> bool:
        nonlocal stop_reason
        if lost.is_set():
            stop_reason = "lease"
        elif await store.cancel_requested(search_id):
            stop_reason = "cancel"
        elif time.monotonic() > deadline:
            stop_reason = "slice"
        return bool(stop_reason)

    progress_at = [time.monotonic()]  # when the last simulation completed (the stall watchdog reads it)

    async def on_progress(t: Tree) -> None:
        nonlocal last_snapshot
        progress_at[0] = time.monotonic()
        # The live tree: at most snapshot_interval_s behind the search (plus one simulation).
        if not t.finished and time.monotonic() - last_snapshot >= s.snapshot_interval_s:
            last_snapshot = time.monotonic()
            await tree_store.save_snapshot(t)
            await flush_stats()

    try:
        await _watched(
            mcts.search(tree, on_progress=on_progress, should_cancel=should_stop), progress_at, s.stall_after_s
        )
    except Stalled as exc:
        # The tree in memory may hold half a simulation: nothing of it is written; the next delivery resumes the
        # last snapshot.
        log.error("search stalled; slice abandoned", extra={"search_id": search_id, "error": str(exc)})
        return "stalled"
    except SearchCancelled:
        if stop_reason == "slice":
            await store.commit(
                record_for(tree, SearchStatus.RUNNING),
                fence=fence,
                tree=tree,
                event=("slice", {"simulations_done": tree.simulations_done}),
                slice_done=True,
            )
            return "continue"
        if stop_reason == "cancel":
            await finish(SearchStatus.CANCELLED, "cancelled")
            return "cancelled"
        return "lost"
    except ServiceError as exc:
        log.error("inference failed; search failed", extra={"search_id": search_id, "error": str(exc)})
        await finish(SearchStatus.FAILED, "failed", ErrorInfo(code=f"{exc.service}_service_failed", message=str(exc)))
        return "failed"
    except (FencedOut, SearchGone, *REDIS_ERRORS):
        raise  # handled by the caller: another worker owns the search, or Redis is away (the task is retried)
    except Exception as exc:
        # A bug or a malformed stored tree must not leave the search "running" for ever.
        log.exception("search failed unexpectedly", extra={"search_id": search_id})
        await finish(
            SearchStatus.FAILED, "failed", ErrorInfo(code="internal_error", message=f"{exc.__class__.__name__}: {exc}")
        )
        return "failed"
    finally:
        await cancel_and_wait(heartbeat)
        await flush_stats()
    await tree_store.mark_finished(tree)
    return "succeeded"


def register_tasks(app: Celery, settings: SearchSettings, runtime: Callable[[], WorkerRuntime]) -> Any:
    @app.task(name=TASK_RUN, bind=True)
    def run_search(self: Any, search_id: str) -> str:
        # Redis away (a restart): wait and run the slice again in this delivery, which stays unacknowledged
        # meanwhile; past the visibility timeout the broker hands the task to someone else anyway.
        deadline = time.monotonic() + settings.visibility_timeout_s
        delay = 1.0
        while True:
            try:
                outcome = runtime().run(run_slice(runtime(), search_id))
                break
            except REDIS_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise Reject(exc, requeue=True) from exc
                log.warning("Redis unavailable; slice retried", extra={"search_id": search_id, "error": str(exc)})
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        if outcome in ("continue", "stalled"):
            run_search.apply_async(args=(search_id,))
        elif outcome == "duplicate":
            # Another delivery holds the search. This message may be the only one left for it (the broker
            # redelivers a task that outlived the visibility timeout, and that copy is acknowledged here), so
            # look again once the holder's lease would have run out: if the holder died, this one resumes.
            run_search.apply_async(args=(search_id,), countdown=2 * settings.lease_ms / 1000)
        log.info("slice done", extra={"search_id": search_id, "outcome": outcome})
        return outcome

    return run_search


def create_worker_app(settings: SearchSettings) -> Celery:
    """The Celery app with the search task, its runtime started lazily on the first task of the process."""
    app = create_celery(settings)
    lock = threading.Lock()
    holder: list[WorkerRuntime] = []

    def runtime() -> WorkerRuntime:
        with lock:
            if not holder:
                holder.append(WorkerRuntime(settings))
            return holder[0]

    register_tasks(app, settings, runtime)
    return app


CHILD_ENV = "CPL_SEARCH_WORKER_CHILD"
QUEUES = ("search", "train")


def parse_queues(value: str) -> list[str]:
    """``--queues search,train`` → ``["search", "train"]``; an unknown name is a ValueError with the choices."""
    names = [q.strip() for q in value.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if not names or unknown:
        raise ValueError(f"--queues takes a comma-separated list of {', '.join(QUEUES)} (got {value!r})")
    return list(dict.fromkeys(names))


def supervise_worker(overrides: dict[str, Any], queues: Sequence[str] = ("search",)) -> int:
    """``cpl worker``: run one Celery worker child per queue and start each again when it dies.

    The search queue's child runs a threads pool (many trees at once); the train queue's child runs the solo pool,
    one job at a time (one GPU, one training). Celery's consumer can exit on a broker connection lost
    mid-delivery (kombu's restore of unacknowledged messages fails while Redis is away: "Unrecoverable error"),
    so a restarting Redis would otherwise take the worker down for good. SIGTERM / SIGINT are passed on to the
    children and end the supervisor once they have exited.
    """
    import signal
    import subprocess
    import sys

    env = {**os.environ, CHILD_ENV: "1"}
    env.update({f"CPL_SEARCH_{k.upper()}": str(v) for k, v in overrides.items()})
    stopping = False
    children: dict[str, subprocess.Popen[bytes]] = {}
    started: dict[str, float] = {}
    delays = {queue: 1.0 for queue in queues}
    restart_at: dict[str, float] = {queue: 0.0 for queue in queues}

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes: dict[str, int] = {}
    while True:
        now = time.monotonic()
        for queue in queues:
            child = children.get(queue)
            if child is None:
                if stopping or queue in codes or now < restart_at[queue]:
                    continue
                started[queue] = now
                children[queue] = subprocess.Popen(
                    [sys.executable, "-m", "services.search.main", "worker-child", queue], env=env
                )
                continue
            code = child.poll()
            if code is None:
                continue
            del children[queue]
            if stopping:
                codes[queue] = code
                continue
            # Not asked to stop, so any exit is a fault, 0 included: Celery's worker exits 0 after an
            # "Unrecoverable error" of its broker connection (a Redis restart mid-delivery).
            if now - started[queue] > 60:
                delays[queue] = 1.0
            log.error(
                "worker process exited; starting it again",
                extra={"queue": queue, "exit_code": code, "delay_s": delays[queue]},
            )
            restart_at[queue] = now + delays[queue]
            delays[queue] = min(delays[queue] * 2, 30.0)
        if not children and (stopping or len(codes) == len(queues)):
            return max(codes.values(), default=0)
        time.sleep(0.2)


def run_worker(
    settings: SearchSettings, queue: str = "search", *, loglevel: str = "INFO", extra_args: Sequence[str] = ()
) -> None:
    """One Celery worker process: the search queue (threads pool), or the train queue (solo pool: one training
    or round at a time; needs ``CPL_TRAINER_CHECKPOINT_ROOT``)."""
    from services.common.logging import configure_logging
    from services.trainer.tasks import TRAIN_QUEUE, register_if_configured

    configure_logging(settings.log_level, settings.log_format, service=f"{queue}-worker")
    app = create_worker_app(settings)
    if queue == "train":
        if not register_if_configured(app):
            raise SystemExit("cpl worker --queues train: CPL_TRAINER_CHECKPOINT_ROOT is not set")
        pool = ["--pool=solo", "--concurrency=1", f"--queues={TRAIN_QUEUE}"]
    else:
        pool = [
            "--pool=threads",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={Keys(settings.key_prefix).queue}",
        ]
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        *pool,
        f"--hostname={queue}@%h-{os.getpid()}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        *extra_args,
    ]
    app.worker_main(argv)
