"""Faults of the real inference services (vLLM on tiny models): a checkpoint whose weights are NaN, or whose
finite weights make the model answer NaN/inf, is refused and the old version keeps serving; a vLLM child that
dies is restarted, and once the restart budget is spent the gateway exits non-zero with no vLLM process left."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.ports import find_free_port
from tests.services.conftest import REPO, _greedy, _stop, _tail

pytestmark = pytest.mark.vllm


def _variant(source: Path, target: Path, change) -> Path:
    """A copy of checkpoint ``source`` at ``target`` with ``change(tensors)`` applied to its weights."""
    shutil.copytree(source, target)
    for weights in target.glob("*.safetensors"):
        tensors = load_file(str(weights))
        change(tensors)
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return target


def _nan_weights(tensors: dict[str, torch.Tensor]) -> None:
    name = next(n for n in sorted(tensors) if n.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = float("nan")


def _overflowing_weights(tensors: dict[str, torch.Tensor]) -> None:
    """Finite weights whose forward pass overflows float32: the final norm scales every hidden state by 3e38."""
    name = next(n for n in tensors if n.endswith("norm.weight") and "layers" not in n)
    tensors[name].fill_(3e38)


@pytest.mark.timeout(1800)  # may start the shared policy service
def test_non_finite_checkpoints_are_refused_and_the_old_version_keeps_serving(policy_service, svc_checkpoints):
    service = policy_service
    source = svc_checkpoints.a[0] if service.model_info()["checkpoint"].endswith("A/policy") else svc_checkpoints.b[0]
    nan_dir = _variant(source, svc_checkpoints.root / "faulty-nan" / "policy", _nan_weights)
    overflow_dir = _variant(source, svc_checkpoints.root / "faulty-overflow" / "policy", _overflowing_weights)
    before = service.model_info()
    greedy_before = asyncio.run(_greedy(service.url))

    nan = service.swap(str(nan_dir.relative_to(svc_checkpoints.root)))
    assert nan.status_code == 422, nan.text
    assert "NaN or inf" in nan.json()["detail"] and "down_proj" in nan.json()["detail"]

    overflow = service.swap(str(overflow_dir.relative_to(svc_checkpoints.root)))
    assert overflow.status_code == 422, overflow.text
    detail = overflow.json()["detail"]
    assert "probe" in detail and "previous checkpoint" in detail, detail

    after = service.model_info()
    assert after["version"] == before["version"] and after["checkpoint"] == before["checkpoint"]
    ready = httpx.get(f"{service.url}/ready", timeout=30)
    assert ready.status_code == 200, ready.text
    assert asyncio.run(_greedy(service.url)) == greedy_before
    completion = httpx.post(
        f"{service.url}/v1/completions",
        json={"model": "policy", "prompt": "1 + 1 =", "max_tokens": 3, "temperature": 0, "logprobs": 1},
        timeout=60,
    )
    assert completion.status_code == 200, completion.text
    assert all(isinstance(x, float) for x in completion.json()["choices"][0]["logprobs"]["token_logprobs"])
    metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert 'cpl_policy_swaps_total{outcome="refused"}' in metrics


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _vllm_group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and _running(proc.pid):
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def _value_ok(url: str) -> bool:
    response = httpx.post(f"{url}/v1/values", json={"states": [{"question": "1 + 1?"}]}, timeout=60)
    return response.status_code == 200 and -1.0 <= response.json()["values"][0]["value"] <= 1.0


@pytest.mark.timeout(2400)  # two vLLM starts of its own, several minutes each on a loaded 2-core machine
def test_a_dead_vllm_child_is_restarted_then_the_gateway_exits_with_nothing_left(svc_checkpoints, tmp_path):
    """Its own value gateway (this test kills its child): restart budget 1."""
    port = find_free_port()
    log_path = tmp_path / "value.log"
    env = {
        **os.environ,
        "CPL_VALUE_MODEL": str(svc_checkpoints.a[1]),
        "CPL_VALUE_PORT": str(port),
        "CPL_VALUE_HOST": "127.0.0.1",
        "CPL_VALUE_DTYPE": "float32",
        "CPL_VALUE_MAX_MODEL_LEN": "1024",
        "CPL_VALUE_KV_CACHE_MEMORY_BYTES": str(64 << 20),
        "CPL_VALUE_ENFORCE_EAGER": "true",
        "CPL_VALUE_VLLM_MAX_RESTARTS": "1",
        "CPL_VALUE_VLLM_RESTART_BACKOFF_S": "0.5",
        "PYTHONPATH": str(REPO),
    }
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "services.value.main"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    seen: set[int] = set()
    try:
        _wait(lambda: _ready(url) or gateway.poll() is not None, 900, "the gateway to start")
        assert gateway.poll() is None, _tail(log_path)
        assert _value_ok(url)

        # 1st death: the vLLM API server is killed; the gateway restarts it, nothing of the old one is left.
        first = [p for p in psutil.Process(gateway.pid).children() if "vllm" in " ".join(p.cmdline())]
        assert len(first) == 1, [p.cmdline() for p in first]
        old_group = os.getpgid(first[0].pid)
        assert old_group != os.getpgid(gateway.pid)  # the child leads its own process group
        old_members = _vllm_group_members(old_group)
        assert len(old_members) >= 2, "expected the API server and its engine-core process"
        seen |= set(old_members)
        os.kill(first[0].pid, signal.SIGKILL)
        _wait(lambda: not _ready(url), 30, "/ready to fail after the kill")
        _wait(lambda: _ready(url) or gateway.poll() is not None, 900, "the restarted child to be ready")
        assert gateway.poll() is None, _tail(log_path)
        assert _value_ok(url)
        assert not [pid for pid in old_members if _running(pid)], "processes of the dead child were left behind"

        # 2nd death: the budget (1 restart) is spent, so the gateway exits non-zero, leaving no vLLM process.
        second = [p for p in psutil.Process(gateway.pid).children() if "vllm" in " ".join(p.cmdline())]
        assert len(second) == 1
        new_group = os.getpgid(second[0].pid)
        seen |= set(_vllm_group_members(new_group)) | {p.pid for p in _descendants(gateway.pid)}
        os.kill(second[0].pid, signal.SIGKILL)
        code = gateway.wait(timeout=120)
        assert code == 1, _tail(log_path)
        assert "restarted 1 times" in log_path.read_text(errors="replace")

        def nothing_left() -> bool:
            return not [pid for pid in seen if _running(pid)] and not _vllm_group_members(new_group)

        _wait(nothing_left, 30, "every vLLM process to be gone")
    finally:
        _stop(gateway)
        for pid in seen:  # only if the test failed half-way: never leave an engine behind
            if psutil.pid_exists(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
