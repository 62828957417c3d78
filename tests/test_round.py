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

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "gsm8k_sample.jsonl"


def round_args(base: Path, run_dir: Path) -> list[str]:
    args = ["round", "--base", str(base), "--input", str(SAMPLE), "--run-dir", str(run_dir)]
    args += ["--simulations", "6", "--no-few-shot", "--max-step-tokens", "24", "--dtype", "float32"]
    args += ["--marker-bias", "4", "--eval-input", str(SAMPLE), "--eval-max-tokens", "16"]
    args += ["--sft-epochs", "1", "--apo-epochs", "1", "--value-epochs", "1", "--value-batch-size", "8"]
    return [*args, "--micro-batch-size", "4"]


@pytest.mark.vllm
def test_round_resumes_after_interruption(tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cpl.cli", *round_args(tiny_models[0], run_dir)]
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
    assert stages["value"]["status"] == "done" and (run_dir / "value" / "config.json").is_file()
    accuracy = stages["eval"]["outputs"]["accuracy"]
    assert set(accuracy) >= {"base"} and all(0.0 <= a <= 1.0 for a in accuracy.values())
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["base"]["total"] == 3
    trees = list((run_dir / "search" / "trees").glob("*.json"))
    assert len(trees) == 3
