"""The deployment coordinator against real gateways: two policy replicas (each with its vLLM child) and one
value replica on tiny models, checkpoints published by real training jobs, a real Redis lock.

- a deployment under 50 concurrent /v1/expand requests: none fails, both replicas serve the new version;
- a swap that fails on the second replica: the first goes back, both serve the old version;
- a second deployment to a service while one runs: refused;
- an inference service down: the deployment fails naming it, and the other service is untouched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from cpl.protocols import ExpandRequest, State
from services.policy.client import PolicyClient
from services.trainer.deploy import Deployer, DeploymentError, DeploymentRequest, DeploymentTarget
from services.trainer.jobs import TrainingSpec, run_training
from services.trainer.probe import PROBE_QUESTION, policy_probe
from services.trainer.replicas import ReplicaClient
from services.trainer.settings import TrainerSettings
from tests.services.conftest import ADMIN_TOKEN, RunningService, _start, _stop
from tests.training.helpers import sft_rows, states, write_jsonl

# three vLLM engines start in the fixture: on a loaded 2-core machine that alone can take over 15 minutes
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(2400)]

REDIS_URL = "redis://127.0.0.1:6379/0"
SMALL = {"DTYPE": "float32", "KV_CACHE_MEMORY_BYTES": str(96 << 20), "ENFORCE_EAGER": "true"}


@dataclass
class Stack:
    root: Path
    policy: list[RunningService]
    value: RunningService
    settings: TrainerSettings


def _train(settings: TrainerSettings, tmp: Path, name: str, kind: str, seed: int) -> None:
    if kind == "sft":
        data = write_jsonl(tmp / f"{name}.jsonl", sft_rows(6, seed=seed))
    else:
        data = write_jsonl(tmp / f"{name}.jsonl", [{"text": t, "value": v} for t, v in states(8, seed=seed)])
    overrides = {"learning_rate": 5e-3, "epochs": 2, "batch_size": 2, "micro_batch_size": 2, "seed": seed}
    spec = TrainingSpec(id=f"train-{name}", kind=kind, model="base", data=[data], name=name, overrides=overrides)
    run_training(spec, settings)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Checkpoint root R (base A, sft-1, sft-2, value-1, value-2, all but A published by training jobs) and R2,
    which holds only A and sft-1: the second policy replica serves from R2, so sft-2 cannot load there."""
    from cpl.models.tiny import build_tiny_models

    tmp = tmp_path_factory.mktemp("deploy")
    root, root2 = tmp / "R", tmp / "R2"
    policy_a, value_a = build_tiny_models(root / "A", seed=0)
    prefix = f"cpl-test-trainer-{uuid.uuid4().hex[:8]}:"
    settings = TrainerSettings(
        checkpoint_root=root,
        base_policy=policy_a,
        base_value=value_a,
        redis_url=REDIS_URL,
        key_prefix=prefix,
        admin_token=ADMIN_TOKEN,
        save_every_steps=100,
    )
    jobs = [("sft-1", "sft", 1), ("sft-2", "sft", 2), ("value-1", "value", 1), ("value-2", "value", 2)]
    for name, kind, seed in jobs:
        _train(settings, tmp, name, kind, seed)
    shutil.copytree(root / "A", root2 / "A")
    shutil.copytree(root / "sft-1", root2 / "sft-1")

    logs = tmp_path_factory.mktemp("deploy_logs")
    launches = [
        ("services.policy.main", "CPL_POLICY_", r / "A" / "policy", logs / f"policy{i}.log", r)
        for i, r in enumerate([root, root2])
    ] + [("services.value.main", "CPL_VALUE_", value_a, logs / "value.log", root)]
    started: list[RunningService] = []
    try:
        # one after the other: three vLLM engines starting at once on two cores slow each other past the timeout
        for module, prefix, model, log, r in launches:
            env = {f"{prefix}{k}": v for k, v in SMALL.items()} | {f"{prefix}MODEL": str(model)}
            started.append(_start(module, prefix, env, log, r))
        settings = settings.model_copy(
            update={"policy_replicas": [s.url for s in started[:2]], "value_replicas": [started[2].url]}
        )
        yield Stack(root=root, policy=started[:2], value=started[2], settings=settings)
    finally:
        for service in started:
            _stop(service.proc)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


async def _deploy(settings: TrainerSettings, **targets: str):
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        deployer = Deployer(settings, client)
        request = DeploymentRequest(targets=[DeploymentTarget(service=s, checkpoint=c) for s, c in targets.items()])
        deployment = await deployer.deploy(request)
        stored = await deployer.store.get(deployment.id)
        assert stored == deployment
        return deployment
    finally:
        await client.aclose()


def _versions(services: list[RunningService]) -> list[str]:
    return [s.model_info()["version"] for s in services]


async def _greedy_of(url: str, probe) -> list[int]:
    async with ReplicaClient(url, "policy") as client:
        name = (await client.model_info())["served_model_name"]
        return await client.greedy_tokens(name, probe.prompt_ids, len(probe.expected))


LOAD_REQUESTS = [
    ExpandRequest(state=State(question=PROBE_QUESTION), n=2, temperature=1.0, max_tokens=48),
    ExpandRequest(state=State(question=PROBE_QUESTION), n=1, temperature=0.0, max_tokens=24, few_shot=False),
]


def _expand_503s(service: RunningService) -> float:
    """The 503s the gateway answered on /v1/expand (its Prometheus counter)."""
    text = httpx.get(f"{service.url}/metrics", timeout=30).text
    line = 'cpl_policy_requests_total{endpoint="/v1/expand",status="503"}'
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


def test_deployment_under_load_swaps_every_replica_and_no_request_fails(stack):
    """50 clients send /v1/expand to both replicas without pause while sft-1 is deployed: 40 pinned to one replica
    each (they wait at its gate during its swap), 10 holding both URLs (a swapping replica answers them 503 at
    once, ``Prefer: wait=0``, and they go to the other); none fails."""
    before = _versions(stack.policy)
    assert before == ["1", "1"]
    refused_before = sum(_expand_503s(s) for s in stack.policy)

    async def scenario():
        done = asyncio.Event()
        seen: list[tuple[int, str, float]] = []
        errors: list[BaseException] = []
        clients = [PolicyClient(s.url, retries=0, max_connections=64) for s in stack.policy]
        both = PolicyClient(",".join(s.url for s in stack.policy), retries=0, max_connections=64)

        async def worker(i: int) -> None:
            client = clients[i % 2] if i < 40 else both
            while not done.is_set():
                start = time.perf_counter()
                try:
                    (result,) = await client.expand([LOAD_REQUESTS[i % 2]])
                except Exception as exc:  # every failure is counted and reported by the assertion below
                    errors.append(exc)
                    return
                seen.append((i % 2 if i < 40 else -1, result.model_version, time.perf_counter() - start))

        workers = [asyncio.create_task(worker(i)) for i in range(50)]
        try:
            await asyncio.sleep(1.0)  # the load is running before the deployment starts
            deployment = await _deploy(stack.settings, policy="sft-1")
            await asyncio.sleep(1.0)  # and keeps running on the new version
        finally:
            done.set()
            await asyncio.gather(*workers)
            for client in [*clients, both]:
                await client.aclose()
        return deployment, seen, errors

    deployment, seen, errors = asyncio.run(scenario())
    assert errors == [], errors[:3]
    assert deployment.status == "succeeded", deployment.error
    assert [o.status for o in deployment.replicas] == ["verified", "verified"]
    assert [o.previous_version for o in deployment.replicas] == ["1", "1"]
    assert _versions(stack.policy) == ["sft-1", "sft-1"]
    for replica in (0, 1):
        versions = [v for r, v, _ in seen if r == replica]
        assert versions[0] == "1" and versions[-1] == "sft-1", replica
        # each replica switched once: old answers, then new ones, never old after new
        assert versions == sorted(versions, key=lambda v: v == "sft-1")
    # the clients holding both URLs were served throughout (a swapping replica answers them 503 at once and they
    # go to the other one: tests/services/test_gateway.py; whether one of them met a swap is up to timing)
    assert [v for r, v, _ in seen if r == -1], "the two-replica clients were served"
    refused = sum(_expand_503s(s) for s in stack.policy) - refused_before
    print(f"\n503s answered at once to two-replica clients: {refused}")
    longest = max(latency for _, _, latency in seen)
    print(f"\nrequests: {len(seen)}, longest request during the deployment: {longest:.2f}s")
    expected = policy_probe(stack.root / "sft-1", stack.settings.probe_max_tokens)
    for service in stack.policy:
        assert asyncio.run(_greedy_of(service.url, expected)) == expected.expected


def test_a_swap_failing_on_the_second_replica_rolls_the_first_back(stack):
    """sft-2 is not under the second replica's root: its swap fails (404); the first replica goes back."""
    if _versions(stack.policy) != ["sft-1", "sft-1"]:
        assert asyncio.run(_deploy(stack.settings, policy="sft-1")).status == "succeeded"
    loads = [s.model_info()["loads"] for s in stack.policy]
    deployment = asyncio.run(_deploy(stack.settings, policy="sft-2"))
    assert deployment.status == "failed"
    assert stack.policy[1].url in deployment.error and "does not exist" in deployment.error
    first, second = deployment.replicas
    assert (first.status, second.status) == ("rolled_back", "failed")
    assert _versions(stack.policy) == ["sft-1", "sft-1"]
    # the first replica really loaded sft-2 and then sft-1 again; the second never changed
    assert [s.model_info()["loads"] for s in stack.policy] == [loads[0] + 2, loads[1]]
    assert stack.policy[0].model_info()["checkpoint"] == str((stack.root / "sft-1").resolve())
    expected = policy_probe(stack.root / "sft-1", stack.settings.probe_max_tokens)
    for service in stack.policy:
        assert asyncio.run(_greedy_of(service.url, expected)) == expected.expected


def test_one_deployment_per_service_at_a_time(stack):
    lock_key = f"{stack.settings.key_prefix}deploy-lock:policy"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        lock = client.lock(lock_key, timeout=60)
        assert lock.acquire(blocking=False)
        try:
            with pytest.raises(DeploymentError) as err:
                asyncio.run(_deploy(stack.settings, policy="sft-2"))
            assert err.value.status == 409 and "already running" in err.value.message
        finally:
            lock.release()
    finally:
        client.close()


def test_refused_before_anything_runs(stack):
    for targets, status, words in [
        ({"policy": "no-such"}, 404, "no published checkpoint"),
        ({"policy": "value-1"}, 422, "value model"),
        ({"value": "sft-1"}, 422, "policy model"),
    ]:
        with pytest.raises(DeploymentError) as err:
            asyncio.run(_deploy(stack.settings, **targets))
        assert err.value.status == status and words in err.value.message, err.value.message
    with pytest.raises(ValueError, match="checkpoint"):
        DeploymentRequest(targets=[{"service": "policy", "checkpoint": "../A/policy"}])


def test_value_deployment_is_verified_against_transformers(stack):
    deployment = asyncio.run(_deploy(stack.settings, value="value-1"))
    assert deployment.status == "succeeded", deployment.error
    assert stack.value.model_info()["version"] == "value-1"


def test_deployment_over_the_api(stack):
    """POST /v1/deployments answers 202 at once; the deployment runs in the API process; GET follows it."""
    import threading

    import httpx
    import uvicorn
    from fastapi import FastAPI

    from services.common.ports import find_free_port
    from services.trainer.api import create_trainer_router

    settings = stack.settings.model_copy(update={"operator_keys": [SecretStr("op")]})
    app = FastAPI()
    app.include_router(create_trainer_router(settings, enqueue=lambda training_id: None))
    port = find_free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        url, headers = f"http://127.0.0.1:{port}/v1/deployments", {"Authorization": "Bearer op"}
        body = {"targets": [{"service": "value", "checkpoint": "value-2"}]}
        created = httpx.post(url, json=body, headers=headers, timeout=30)
        assert created.status_code == 202, created.text
        assert created.json()["status"] == "running"
        deadline = time.monotonic() + 300
        while (found := httpx.get(f"{url}/{created.json()['id']}", headers=headers, timeout=30).json())[
            "status"
        ] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert found["status"] == "succeeded", found["error"]
        assert stack.value.model_info()["version"] == "value-2"
        missing = httpx.post(url, json={"targets": [{"service": "value", "checkpoint": "nope"}]}, headers=headers)
        assert missing.status_code == 404
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_service_down_fails_the_deployment_and_leaves_the_other_untouched(stack):
    """Policy replica 2 is killed; deploying policy + value fails at once, naming it; nothing was swapped."""
    if stack.value.model_info()["version"] != "value-1":
        assert asyncio.run(_deploy(stack.settings, value="value-1")).status == "succeeded"
    value_before = stack.value.model_info()
    policy_before = stack.policy[0].model_info()
    os.killpg(stack.policy[1].proc.pid, signal.SIGKILL)
    stack.policy[1].proc.wait(timeout=30)
    deployment = asyncio.run(_deploy(stack.settings, policy="sft-2", value="value-2"))
    assert deployment.status == "failed"
    assert stack.policy[1].url in deployment.error and "connection failed" in deployment.error
    assert "nothing was changed" in deployment.error
    assert stack.value.model_info() == value_before
    assert stack.policy[0].model_info() == policy_before
    assert all(o.status in ("pending", "failed") for o in deployment.replicas)
