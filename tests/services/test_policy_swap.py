"""Hot-swap of the policy service on a real vLLM server: authentication, refused checkpoints, and a swap A -> B
under 50 concurrent requests."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest

from cpl.protocols import ExpandRequest, State
from services.policy.client import PolicyClient

from .conftest import GREEDY_REQUESTS, QUESTION, greedy_signature

pytestmark = pytest.mark.vllm

LONG_REQUEST = ExpandRequest(state=State(question=QUESTION), n=4, temperature=1.0, max_tokens=256)


def _assert_serving(service, version: str, label: str) -> None:
    """The service still reports ``version`` and its greedy expansions are those of checkpoint ``label``."""
    assert service.model_info()["version"] == version

    async def run():
        async with PolicyClient(service.url) as client:
            return await client.expand(GREEDY_REQUESTS)

    results = asyncio.run(run())
    assert all(r.model_version == version for r in results)
    assert [greedy_signature(r) for r in results] == service.greedy[label]


def _label_of(service) -> str:
    return "A" if service.model_info()["checkpoint"].endswith("/A/policy") else "B"


def test_admin_requires_the_bearer_token(policy_service):
    url = f"{policy_service.url}/admin/checkpoint"
    before = policy_service.model_info()["version"]
    missing = httpx.post(url, json={"path": "B/policy"})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(url, json={"path": "B/policy"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    basic = httpx.post(url, json={"path": "B/policy"}, headers={"Authorization": "Basic abc"})
    assert basic.status_code == 401
    assert policy_service.model_info()["version"] == before


@pytest.fixture(scope="module")
def bad_checkpoints(svc_checkpoints, tmp_path_factory) -> dict[str, str]:
    """Paths (relative to the checkpoint root) that a swap must refuse, with the status expected."""
    from cpl.models.tiny import build_tiny_models

    root = svc_checkpoints.root
    policy_b = svc_checkpoints.b[0]
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(policy_b, outside / "policy")
    (root / "escape").symlink_to(outside / "policy", target_is_directory=True)

    wide, _ = build_tiny_models(root / "wide", hidden_size=256, num_heads=4)
    other_tok, _ = build_tiny_models(root / "other_tokenizer", seed=1)

    truncated = root / "truncated"
    shutil.copytree(policy_b, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])

    garbage = root / "garbage"
    shutil.copytree(policy_b, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)

    missing_key = root / "missing_key"
    shutil.copytree(policy_b, missing_key)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(policy_b / "model.safetensors"))
    tensors.pop("lm_head.weight")
    save_file(tensors, str(missing_key / "model.safetensors"), metadata={"format": "pt"})

    return {
        "../outside": 400,
        str(outside / "policy"): 400,
        "escape": 400,
        "does/not/exist": 404,
        str(Path(wide).relative_to(root)): 422,
        str(Path(other_tok).relative_to(root)): 422,
        "truncated": 422,
        "garbage": 422,
        "missing_key": 422,
        "A/value": 422,
    }


def test_bad_checkpoints_are_refused_and_the_old_weights_keep_serving(policy_service, bad_checkpoints):
    before = policy_service.model_info()
    label = _label_of(policy_service)
    for path, status in bad_checkpoints.items():
        response = policy_service.swap(path)
        assert response.status_code == status, (path, response.text)
        assert response.json()["detail"], path
    _assert_serving(policy_service, before["version"], label)
    assert policy_service.model_info()["checkpoint"] == before["checkpoint"]


async def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.005)
    return False


def test_hot_swap_under_concurrent_load_equals_a_fresh_server(policy_service, svc_checkpoints):
    """Swap A -> B while 25 requests are in flight and 25 more arrive during the swap: all succeed, each reports
    the version that served it (its greedy text is that version's), and B's expansions equal the fresh B server's."""
    if _label_of(policy_service) != "A":
        assert policy_service.swap("A/policy").status_code == 200
    version_a = policy_service.model_info()["version"]
    url = policy_service.url

    async def scenario():
        async with PolicyClient(url, max_connections=64) as client, httpx.AsyncClient(timeout=300) as probe:

            async def one(i: int):
                index = i % len(GREEDY_REQUESTS)
                (result,) = await client.expand([GREEDY_REQUESTS[index]])
                return index, result

            async def in_flight() -> bool:
                text = (await probe.get(f"{url}/metrics")).text
                line = next(x for x in text.splitlines() if x.startswith("cpl_policy_requests_in_flight "))
                return float(line.split()[1]) >= 1

            async def swapping() -> bool:
                return (await probe.get(f"{url}/ready")).json()["status"] == "swapping"

            async def long_one():
                (result,) = await client.expand([LONG_REQUEST])
                return -1, result

            # 20 greedy requests and 5 long ones in flight when the swap starts: the swap drains them (the long
            # ones keep it draining for a while), and the second wave arrives while it does.
            first = [asyncio.create_task(one(i)) for i in range(20)] + [
                asyncio.create_task(long_one()) for _ in range(5)
            ]
            assert await _wait_for(in_flight)
            swap = asyncio.create_task(
                probe.post(f"{url}/admin/checkpoint", json={"path": "B/policy"}, headers=policy_service.admin_headers())
            )
            during = await _wait_for(swapping, timeout_s=5.0)
            second = [asyncio.create_task(one(i)) for i in range(25, 50)]
            return await swap, during, await asyncio.gather(*first), await asyncio.gather(*second)

    swap_response, during, first, second = asyncio.run(scenario())
    assert swap_response.status_code == 200, swap_response.text
    version_b = swap_response.json()["version"]
    assert version_b != version_a and swap_response.json()["previous_version"] == version_a
    assert len(first) + len(second) == 50
    for index, result in first + second:
        assert result.model_version in (version_a, version_b)
        if index < 0:
            assert len(result.candidates) == LONG_REQUEST.n
            continue
        label = "A" if result.model_version == version_a else "B"
        assert greedy_signature(result) == policy_service.greedy[label][index]
    # Requests in flight when the swap began finished on A; those that arrived during the swap waited for B.
    assert any(result.model_version == version_a for _, result in first)
    assert during, "the swap was never observed in progress"
    assert all(result.model_version == version_b for _, result in second)
    assert policy_service.greedy["A"] != policy_service.greedy["B"]
    _assert_serving(policy_service, version_b, "B")
    info = policy_service.model_info()
    assert Path(info["checkpoint"]) == svc_checkpoints.b[0].resolve()
