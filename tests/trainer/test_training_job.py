"""A training job as the stack runs it (``python -m services.trainer.run``): SIGKILLed mid-job it leaves no
checkpoint a server could load; restarted, it resumes from its last saved step and publishes atomically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpl.training.data import file_sha256
from cpl.training.manifest import Manifest
from services.gateway.checkpoints import CheckpointError, resolve_checkpoint_path
from services.trainer.checkpoints import CheckpointStore
from tests.training.helpers import pair_rows, sft_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _env(root: Path, base: Path, every: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CPL_TRAINER_CHECKPOINT_ROOT": str(root),
        "CPL_TRAINER_BASE_POLICY": str(base),
        "CPL_TRAINER_SAVE_EVERY_STEPS": str(every),
        "CPL_TRAINER_TORCH_THREADS": "1",
    }


def _spec(tmp_path: Path, **fields) -> Path:
    path = tmp_path / f"spec-{fields['id']}.json"
    path.write_text(json.dumps(fields, default=str))
    return path


def _run(spec: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.trainer.run", str(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_killed_job_publishes_nothing_and_resumes_from_its_saved_step(tiny_models, tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8, seed=7))
    overrides = {"learning_rate": 1e-3, "epochs": 30, "batch_size": 1, "micro_batch_size": 1, "seed": 3}
    spec = _spec(tmp_path, id="t1", kind="sft", model="base", data=[data], name="sft-r1", overrides=overrides)
    env = _env(root, tiny_models[0], every=10)
    store = CheckpointStore(root)
    state_dir = store.resume_dir("t1")

    proc = subprocess.Popen(
        [sys.executable, "-m", "services.trainer.run", str(spec)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            progress = state_dir / "progress.json"
            if progress.is_file() and json.loads(progress.read_text())["step"] >= 20:
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job never saved step 20"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    saved = json.loads((state_dir / "progress.json").read_text())["step"]
    assert 20 <= saved < 240 and saved % 10 == 0

    # nothing published; the work areas are hidden and a server refuses them
    assert _visible(root) == []
    assert store.names() == []
    for hidden in (".resume/t1", ".staging/t1", ".staging"):
        with pytest.raises(CheckpointError) as err:
            resolve_checkpoint_path(root, hidden)
        assert err.value.status == 400 and "hidden" in err.value.message

    done = _run(spec, env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == saved
    assert summary["steps"] == 240
    assert _visible(root) == ["sft-r1"] == store.names()
    assert not state_dir.exists() and not store.staging("t1").exists()

    manifest = Manifest.read(root / "sft-r1")
    assert manifest.model_extra["training_id"] == "t1"
    assert manifest.kind == "sft" and manifest.model_type == "policy"
    assert manifest.parent_checkpoint.path == str(tiny_models[0].resolve())
    assert [d.sha256 for d in manifest.data] == [file_sha256(data)]
    assert manifest.hyperparameters["learning_rate"] == 1e-3 and manifest.hyperparameters["epochs"] == 30
    assert manifest.metrics["resumed_from_step"] == saved and manifest.metrics["steps"] == 240
    log = (root / "sft-r1" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 241))
    # the published directory is one a server accepts
    assert resolve_checkpoint_path(root, "sft-r1") == (root / "sft-r1").resolve()

    # run again with the same id: already published, nothing retrained; another job may not take the name
    again = _run(spec, env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["checkpoint_id"] == manifest.checkpoint_id
    other = _spec(tmp_path, id="t2", kind="sft", model="base", data=[data], name="sft-r1", overrides=overrides)
    taken = _run(other, env)
    assert taken.returncode == 2 and "exists already" in taken.stderr


def test_bad_specs_exit_2_with_a_message(tiny_models, tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    env = _env(root, tiny_models[0], every=10)
    sft = write_jsonl(tmp_path / "sft.jsonl", sft_rows(2, seed=1))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(2, seed=1, chosen_value=0.5, rejected_value=-0.5))
    cases = {
        "..": dict(id="b1", kind="sft", data=[sft], name="../escape"),
        "no published checkpoint": dict(id="b2", kind="sft", data=[sft], name="x", model="no-such-checkpoint"),
        "response": dict(id="b3", kind="sft", data=[pairs], name="y"),
        "learning_rate": dict(id="b4", kind="sft", data=[sft], name="z", overrides={"learning_rate": -1}),
    }
    for expected, fields in cases.items():
        result = _run(_spec(tmp_path, **fields), env)
        assert result.returncode == 2, (expected, result.stderr)
        assert expected in result.stderr, (expected, result.stderr)
    assert os.listdir(root) == [] or _visible(root) == []
