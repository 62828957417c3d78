"""`cpl round` end to end on a tiny model: every stage runs, and an interrupted round resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpl.cli import PLANNER_DIR
from cpl.toy import world

REPO = Path(__file__).resolve().parents[1]


def round_args(base: Path, train: Path, test: Path, run_dir: Path) -> list[str]:
    args = ["round", "--base", str(base), "--input", str(train), "--run-dir", str(run_dir)]
    args += ["--search-value", str(PLANNER_DIR / "value")]
    args += ["--simulations", "10", "--no-few-shot", "--max-step-tokens", "96", "--dtype", "float32"]
    args += ["--eval-input", str(test), "--eval-max-tokens", "128"]
    args += ["--sft-epochs", "1", "--sft-lr", "1e-4", "--apo-epochs", "1", "--apo-lr", "1e-5"]
    return [*args, "--value-epochs", "1", "--value-batch-size", "8", "--micro-batch-size", "4"]


@pytest.mark.vllm
def test_round_resumes_after_interruption(tmp_path):
    """The embedded planner solves some toy problems, so every stage has data: nothing is skipped."""
    run_dir = tmp_path / "run"
    train = world.write_gsm8k_jsonl(world.generate("arith", 6, seed=5, split="train"), tmp_path / "train.jsonl")
    test = world.write_gsm8k_jsonl(world.generate("arith", 4, seed=5, split="test"), tmp_path / "test.jsonl")
    cmd = [sys.executable, "-m", "cpl.cli", *round_args(PLANNER_DIR / "policy", train, test, run_dir)]
    first = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    search_record = run_dir / "stages" / "search.json"
    deadline = time.monotonic() + 600
    while not search_record.is_file():
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "search stage did not finish"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # interrupt the round right after its search stage
    first.wait()
    searched = search_record.read_text()

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "search: already finished, skipped" in second.stderr
    assert search_record.read_text() == searched  # not searched again
    stages = {p.stem: json.loads(p.read_text()) for p in (run_dir / "stages").iterdir()}
    assert set(stages) == {"search", "sft", "step_apo", "step_dpo", "value", "eval"}
    assert {s: r["status"] for s, r in stages.items()} == dict.fromkeys(stages, "done")
    for model in ("policy_sft", "policy_step_apo", "policy_step_dpo", "value"):
        manifest = json.loads((run_dir / model / "manifest.json").read_text())
        assert manifest["data"], model
    accuracy = stages["eval"]["outputs"]["accuracy"]
    assert set(accuracy) == {"base", "sft", "step_apo", "step_dpo"}
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["base"]["total"] == 4
    assert len(list((run_dir / "search" / "trees").glob("*.json"))) == 6
