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

from cpl.cli import PLANNER_DIR, demo_problems
from cpl.grading import extract_answer, is_equivalent
from cpl.toy import world

REPO = Path(__file__).resolve().parents[1]


def round_args(base: Path, train: Path, test: Path, run_dir: Path) -> list[str]:
    args = ["round", "--base", str(base), "--input", str(train), "--run-dir", str(run_dir)]
    args += ["--search-value", str(PLANNER_DIR / "value")]
    args += ["--simulations", "24", "--no-few-shot", "--max-step-tokens", "96", "--dtype", "float32"]
    args += ["--eval-input", str(test), "--eval-max-tokens", "128"]
    args += ["--sft-epochs", "1", "--sft-lr", "1e-4", "--apo-epochs", "1", "--apo-lr", "1e-5"]
    return [*args, "--value-epochs", "1", "--value-batch-size", "8", "--micro-batch-size", "4"]


def cpl(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpl.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_round_2_refuses_without_the_previous_round(tmp_path):
    train = world.write_gsm8k_jsonl(world.generate("arith", 2, seed=5, split="train"), tmp_path / "train.jsonl")
    base = ["round", "--round", "2", "--base", str(PLANNER_DIR / "policy"), "--input", str(train)]
    result = cpl(*base, "--run-dir", str(tmp_path / "r2"))
    assert result.returncode == 2 and "--previous RUN_DIR" in result.stderr
    result = cpl(*base, "--run-dir", str(tmp_path / "r2"), "--search-policy", str(PLANNER_DIR / "policy"))
    assert result.returncode == 2 and "--search-value" in result.stderr  # one explicit model is not enough
    half_done = tmp_path / "r1"
    (half_done / "stages").mkdir(parents=True)
    (half_done / "stages" / "search.json").write_text(json.dumps({"stage": "search", "status": "done"}))
    result = cpl(*base, "--run-dir", str(tmp_path / "r2"), "--previous", str(half_done))
    assert result.returncode == 2 and "trained no policy" in result.stderr
    assert not (tmp_path / "r2").exists()  # refused before anything was written


@pytest.mark.vllm
@pytest.mark.timeout(3600)  # two rounds: four vLLM engine starts and seven training jobs on 2 shared cores
def test_two_rounds_the_first_interrupted_and_resumed(tmp_path):
    """Round 1 is killed after its search and resumed: every stage runs once (the embedded planner solves some toy
    problems, so every stage has data). Round 2 then searches with round 1's final policy and value, and says so."""
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    # the demo's problems: under search the planner both solves and fails them, so pairs exist
    train = world.write_gsm8k_jsonl(demo_problems(), tmp_path / "train.jsonl")
    test = world.write_gsm8k_jsonl(world.generate("arith", 4, seed=5, split="test"), tmp_path / "test.jsonl")
    cmd = [sys.executable, "-m", "cpl.cli", *round_args(PLANNER_DIR / "policy", train, test, r1)]
    first = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    search_record = r1 / "stages" / "search.json"
    deadline = time.monotonic() + 600
    while not search_record.is_file():
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "search stage did not finish"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # interrupt the round right after its search stage
    first.wait()
    searched = search_record.read_text()

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "search: already finished, skipped" in resumed.stderr
    assert search_record.read_text() == searched  # not searched again
    stages = {p.stem: json.loads(p.read_text()) for p in (r1 / "stages").iterdir()}
    assert set(stages) == {"search", "sft", "step_apo", "step_dpo", "value", "eval"}
    assert stages["search"]["outputs"]["models"]["policy_from"] == "base"
    stats1 = stages["search"]["outputs"]["stats"]
    assert stats1["sft"] > 0 and stats1 == json.loads((r1 / "search" / "stats.json").read_text())
    assert "Table 1" in resumed.stdout and "searched with policy" in resumed.stdout
    # How many pairs 3 problems yield varies with the sample (the planner rarely branches); with none, the
    # preference stages are skipped, saying why, and round 2 starts from the SFT policy.
    has_pairs = stats1["plan_pairs"] + stats1["solution_pairs"] > 0
    preference = "done" if has_pairs else "skipped"
    expected = {"search": "done", "sft": "done", "step_apo": preference, "step_dpo": preference, "value": "done"}
    assert {s: r["status"] for s, r in stages.items()} == {**expected, "eval": "done"}
    trained = ["policy_sft", "value"] + (["policy_step_apo", "policy_step_dpo"] if has_pairs else [])
    for model in trained:
        manifest = json.loads((r1 / model / "manifest.json").read_text())
        assert manifest["data"], model
    accuracy = stages["eval"]["outputs"]["accuracy"]
    assert set(accuracy) == {"base", "sft"} | ({"step_apo", "step_dpo"} if has_pairs else set())
    report = json.loads((r1 / "eval.json").read_text())
    for name, value in accuracy.items():
        items = report[name]["items"]
        assert report[name]["total"] == len(items) == 4
        # every item graded again here, and the accuracy is the share of those grades
        grades = [is_equivalent(extract_answer(i["response"]), i["gold"]) for i in items]
        assert [i["correct"] for i in items] == grades
        assert value == sum(grades) / 4
    assert len(list((r1 / "search" / "trees").glob("*.json"))) == 3

    # Round 2. The embedded planner only knows the plain format, so it keeps it (the preset would switch to XML).
    common = ["--base", str(PLANNER_DIR / "policy"), "--input", str(train), "--simulations", "12", "--no-few-shot"]
    common += ["--max-step-tokens", "96", "--dtype", "float32", "--no-baselines", "--micro-batch-size", "4"]
    common += ["--sft-epochs", "1", "--apo-epochs", "1", "--value-epochs", "1", "--value-batch-size", "8"]
    second = cpl("round", "--round", "2", *common, "--run-dir", str(r2), "--previous", str(r1), "--format", "plain")
    assert second.returncode == 0, second.stderr[-3000:]
    search2 = json.loads((r2 / "stages" / "search.json").read_text())
    models = search2["outputs"]["models"]
    final_stage = "step_apo" if has_pairs else "sft"
    assert (models["policy"], models["policy_from"]) == (str(r1 / f"policy_{final_stage}"), f"previous:{final_stage}")
    assert (models["value"], models["value_from"]) == (str(r1 / "value"), "previous:value")
    assert json.loads((r2 / "round.json").read_text())["previous"] == str(r1)
    trees = [json.loads(p.read_text()) for p in (r2 / "search" / "trees").glob("*.json")]
    assert len(trees) == 3 and all(t["config"]["simulations"] == 12 for t in trees)
    value2 = json.loads((r2 / "stages" / "value.json").read_text())
    if value2["status"] == "done":  # the round-2 value model continues from round 1's (decision 004)
        manifest = json.loads((r2 / "value" / "manifest.json").read_text())
        assert str(r1 / "value") in json.dumps(manifest)
