"""docker-compose.yml against the compose specification's schema, and the properties the stack needs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.deployfiles import COMPOSE_FILE, load_compose, tool

GATEWAYS = ("policy", "value", "policy-cpu", "value-cpu")
GPU_SERVICES = ("policy", "value", "train-worker")


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    # check-jsonschema ships a vendored copy of the compose-spec schema (no download at test time).
    return subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compose_file_matches_the_compose_specification() -> None:
    done = validate(COMPOSE_FILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_rejects_a_misspelt_key(tmp_path: Path) -> None:
    compose = load_compose()
    compose["services"]["policy"]["shm_sise"] = compose["services"]["policy"].pop("shm_size")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(compose))
    done = validate(bad)
    assert done.returncode != 0 and "shm_sise" in done.stdout


def test_redis_keeps_every_key() -> None:
    redis = load_compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]


def test_gpu_services_reserve_a_gpu_each() -> None:
    services = load_compose()["services"]
    ids = []
    for name in GPU_SERVICES:
        service = services[name]
        assert service["profiles"] == ["gpu"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        # Named devices: `count: 1` gives every service the host's first GPU.
        assert "count" not in device and len(device["device_ids"]) == 1
        ids.append(device["device_ids"][0])
    assert len(set(ids)) == len(GPU_SERVICES), ids


def test_cpu_profile_runs_the_same_stack_without_gpus() -> None:
    services = load_compose()["services"]
    cpu = {name: s for name, s in services.items() if "cpu" in s.get("profiles", [])}
    gpu = {name: s for name, s in services.items() if "gpu" in s.get("profiles", [])}
    assert not any("deploy" in s for s in cpu.values()), "a cpu-profile service reserves a device"

    # The same roles under the same network names: the search service cannot tell the profiles apart.
    def role(name: str, service: dict) -> str:
        aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
        return aliases[0] if aliases else name.removesuffix("-cpu")

    assert {role(n, s) for n, s in cpu.items()} == {role(n, s) for n, s in gpu.items()}
    assert {" ".join(s["command"]) for s in cpu.values() if "command" in s} >= {
        " ".join(s["command"]) for s in gpu.values() if s.get("image", "").startswith("cpl-serving")
    }
    # The embedded default model, shipped in the cpu-serving image.
    assert services["policy-cpu"]["environment"]["CPL_POLICY_MODEL"] == "/opt/cpl/planner/policy"
    assert services["value-cpu"]["environment"]["CPL_VALUE_MODEL"] == "/opt/cpl/planner/value"
    assert services["policy-cpu"]["build"]["target"] == "cpu-serving"
    for name, service in services.items():
        if service.get("image", "").startswith("cpl-"):
            assert "build" in service, f"{name} would pull an image that another service builds"


@pytest.mark.parametrize("name", GATEWAYS)
def test_gateways_are_healthy_only_when_ready_and_have_shared_memory(name: str) -> None:
    service = load_compose()["services"][name]
    port = service["environment"][f"CPL_{name.removesuffix('-cpu').upper()}_PORT"]
    assert service["healthcheck"]["test"][-1] == f"http://127.0.0.1:{port}/ready"
    assert int(service["healthcheck"]["start_period"].removesuffix("s")) >= 600, "model loading takes minutes"
    assert service["shm_size"].endswith("gb")
    assert "/checkpoints:ro" in " ".join(service["volumes"])


def test_search_starts_after_redis_and_ready_inference_services() -> None:
    services = load_compose()["services"]
    for name in ("search-api", "search-worker", "train-worker", "train-worker-cpu"):
        depends = services[name]["depends_on"]
        for dep in ("redis", "policy", "value", "policy-cpu", "value-cpu"):
            assert depends[dep]["condition"] == "service_healthy", (name, dep)
    assert services["search-worker"]["depends_on"]["search-api"]["condition"] == "service_healthy"
    assert services["search-api"]["healthcheck"]["test"][-1].endswith("/ready")


def test_search_workers_outlive_a_task_slice_on_shutdown() -> None:
    worker = load_compose()["services"]["search-worker"]
    slice_s = float(worker["environment"]["CPL_SEARCH_SLICE_SECONDS"])
    assert int(worker["stop_grace_period"].removesuffix("s")) > slice_s + 60


def test_checkpoints_are_shared_by_trainer_and_servers() -> None:
    services = load_compose()["services"]
    assert "checkpoints:/checkpoints" in services["train-worker"]["volumes"]
    assert "checkpoints:/checkpoints:ro" in services["policy"]["volumes"]
    assert "models:/models:ro" in services["policy"]["volumes"]


def test_secrets_come_from_files_never_from_the_compose_file() -> None:
    compose = load_compose()
    assert all(set(s) == {"file"} for s in compose["secrets"].values())
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("TOKEN", "KEY", "PASSWORD", "SECRET")):
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), (name, key)
    # Only the trainer side holds the gateways' admin token besides the gateways themselves.
    holders = {n for n, s in compose["services"].items() if "admin_token" in s.get("secrets", [])}
    assert holders == {"policy", "value", "policy-cpu", "value-cpu", "train-worker", "train-worker-cpu"}
    # The API keys only where requests are checked.
    assert {n for n, s in compose["services"].items() if "search_api_key" in s.get("secrets", [])} == {"search-api"}
    gitignore = (COMPOSE_FILE.parent / ".gitignore").read_text().split()
    assert "secrets/" in gitignore


def test_references_resolve() -> None:
    """What the schema cannot see: depends_on, secrets and named volumes point at things that exist."""
    compose = load_compose()
    services = compose["services"]
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], f"{name}: unknown secret {secret}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
