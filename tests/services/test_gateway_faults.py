"""Fast checks (no engine) of the fault handling: the streamed finite-weight check, the probe after a reload with
its roll-back, /ready failing on non-finite answers, the watchdog restarting a dead child, the Unix-socket
command line. The real-engine versions are in test_faults.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from aiohttp import web
from safetensors.torch import save_file

from services.gateway.app import NON_FINITE_MARK, create_gateway_app
from services.gateway.checkpoints import CheckpointError, check_finite_weights, read_manifest
from services.gateway.vllm_gateway import VLLMGateway
from services.gateway.vllm_process import VLLMServer, vllm_command
from services.policy.app import probe_policy, register_policy_routes
from services.policy.settings import PolicySettings
from tests.services.test_gateway import ADMIN, FakeServer, FakeVLLM, _checkpoint, _run, running


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_finite_weight_check_finds_one_bad_value(tmp_path, dtype, bad):
    tensors = {"a": torch.randn(300, 7).to(dtype), "b": torch.arange(10), "c": torch.randn(5000).to(dtype)}
    good = tmp_path / "good.safetensors"
    save_file(tensors, str(good))
    check_finite_weights(good)
    tensors["c"][4321] = bad
    broken = tmp_path / "bad.safetensors"
    save_file(tensors, str(broken))
    with pytest.raises(CheckpointError, match="'c' has NaN or inf") as info:
        check_finite_weights(broken)
    assert info.value.status == 422


def test_read_manifest_checks_finiteness_only_when_asked(tmp_path):
    directory = _checkpoint(tmp_path / "ck")
    save_file({"w": torch.full((2, 4), float("nan"))}, str(directory / "model.safetensors"))
    assert read_manifest(directory).tensors["w"].shape == (2, 4)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        read_manifest(directory, check_finite=True)


def test_the_default_swap_refuses_nan_weights_before_touching_the_engine(tmp_path):
    service, fake, app, root = _probed_gateway(tmp_path)
    save_file({"w": torch.full((2, 4), float("nan"))}, str(root / "v2" / "model.safetensors"))

    async def scenario():
        async with running(service, fake, app) as client:
            fake.calls.clear()
            return await client.post("/admin/checkpoint", json={"path": "v2"}, headers=ADMIN)

    response = _run(scenario())
    assert response.status_code == 422 and "NaN or inf" in response.json()["detail"]
    assert fake.paths() == []


class NaNAfterReload(FakeVLLM):
    """Answers completions with vLLM's non-finite error while the weights of ``bad_path`` are loaded."""

    def __init__(self, bad_path: str) -> None:
        super().__init__()
        self.bad_path = bad_path
        self.loaded = ""

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/collective_rpc":
            self.loaded = json.loads(await request.read())["kwargs"]["weights_path"]
        if request.path == "/v1/completions" and self.loaded == self.bad_path:
            self.calls.append((request.path, {}))
            return web.json_response({"error": {"message": NON_FINITE_MARK, "code": 400}}, status=400)
        return await super().handle(request)


def _probed_gateway(tmp_path: Path, fake: FakeVLLM | None = None, **settings_over):
    root = tmp_path / "ckpts"
    _checkpoint(root / "v1")
    _checkpoint(root / "v2")
    settings = PolicySettings(
        model=root / "v1", checkpoint_root=root, admin_token="t0ken", ready_probe_interval_s=0, **settings_over
    )
    service = VLLMGateway(settings, name="policy", runner="generate", probe=probe_policy)
    service.server = FakeServer()  # type: ignore[assignment]
    app = create_gateway_app(service, title="test", register=register_policy_routes)
    return service, fake or FakeVLLM(), app, root


def test_a_swap_whose_probe_fails_goes_back_and_answers_422(tmp_path):
    root = tmp_path / "ckpts"
    fake = NaNAfterReload(str((root / "v2").resolve()))
    service, fake, app, root = _probed_gateway(tmp_path, fake)

    async def scenario():
        async with running(service, fake, app) as client:
            fake.calls.clear()
            swap = await client.post("/admin/checkpoint", json={"path": "v2"}, headers=ADMIN)
            ready = await client.get("/ready")
            metrics = await client.get("/metrics")
            return swap, ready, metrics

    swap, ready, metrics = _run(scenario())
    assert swap.status_code == 422, swap.text
    assert "probe" in swap.json()["detail"] and "non-finite" in swap.json()["detail"]
    assert fake.paths() == [
        "/pause",
        "/collective_rpc",
        "/reset_prefix_cache",
        "/update_weight_version",
        "/resume",
        "/v1/completions",  # the probe through v2: non-finite
        "/pause",
        "/collective_rpc",  # v1 again
        "/reset_prefix_cache",
        "/update_weight_version",
        "/resume",
        "/v1/completions",  # the probe through v1: sound
        "/health",  # /ready: vLLM's health, then the probe
        "/v1/completions",
    ]
    assert fake.calls[7][1]["kwargs"]["weights_path"] == str((root / "v1").resolve())
    assert fake.calls[9][1] == {"new_version": "1"}
    assert service.version == "1" and service.checkpoint == (root / "v1").resolve()
    assert ready.status_code == 200, ready.text
    assert 'cpl_policy_swaps_total{outcome="refused"} 1.0' in metrics.text


def test_ready_fails_while_the_model_answers_non_finite_numbers(tmp_path):
    fake = NaNAfterReload("no weights are bad yet")
    service, fake, app, _ = _probed_gateway(tmp_path, fake)

    async def scenario():
        async with running(service, fake, app) as client:
            healthy = await client.get("/ready")
            fake.bad_path = fake.loaded  # the served weights now answer the non-finite error
            broken = await client.get("/ready")
            expand = await client.post("/v1/expand", json={"requests": [{"state": {"question": "q"}, "n": 1}]})
            return healthy, broken, expand

    healthy, broken, expand = _run(scenario())
    assert healthy.status_code == 200
    assert broken.status_code == 503 and "non-finite" in broken.json()["status"], broken.text
    assert expand.status_code == 502 and "non-finite" in expand.json()["detail"]  # the server's fault, retryable


class DyingServer(FakeServer):
    def __init__(self) -> None:
        super().__init__()
        self.dead = False

    def alive(self) -> bool:
        return not self.dead

    def start(self, model: Path) -> None:
        super().start(model)
        self.dead = False


def test_the_watchdog_restarts_a_dead_child_on_the_served_checkpoint(tmp_path):
    service, fake, app, root = _probed_gateway(tmp_path, vllm_restart_backoff_s=0.2, vllm_max_restarts=2)
    server = DyingServer()
    service.server = server  # type: ignore[assignment]

    async def scenario():
        async with running(service, fake, app) as client:
            server.dead = True
            await asyncio.sleep(0.6)
            during = await client.get("/ready")
            for _ in range(50):
                if service.gate.is_open:
                    break
                await asyncio.sleep(0.1)
            after = await client.get("/ready")
            expand = await client.post("/v1/expand", json={"requests": [{"state": {"question": "q"}, "n": 1}]})
            return during, after, expand

    during, after, expand = _run(scenario())
    assert during.status_code == 503 and during.json()["status"] == "restarting"
    assert after.status_code == 200 and expand.status_code == 200
    assert server.stops == 1 and server.starts == [(root / "v1").resolve()] * 2  # group killed, then started again
    assert service.fatal is None and len(service._restarts) == 1


def test_the_child_listens_on_a_private_unix_socket_by_default(tmp_path):
    settings = PolicySettings(model=tmp_path)
    server = VLLMServer(settings, runner="generate", name="t")
    socket = server.uds
    try:
        assert socket is not None and (socket.parent.stat().st_mode & 0o777) == 0o700
        cmd = server.command(tmp_path)
        assert cmd[cmd.index("--uds") + 1] == str(socket)
        assert "--port" not in cmd and "--host" not in cmd
    finally:
        server.close()
    assert not socket.parent.exists()
    tcp = vllm_command(PolicySettings(model=tmp_path, vllm_uds=False), runner="generate", model=tmp_path, port=1234)
    assert "--uds" not in tcp and tcp[tcp.index("--port") + 1] == "1234"
