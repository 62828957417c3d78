"""Fixtures of the service tests: tiny checkpoints under one checkpoint root, and one policy and one value
gateway (each with its vLLM child) started once for this package, as subprocesses, on free ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cpl.formats import PromptFormat, StepKind
from cpl.protocols import ExpandRequest, ExpandResult, State
from services.common.ports import find_free_port
from services.stack.up import VALUE_BUSY_LOOP_S

ADMIN_TOKEN = "test-admin-token"
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 480

QUESTION = "Ann has 3 apples and buys 4 more. How many apples does Ann have now?"

# Greedy expansions compared across a hot-swap (temperature 0, so each is deterministic for given weights).
GREEDY_REQUESTS = [
    ExpandRequest(state=State(question=QUESTION), n=1, temperature=0.0, max_tokens=24, few_shot=False),
    ExpandRequest(
        state=State(question=QUESTION, steps=[(StepKind.PLAN, "Plan 1: Take the starting number of apples.")]),
        n=1,
        temperature=0.0,
        max_tokens=24,
    ),
    ExpandRequest(
        state=State(question="Ben has 12 coins and gives away 5. How many coins are left?", format=PromptFormat.XML),
        n=1,
        temperature=0.0,
        max_tokens=24,
        few_shot=False,
    ),
    ExpandRequest(
        state=State(question=QUESTION, format=PromptFormat.XML),
        n=1,
        temperature=0.0,
        max_tokens=16,
        force_solution=True,
        few_shot=False,
    ),
]


def greedy_signature(result: ExpandResult) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(c.kind.value, c.text, tuple(c.token_ids or ())) for c in result.candidates]


@dataclass
class Checkpoints:
    root: Path
    a: tuple[Path, Path]  # (policy, value), seed 0
    b: tuple[Path, Path]  # (policy, value), seed 1, same tokenizer as A


@dataclass
class RunningService:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    root: Path
    token: str = ADMIN_TOKEN
    greedy: dict[str, list[list[tuple[str, str, tuple[int, ...]]]]] = field(default_factory=dict)

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def model_info(self) -> dict:
        return httpx.get(f"{self.url}/v1/model", timeout=10).json()

    def swap(self, path: str, timeout: float = 300) -> httpx.Response:
        return httpx.post(
            f"{self.url}/admin/checkpoint", json={"path": path}, headers=self.admin_headers(), timeout=timeout
        )


@pytest.fixture(scope="package")
def svc_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """Checkpoints A (seed 0) and B (seed 1: same shapes and tokenizer, other weights) under one root."""
    from cpl.models.tiny import build_tiny_models, default_corpus

    root = tmp_path_factory.mktemp("checkpoints")
    a = build_tiny_models(root / "A", seed=0)
    b = build_tiny_models(root / "B", seed=1, corpus=default_corpus(seed=0))
    return Checkpoints(root=root, a=a, b=b)


def _start(module: str, prefix: str, env_over: dict[str, str], log_path: Path, root: Path) -> RunningService:
    port = find_free_port()
    env = dict(os.environ)
    env.update(
        {
            f"{prefix}PORT": str(port),
            f"{prefix}HOST": "127.0.0.1",
            f"{prefix}CHECKPOINT_ROOT": str(root),
            f"{prefix}ADMIN_TOKEN": ADMIN_TOKEN,
            f"{prefix}DTYPE": "float32",
            f"{prefix}MAX_MODEL_LEN": "4096",
            f"{prefix}KV_CACHE_MEMORY_BYTES": str(256 << 20),
            f"{prefix}ENFORCE_EAGER": "true",
            f"{prefix}LOG_FORMAT": "json",
            **env_over,
        }
    )
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", module], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    service = RunningService(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, root=root)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{module} exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(f"{service.url}/ready", timeout=5).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"{module} not ready after {START_TIMEOUT_S}s:\n{_tail(log_path)}")
        time.sleep(1.0)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


async def _greedy(url: str) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    from services.policy.client import PolicyClient

    async with PolicyClient(url) as client:
        results = await client.expand(GREEDY_REQUESTS)
    return [greedy_signature(r) for r in results]


@pytest.fixture(scope="package")
def policy_service(svc_checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory):
    """The policy gateway, started fresh on checkpoint B, then hot-swapped to A.

    Its greedy expansions of :data:`GREEDY_REQUESTS` are recorded on the fresh B server (``greedy["B"]``) and
    after the swap to A (``greedy["A"]``), so the hot-swap test can compare a swap A -> B with a server started
    fresh on B without starting a third vLLM engine.
    """
    logs = tmp_path_factory.mktemp("policy_logs")
    service = _start(
        "services.policy.main",
        "CPL_POLICY_",
        {"CPL_POLICY_MODEL": str(svc_checkpoints.b[0])},
        logs / "policy.log",
        svc_checkpoints.root,
    )
    try:
        service.greedy["B"] = asyncio.run(_greedy(service.url))
        response = service.swap("A/policy")
        assert response.status_code == 200, response.text
        service.greedy["A"] = asyncio.run(_greedy(service.url))
        yield service
    finally:
        _stop(service.proc)


@pytest.fixture(scope="package")
def value_service(svc_checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory):
    """The value gateway, started on checkpoint A."""
    logs = tmp_path_factory.mktemp("value_logs")
    service = _start(
        "services.value.main",
        "CPL_VALUE_",
        # As cpl up runs it (services/stack/up.py): 20 ms of spinning between engine steps, not vLLM's 1 s.
        {"CPL_VALUE_MODEL": str(svc_checkpoints.a[1]), "CPL_VALUE_VLLM_BUSY_LOOP_S": VALUE_BUSY_LOOP_S},
        logs / "value.log",
        svc_checkpoints.root,
    )
    try:
        yield service
    finally:
        _stop(service.proc)
