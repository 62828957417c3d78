"""The value gateway on vLLM's pooling runner (tiny model): values, hot-swap, auth, health, metrics."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from cpl.formats import PromptFormat, StepKind
from cpl.models.value_head import transformers_values
from cpl.protocols import State, ValueModel
from services.stack.up import VALUE_BUSY_LOOP_S
from services.value.client import ValueClient

pytestmark = pytest.mark.vllm

STATES = [
    State(question="Ann has 3 apples and buys 4 more. How many apples does Ann have now?"),
    State(
        question="Ann has 3 apples and buys 4 more. How many apples does Ann have now?",
        steps=[(StepKind.PLAN, "Plan 1: Take the starting number of apples.")],
    ),
    State(question="Ben has 12 coins and gives away 5. How many coins are left?", format=PromptFormat.XML),
    State(
        question="Carla has 6 boxes with 4 pencils in each box. How many pencils are there?",
        steps=[
            (StepKind.PLAN, "Plan 1: Find the number of boxes and the number per box."),
            (StepKind.PLAN, "Plan 2: Multiply the two numbers."),
        ],
        format=PromptFormat.XML,
    ),
]


def _evaluate(url: str, states: list[State]):
    async def run():
        async with ValueClient(url) as client:
            assert isinstance(client, ValueModel)
            return await client.evaluate(states)

    return asyncio.run(run())


def _assert_values_of(service, checkpoint: Path, version: str) -> None:
    results = _evaluate(service.url, STATES)
    reference = transformers_values(checkpoint, [s.value_prompt() for s in STATES])
    assert [r.model_version for r in results] == [version] * len(STATES)
    for result, expected in zip(results, reference, strict=True):
        assert -1.0 <= result.value <= 1.0
        assert result.value == pytest.approx(expected, abs=1e-3)


def test_values_equal_the_transformers_forward_pass(value_service):
    info = value_service.model_info()
    _assert_values_of(value_service, Path(info["checkpoint"]), info["version"])


def test_the_busy_loop_setting_reaches_the_engine_core_and_the_worker(value_service):
    """VLLM_BUSY_LOOP_S (the fixture's, as under cpl up) is applied by the plugin in the vLLM processes that wait
    for each other; the values above were computed with it."""
    log = value_service.log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if "spin for at most" in line]
    assert any("EngineCore" in line for line in lines), lines
    assert any("Worker" in line for line in lines), lines
    assert all(f"at most {float(VALUE_BUSY_LOOP_S)} s" in line for line in lines), lines


def test_requests_one_at_a_time_do_not_wait_for_a_lost_wake_up(value_service):
    """With no spinning at all (a window of 0) vLLM's reader sleeps on a ZeroMQ notification, some of which are
    lost: such a request waited for vLLM's 5 s re-check (services/gateway/vllm_plugin.py). Answered in 30 ms when
    nothing stalls; the bound leaves room for a loaded machine and still catches the stall."""
    latencies = []
    for i in range(8):
        start = time.perf_counter()
        body = {"states": [{"question": f"{i} + 3?"}]}
        response = httpx.post(f"{value_service.url}/v1/values", json=body, timeout=30)
        latencies.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text
        time.sleep(0.2 * (i % 3))  # gaps below, within and above the spin window
    assert max(latencies) < 2.5, [round(x, 3) for x in latencies]


def test_value_health_ready_metrics(value_service):
    url = value_service.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/ready").json()["ready"] is True
    _evaluate(url, STATES[:2])
    metrics = httpx.get(f"{url}/metrics").text
    assert 'cpl_value_requests_total{endpoint="/v1/values",status="200"}' in metrics
    assert 'cpl_value_states_total{endpoint="/v1/values"}' in metrics
    assert "cpl_value_model_info{" in metrics


def test_value_admin_auth_and_refused_paths(value_service, svc_checkpoints):
    url = f"{value_service.url}/admin/checkpoint"
    before = value_service.model_info()
    assert httpx.post(url, json={"path": "B/value"}).status_code == 401
    assert httpx.post(url, json={"path": "B/value"}, headers={"Authorization": "Bearer wrong"}).status_code == 403
    for path, status in {"../../etc": 400, "nope": 404, "B/policy": 422}.items():
        response = value_service.swap(path)
        assert response.status_code == status, (path, response.text)
    assert value_service.model_info()["version"] == before["version"]
    _assert_values_of(value_service, Path(before["checkpoint"]), before["version"])


def test_value_hot_swap(value_service, svc_checkpoints):
    target = "B/value" if not value_service.model_info()["checkpoint"].endswith("/B/value") else "A/value"
    response = value_service.swap(target)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] != body["previous_version"]
    _assert_values_of(value_service, svc_checkpoints.root / target, body["version"])
