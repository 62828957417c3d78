"""`cpl eval` (in-process and over HTTP) and the lm-eval entry point, against a real vLLM OpenAI server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cpl.cli import build_parser
from cpl.evaluation import evaluate
from cpl.grading import is_equivalent
from cpl.ood_eval import LOCAL_TASKS_DIR, PAPER_SHOTS, PAPER_TASKS, parse_shots, shots_per_task
from cpl.problems import Problem
from services.cli import main as services_main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "gsm8k_sample.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def openai_server(tiny_models, tmp_path_factory):
    policy, _ = tiny_models
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm") / "server.log").open("w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(policy)]
    cmd += ["--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "4096"]
    cmd += ["--served-model-name", "tiny", "--enforce-eager"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, "vLLM server exited; see its log"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError("vLLM server did not become healthy")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def cpl(*args: str) -> subprocess.CompletedProcess[str]:
    """The ``cpl`` console script (library commands plus the service layer's HTTP evaluations)."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=900)


def cpl_library(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m cpl.cli``: the library's commands only."""
    return subprocess.run([sys.executable, "-m", "cpl.cli", *args], capture_output=True, text=True, timeout=900)


def check_report(path: Path, total: int) -> dict:
    report = json.loads(path.read_text())
    assert report["total"] == total == len(report["items"])
    assert report["correct"] == sum(i["correct"] for i in report["items"])
    for item in report["items"]:
        assert item["correct"] == is_equivalent(item["predicted"], item["gold"])
    return report


@pytest.mark.vllm
def test_eval_over_http(openai_server, tmp_path):
    out = tmp_path / "report.json"
    args = ["eval", "--policy-url", openai_server, "--input", str(SAMPLE), "--max-tokens", "32", "--no-few-shot"]
    result = cpl(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accuracy" in result.stdout
    check_report(out, 3)


@pytest.mark.vllm
def test_eval_in_process_matches_http(openai_server, tiny_models, tmp_path):
    """Greedy decoding on the same checkpoint: in-process and server give the same responses."""
    http_out, local_out = tmp_path / "http.json", tmp_path / "local.json"
    common = ["--input", str(SAMPLE), "--max-tokens", "24", "--no-few-shot"]
    assert cpl("eval", "--policy-url", openai_server, *common, "--out", str(http_out)).returncode == 0
    result = cpl("eval", "--model", str(tiny_models[0]), "--dtype", "float32", *common, "--out", str(local_out))
    assert result.returncode == 0, result.stderr[-2000:]
    local = check_report(local_out, 3)
    remote = json.loads(http_out.read_text())
    assert [i["response"] for i in local["items"]] == [i["response"] for i in remote["items"]]


@pytest.mark.vllm
def test_lm_eval_entry_point_runs_local_tasks(openai_server, tiny_models, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = LOCAL_TASKS_DIR / "toy_arith.jsonl"
    for name in ("toy_arith_gen.yaml", "toy_arith_mc.yaml"):
        text = (LOCAL_TASKS_DIR / name).read_text().replace("test: toy_arith.jsonl", f"test: {data}")
        (tasks / name).write_text(text)
    out = tmp_path / "ood.json"
    args = ["eval-ood", "--base-url", openai_server, "--tokenizer", str(tiny_models[0])]
    args += ["--tasks", "toy_arith_gen,toy_arith_mc", "--include-path", str(tasks), "--limit", "4", "--out", str(out)]
    result = cpl(*args, "--shots", "toy_arith_gen=2,toy_arith_mc=3")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    # one invocation, each task with its own shot count
    assert (results["toy_arith_gen"]["n-shot"], results["toy_arith_mc"]["n-shot"]) == (2, 3)
    assert 0.0 <= results["toy_arith_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["toy_arith_gen"]["exact_match,none"] <= 1.0


def test_eval_needs_exactly_one_target(tmp_path):
    result = cpl("eval", "--input", str(SAMPLE))
    assert result.returncode == 2 and "exactly one of --model" in result.stderr
    result = cpl_library("eval", "--input", str(SAMPLE))  # the library alone has no HTTP target
    assert result.returncode == 2 and "give --model DIR" in result.stderr


def test_eval_is_zero_shot_unless_asked():
    problems = [Problem(id="p", question="What is 2+3?", gold="5")]
    seen: list[str] = []

    def generate(prompts, max_tokens):
        seen.extend(prompts)
        return ["Plan 1: add.<endstep>\n\nDetailed Implementation:\n1. 2+3=5\nThe final answer is $\\boxed{5}$."]

    assert evaluate(problems, generate).accuracy == 1.0
    assert evaluate(problems, generate, few_shot=True).accuracy == 1.0
    assert "Natalia" not in seen[0] and "Natalia" in seen[1]
    args = ["eval", "--model", "m", "--input", "x.jsonl"]
    assert build_parser().parse_args(args).few_shot is False
    assert build_parser().parse_args([*args, "--few-shot"]).few_shot is True
    rnd = ["round", "--base", "b", "--input", "x.jsonl", "--run-dir", "r"]
    assert build_parser().parse_args(rnd).eval_few_shot is False


def test_paper_shot_counts_per_task():
    assert PAPER_SHOTS == {"arc_challenge": 25, "bbh": 3, "mmlu_stem": 5}
    assert shots_per_task(PAPER_TASKS) == {"arc_challenge": 25, "bbh": 3, "mmlu_stem": 5}
    assert shots_per_task([*PAPER_TASKS, "gsm8k"], parse_shots("bbh=0")) == {
        "arc_challenge": 25,
        "bbh": 0,
        "mmlu_stem": 5,
        "gsm8k": None,  # lm-eval's own default
    }
    assert shots_per_task(PAPER_TASKS, every_task=1) == dict.fromkeys(PAPER_TASKS, 1)
    with pytest.raises(ValueError, match="not run"):
        shots_per_task(["bbh"], {"arc_challenge": 25})
    for bad in ("bbh", "bbh=x", "bbh=-1", "=3"):
        with pytest.raises(ValueError):
            parse_shots(bad)


def test_eval_ood_rejects_bad_shots(capsys):
    args = ["eval-ood", "--base-url", "http://127.0.0.1:9", "--tokenizer", "t", "--tasks", "bbh", "--shots", "bbh=x"]
    assert services_main(args) == 2
    assert "--shots" in capsys.readouterr().err
