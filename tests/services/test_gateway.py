"""The gateway logic against an in-memory stand-in for vLLM (fast, no engine): request mapping, the hot-swap
call sequence, requests waiting or getting 503 during a swap, recovery from a failed reload, pass-through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import pytest
import torch
from aiohttp import web
from safetensors.torch import save_file

from cpl.formats import PromptFormat, StepKind
from cpl.protocols import ExpandRequest, State
from services.gateway.app import create_gateway_app
from services.gateway.vllm_gateway import VLLMGateway
from services.policy.app import register_policy_routes
from services.policy.settings import PolicySettings
from services.value.app import register_value_routes
from services.value.settings import ValueSettings

TOKEN = "t0ken"


def _checkpoint(directory: Path, architecture: str = "LlamaForCausalLM") -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"architectures": [architecture], "hidden_size": 4}))
    save_file({"w": torch.zeros(2, 4)}, str(directory / "model.safetensors"))
    return directory


class FakeServer:
    """Stands in for :class:`services.gateway.vllm_process.VLLMServer`."""

    base_url = "http://vllm.test"

    def __init__(self) -> None:
        self.starts: list[Path] = []
        self.stops = 0

    def start(self, model: Path) -> None:
        self.starts.append(model)

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        return None

    def alive(self) -> bool:
        return True

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stops += 1

    returncode = None

    def log_tail(self, lines: int = 30) -> str:
        return ""

    def httpx_transport(self) -> None:
        return None

    def aiohttp_connector(self, limit: int) -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(limit=limit)


class FakeVLLM:
    """A stand-in vLLM server (aiohttp, on a free localhost port): answers the endpoints the gateway uses and
    records every call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.reload_delay = 0.0
        self.reload_status = 200
        self.raw_bodies: list[bytes] = []

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        self.calls.append((path, {**body, **dict(request.query)}))
        if path == "/v1/completions":
            self.raw_bodies.append(raw)
            n = body.get("n", 1)
            choices = [
                {
                    "index": i,
                    "text": f" Plan 2: idea {i}",
                    "finish_reason": "stop",
                    "stop_reason": "<endstep>",
                    "token_ids": [7, 8, 9],
                    "logprobs": {"token_logprobs": [-0.5, -0.25, -0.125], "tokens": ["a", "b", "c"]},
                }
                for i in range(n)
            ]
            return web.json_response({"choices": choices, "usage": {"completion_tokens": 3 * n}})
        if path == "/classify":
            data = [
                {"index": i, "label": "LABEL_0", "probs": [0.5 * i], "num_classes": 1}
                for i in range(len(body["input"]))
            ]
            return web.json_response({"data": data})
        if path == "/collective_rpc":
            await asyncio.sleep(self.reload_delay)
            if self.reload_status != 200:
                return web.json_response(
                    {"error": {"message": "Worker failed: bad weights"}}, status=self.reload_status
                )
            return web.json_response({"results": [None]})
        if path == "/reset_prefix_cache":
            return web.json_response({"success": True})
        if path in ("/pause", "/resume", "/update_weight_version"):
            return web.json_response({"status": "ok"})
        if path == "/health":
            return web.Response()
        return web.json_response({"error": path}, status=404)

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls]


@contextlib.asynccontextmanager
async def running(service: VLLMGateway, fake: FakeVLLM, app) -> AsyncIterator[httpx.AsyncClient]:
    """Serve ``fake`` on a free port, start ``service`` against it, yield a client of the gateway ``app``."""
    web_app = web.Application()
    web_app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    service.server.base_url = f"http://127.0.0.1:{port}"  # type: ignore[misc]
    try:
        await service.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            yield client
    finally:
        if service.upstream is not None:
            await service.upstream.close()
        if service._dev is not None:
            await service._dev.aclose()
        await runner.cleanup()


def _gateway(tmp_path: Path, *, value: bool = False, **settings_over):
    root = tmp_path / "ckpts"
    if value:
        _checkpoint(root / "v1", "LlamaForSequenceClassification")
        _checkpoint(root / "v2", "LlamaForSequenceClassification")
        settings = ValueSettings(model=root / "v1", checkpoint_root=root, admin_token=TOKEN, **settings_over)
    else:
        _checkpoint(root / "v1")
        _checkpoint(root / "v2")
        settings = PolicySettings(model=root / "v1", checkpoint_root=root, admin_token=TOKEN, **settings_over)
    fake = FakeVLLM()
    service = VLLMGateway(settings, name="value" if value else "policy", runner="pooling" if value else "generate")
    service.server = FakeServer()  # type: ignore[assignment]
    app = create_gateway_app(service, title="test", register=register_value_routes if value else register_policy_routes)
    return service, fake, app, root


def _run(coro):
    return asyncio.run(coro)


ADMIN = {"Authorization": f"Bearer {TOKEN}"}
EXPAND_BODY = {
    "requests": [
        ExpandRequest(state=State(question="q1"), n=2, temperature=0.7, max_tokens=32, seed=2**62 - 1).model_dump(
            mode="json"
        ),
        ExpandRequest(
            state=State(question="q2", steps=[(StepKind.PLAN, "Plan 1: a")], format=PromptFormat.XML),
            n=3,
            temperature=0.0,
            max_tokens=8,
        ).model_dump(mode="json"),
    ]
}


def test_expand_sends_one_vllm_request_per_state_and_maps_choices(tmp_path):
    service, fake, app, _ = _gateway(tmp_path)

    async def scenario():
        async with running(service, fake, app) as client:
            return await client.post("/v1/expand", json=EXPAND_BODY)

    response = _run(scenario())
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == "1"
    sent = [body for path, body in fake.calls if path == "/v1/completions"]
    assert len(sent) == 2
    first, second = sorted(sent, key=lambda b: b["max_tokens"], reverse=True)
    assert first["prompt"] == ExpandRequest.model_validate(EXPAND_BODY["requests"][0]).prompt()
    assert first["n"] == 2 and first["stop"] == ["<endstep>", "<endsolution>"] and first["logprobs"] == 0
    assert first["return_token_ids"] is True and first["model"] == "policy"
    assert first["seed"] == 2**62 - 1 and "seed" not in second  # a search seed reaches vLLM; unseeded: no key
    assert second["n"] == 1 and second["stop"] == ["</step>", "</solution>"]  # greedy: one sample, repeated
    data = response.json()
    assert data["model_version"] == "1"
    assert [len(r["candidates"]) for r in data["results"]] == [2, 3]
    cand = data["results"][0]["candidates"][0]
    assert cand["kind"] == "plan" and cand["text"] == "Plan 2: idea 0"
    assert cand["logprob"] == pytest.approx(-0.875) and cand["num_tokens"] == 3 and cand["token_ids"] == [7, 8, 9]
    assert cand["stop_reason"] == "<endstep>" and cand["finish_reason"] == "stop"


def test_swap_runs_the_dev_endpoint_sequence(tmp_path):
    service, fake, app, root = _gateway(tmp_path)

    async def scenario():
        async with running(service, fake, app) as client:
            fake.calls.clear()
            response = await client.post("/admin/checkpoint", json={"path": "v2"}, headers=ADMIN)
            info = await client.get("/v1/model")
            metrics = await client.get("/metrics")
            return response, info, metrics

    response, info, metrics = _run(scenario())
    assert response.status_code == 200, response.text
    assert response.json()["version"] == "2" and response.json()["previous_version"] == "1"
    assert fake.paths() == ["/pause", "/collective_rpc", "/reset_prefix_cache", "/update_weight_version", "/resume"]
    assert fake.calls[0][1] == {"mode": "wait"}
    assert fake.calls[1][1] == {"method": "reload_weights", "kwargs": {"weights_path": str((root / "v2").resolve())}}
    assert fake.calls[3][1] == {"new_version": "2"}
    assert info.json()["version"] == "2" and info.json()["checkpoint"] == str((root / "v2").resolve())
    assert 'cpl_policy_model_info{checkpoint="' in metrics.text and 'version="2"' in metrics.text
    assert 'cpl_policy_swaps_total{outcome="ok"} 1.0' in metrics.text


def test_requests_during_a_swap_wait_and_report_the_new_version(tmp_path):
    service, fake, app, _ = _gateway(tmp_path)
    fake.reload_delay = 0.3

    async def scenario():
        async with running(service, fake, app) as client:
            swap = asyncio.create_task(client.post("/admin/checkpoint", json={"path": "v2"}, headers=ADMIN))
            await asyncio.sleep(0.1)
            ready = await client.get("/ready")
            expand = await client.post("/v1/expand", json=EXPAND_BODY)
            return await swap, ready, expand

    swap, ready, expand = _run(scenario())
    assert swap.status_code == 200
    assert ready.status_code == 503 and ready.json()["status"] == "swapping"
    assert expand.status_code == 200 and expand.json()["model_version"] == "2"
    paths = fake.paths()
    # No generation reached vLLM between pause and resume.
    assert paths.index("/resume") < paths.index("/v1/completions")


def test_requests_get_503_with_retry_after_when_a_swap_takes_too_long(tmp_path):
    service, fake, app, _ = _gateway(tmp_path, swap_wait_s=0.05, retry_after_s=3)
    fake.reload_delay = 0.5

    async def scenario():
        async with running(service, fake, app) as client:
            swap = asyncio.create_task(client.post("/admin/checkpoint", json={"path": "v2"}, headers=ADMIN))
            await asyncio.sleep(0.1)
            expand = await client.post("/v1/expand", json=EXPAND_BODY)
            busy = await client.post("/admin/checkpoint", json={"path": "v2"}, headers=ADMIN)
            return await swap, expand, busy

    swap, expand, busy = _run(scenario())
    assert swap.status_code == 200
    assert expand.status_code == 503 and expand.headers["retry-after"] == "3"
    assert "policy service" in expand.json()["detail"]
    assert busy.status_code == 409


def test_prefer_wait_0_gets_the_503_at_once_during_a_swap(tmp_path):
    """A client with another replica asks not to wait (RFC 7240): the swapping gateway answers at once."""
    service, fake, app, _ = _gateway(tmp_path, swap_wait_s=30, retry_after_s=2)
    fake.reload_delay = 1.0

    async def scenario():
        async with running(service, fake, app) as client:
            swap = asyncio.create_task(client.post("/admin/checkpoint", json={"path": "v2"}, headers=ADMIN))
            await asyncio.sleep(0.1)
            start = time.monotonic()
            refused = await client.post("/v1/expand", json=EXPAND_BODY, headers={"Prefer": "wait=0"})
            refused_after = time.monotonic() - start
            waited = await client.post("/v1/expand", json=EXPAND_BODY)  # no preference: served after the swap
            return await swap, refused, refused_after, waited

    swap, refused, refused_after, waited = _run(scenario())
    assert swap.status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2" and refused_after < 0.5
    assert waited.status_code == 200 and waited.json()["model_version"] == swap.json()["version"]


def test_failed_reload_restarts_vllm_on_the_previous_checkpoint(tmp_path):
    service, fake, app, root = _gateway(tmp_path)
    fake.reload_status = 500

    async def scenario():
        async with running(service, fake, app) as client:
            response = await client.post("/admin/checkpoint", json={"path": "v2"}, headers=ADMIN)
            expand = await client.post("/v1/expand", json=EXPAND_BODY)
            return response, expand

    response, expand = _run(scenario())
    assert response.status_code == 500
    assert "bad weights" in response.json()["detail"] and "previous checkpoint" in response.json()["detail"]
    server = service.server
    assert server.stops == 1 and server.starts == [(root / "v1").resolve(), (root / "v1").resolve()]
    assert service.version == "1" and service.checkpoint == (root / "v1").resolve()
    assert expand.status_code == 200 and expand.json()["model_version"] == "1"


def test_admin_auth(tmp_path):
    service, fake, app, _ = _gateway(tmp_path)

    async def scenario():
        async with running(service, fake, app) as client:
            return [
                await client.post("/admin/checkpoint", json={"path": "v2"}),
                await client.post("/admin/checkpoint", json={"path": "v2"}, headers={"Authorization": "Bearer x"}),
                await client.post("/admin/checkpoint", json={"path": "v2"}, headers={"Authorization": "Token x"}),
            ]

    statuses = [r.status_code for r in _run(scenario())]
    assert statuses == [401, 403, 401]
    assert "/collective_rpc" not in fake.paths()


def test_admin_is_disabled_without_a_token(tmp_path):
    service, fake, app, _ = _gateway(tmp_path)
    service.settings.admin_token = None

    async def scenario():
        async with running(service, fake, app) as client:
            return await client.post("/admin/checkpoint", json={"path": "v2"}, headers={"Authorization": "Bearer x"})

    assert _run(scenario()).status_code == 403


def test_completions_pass_through_forwards_the_body_unchanged(tmp_path):
    service, fake, app, _ = _gateway(tmp_path)
    body = json.dumps({"model": "policy", "prompt": "hi", "max_tokens": 1, "echo": True, "logprobs": 0}).encode()

    async def scenario():
        async with running(service, fake, app) as client:
            return await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})

    response = _run(scenario())
    assert response.status_code == 200
    assert fake.raw_bodies == [body]
    assert response.headers["x-model-version"] == "1"
    assert service.gate.in_flight == 0


def test_values_are_tanh_of_the_raw_logit(tmp_path):
    import math

    service, fake, app, _ = _gateway(tmp_path, value=True, chunk_size=2)
    states = [State(question=f"q{i}").model_dump(mode="json") for i in range(3)]

    async def scenario():
        async with running(service, fake, app) as client:
            return await client.post("/v1/values", json={"states": states})

    response = _run(scenario())
    assert response.status_code == 200, response.text
    sent = [body for path, body in fake.calls if path == "/classify"]
    assert [len(b["input"]) for b in sent] == [2, 1] and all(b["use_activation"] is False for b in sent)
    assert sent[0]["input"][0] == State(question="q0").value_prompt()
    values = [v["value"] for v in response.json()["values"]]
    assert values == pytest.approx([0.0, math.tanh(0.5), 0.0])
