"""The search service's test stack, started once for this package (and stopped when its last test is done, so
that nothing it still runs takes CPU from the packages after it): the policy and value services on the embedded
planner (real vLLM), the search API and one Celery worker as subprocesses, all on free ports, and the shared
Redis at 127.0.0.1:6379 under a key prefix of this session alone (its keys are unlinked at the end; nothing
else in that Redis is touched)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from services.common.ports import find_free_port
from tests.services.conftest import REPO, _tail

PLANNER = REPO / "cpl" / "assets" / "planner"
API_KEY = "search-test-key"
REDIS_URL = os.environ.get("CPL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_TIMEOUT_S = 480


def toy_problems(n: int, seed: int = 0, family: str = "arith"):
    """Held-out toy-world problems: the embedded planner writes real plan steps for these (docs/toy-world.md);
    on other questions it mostly rambles until the token limit, which leaves trees of one node."""
    from cpl.toy.world import generate

    return generate(family, n, seed=seed, split="test")


def toy_question(seed: int = 0) -> tuple[str, str]:
    """(question, gold answer) of one held-out toy problem."""
    from cpl.toy.world import to_row

    problem = toy_problems(1, seed=seed)[0]
    return problem.question, to_row(problem)["answer"].rsplit("####", 1)[1].strip()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    """A service subprocess that a test may kill and start again (same command, same environment)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> Proc:
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_http(self, path: str, timeout: float = START_TIMEOUT_S) -> None:
        def ok() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                return httpx.get(f"{self.url}{path}", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ok, timeout, f"{self.name} {path}", interval=0.5)

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean-up, no acknowledgement, as when a machine dies."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)


def _gateway(name: str, logs: Path) -> Proc:
    prefix = f"CPL_{name.upper()}_"
    port = find_free_port()
    env = dict(os.environ)
    env.update(
        {
            f"{prefix}PORT": str(port),
            f"{prefix}HOST": "127.0.0.1",
            f"{prefix}MODEL": str(PLANNER / name),
            f"{prefix}DTYPE": "float32",
            f"{prefix}MAX_MODEL_LEN": "2048",
            f"{prefix}KV_CACHE_MEMORY_BYTES": str(96 << 20),
            f"{prefix}ENFORCE_EAGER": "true",
            f"{prefix}MODEL_VERSION": f"{name}-v1",
        }
    )
    argv = [sys.executable, "-m", f"services.{name}.main"]
    return Proc(name, argv, env, logs / f"{name}.log", url=f"http://127.0.0.1:{port}")


def _warm_up(policy_url: str, value_url: str) -> None:
    """One expansion and one value first: vLLM's first requests on a cold engine are slow. In a thread of its
    own: in the browser tests sync Playwright's event loop may already run in this one."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from cpl.protocols import ExpandRequest, State
    from services.policy.client import PolicyClient
    from services.value.client import ValueClient

    async def run() -> None:
        state = State(question=toy_question(0)[0])
        async with PolicyClient(policy_url) as policy, ValueClient(value_url) as value:
            await policy.expand([ExpandRequest(state=state, n=3, max_tokens=64, few_shot=False)])
            await value.evaluate([state])

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result()


@dataclass
class Stack:
    prefix: str
    env: dict[str, str]
    policy: Proc
    value: Proc
    api: Proc
    worker: Proc
    logs: Path
    extra: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.api.url is not None
        return self.api.url

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(REDIS_URL)

    def new_worker(self, name: str = "worker2") -> Proc:
        argv = [sys.executable, "-m", "services.cli", "worker"]
        proc = Proc(name, argv, self.env, self.logs / f"{name}.log")
        self.extra.append(proc)
        return proc


def search_env(prefix: str, policy_url: str, value_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CPL_SEARCH_REDIS_URL": REDIS_URL,
            "CPL_SEARCH_KEY_PREFIX": prefix,
            "CPL_SEARCH_POLICY_URL": policy_url,
            "CPL_SEARCH_VALUE_URL": value_url,
            "CPL_SEARCH_API_KEYS": json.dumps([API_KEY, "second-key"]),
            "CPL_SEARCH_FEW_SHOT": "false",  # the embedded planner was trained without demonstrations
            "CPL_SEARCH_DEFAULT_SIMULATIONS": "8",
            "CPL_SEARCH_MAX_SIMULATIONS": "500",
            "CPL_SEARCH_MAX_BATCH_PROBLEMS": "50",
            "CPL_SEARCH_MAX_UPLOAD_BYTES": str(256 << 10),
            "CPL_SEARCH_SLICE_SECONDS": "3",
            # Long enough for a slow first simulation on a loaded 2-core machine; a killed worker's task is
            # redelivered after it.
            "CPL_SEARCH_VISIBILITY_TIMEOUT_S": "30",
            "CPL_SEARCH_LEASE_MS": "5000",
            "CPL_SEARCH_STALL_TIMEOUT_S": "25",  # under the visibility timeout, above a slow simulation
            "CPL_SEARCH_SNAPSHOT_INTERVAL_S": "0.5",
            "CPL_SEARCH_CLIENT_RETRIES": "3",
            "CPL_SEARCH_CLIENT_MAX_BACKOFF_S": "1",
            "CPL_SEARCH_CLIENT_TIMEOUT_S": "300",
            "CPL_SEARCH_DEFAULT_MAX_STEP_TOKENS": "64",
            "CPL_SEARCH_WORKER_CONCURRENCY": "16",
            "CPL_SEARCH_LOG_FORMAT": "json",
        }
    )
    return env


def unlink_prefix(client: redis.Redis, prefix: str) -> None:
    """Remove this session's keys, and only them."""
    batch = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)


@pytest.fixture(scope="package")
def search_prefix() -> Iterator[str]:
    prefix = f"cpltest:{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        unlink_prefix(client, prefix)
    finally:
        client.close()


@pytest.fixture(scope="package")
def inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    """Policy and value services on the embedded planner, started together (their vLLM engines load at once)."""
    logs = tmp_path_factory.mktemp("inference_logs")
    policy, value = _gateway("policy", logs), _gateway("value", logs)
    try:
        policy.start()
        value.start()
        policy.wait_http("/ready")
        value.wait_http("/ready")
        _warm_up(policy.url, value.url)
        yield policy, value
    finally:
        policy.stop()
        value.stop()


@pytest.fixture(scope="package")
def stack(search_prefix: str, inference, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The search API and one worker (``cpl serve search``, ``cpl worker``) on top of the inference services."""
    policy, value = inference
    logs = tmp_path_factory.mktemp("search_logs")
    env = search_env(search_prefix, policy.url, value.url)
    port = find_free_port()
    api = Proc(
        "search-api",
        [sys.executable, "-m", "services.cli", "serve", "search", "--host", "127.0.0.1", "--port", str(port)],
        env,
        logs / "api.log",
        url=f"http://127.0.0.1:{port}",
    )
    worker = Proc("worker", [sys.executable, "-m", "services.cli", "worker"], env, logs / "worker.log")
    s = Stack(search_prefix, env, policy, value, api, worker, logs)
    try:
        api.start()
        worker.start()
        api.wait_http("/ready", timeout=120)
        yield s
    finally:
        for proc in [*s.extra, worker, api]:
            proc.stop()


def wait_final(client: httpx.Client, search_id: str, timeout: float = 300) -> dict:
    def final() -> dict | None:
        body = client.get(f"/v1/searches/{search_id}").json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(final, timeout, f"search {search_id} to finish", interval=0.3)
