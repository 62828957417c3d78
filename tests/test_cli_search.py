"""`cpl search` end to end: the real CLI, in-process vLLM on the tiny models, three GSM8K questions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpl.cli import DEMO_SEARCH_SEED, demo_problems
from cpl.formats import StepKind, render_prompt
from cpl.pairs import has_search_value
from cpl.problems import load_problems
from cpl.toy import world
from cpl.tree import Tree

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "gsm8k_sample.jsonl"
SIMULATIONS = 24


def cpl(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    # Decoded without universal newlines: a progress bar's redraws ("\r") stay redraws, not lines.
    result = subprocess.run([sys.executable, "-m", "cpl.cli", *args], capture_output=True, timeout=timeout, cwd=REPO)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def toy_sample(tmp_path_factory) -> Path:
    """Held-out toy problems the embedded planner solves only sometimes under sampling (as the demo's)."""
    return world.write_gsm8k_jsonl(demo_problems(), tmp_path_factory.mktemp("toy") / "toy.jsonl")


def search_args(sample: Path, out: Path) -> list[str]:
    """`cpl demo`'s search: the embedded planner (the default model), which finds correct answers, seeded so that
    every dataset has rows."""
    args = ["search", "--input", str(sample), "--out", str(out), "--simulations", str(SIMULATIONS)]
    args += ["--seed", str(DEMO_SEARCH_SEED)]
    return [*args, "--no-few-shot", "--max-step-tokens", "96", "--dtype", "float32", "--quiet"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """README's `cpl demo`: the same search as `search_args` on the demo's problems (one engine start serves the
    demo's checks and the dataset checks)."""
    out = tmp_path_factory.mktemp("search")
    result = cpl("demo", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Table 1" in result.stdout and str(out / "stats.json") in result.stdout
    return out, result


@pytest.fixture(scope="module")
def search_run(demo_run) -> Path:
    return demo_run[0]


@pytest.mark.vllm
def test_search_writes_trees_and_datasets_that_agree(search_run: Path, toy_sample: Path):
    out = search_run
    problems = load_problems(toy_sample)
    trees = {p.id: Tree.model_validate_json((out / "trees" / f"{p.id}.json").read_text()) for p in problems}
    assert len(trees) == 3
    for problem in problems:
        tree = trees[problem.id]
        assert tree.gold == problem.gold and tree.question == problem.question
        assert tree.simulations_done == tree.root.N == SIMULATIONS
        assert len(tree.nodes) > 1

    values = read_jsonl(out / "value.jsonl")
    valued = {(t.id, n.id) for t in trees.values() for n in t.nodes if has_search_value(t, n)}
    assert {(r["tree_id"], r["node_id"]) for r in values} == valued
    for row in values:
        node = trees[row["tree_id"]].nodes[row["node_id"]]
        assert row["value"] == pytest.approx(node.V) and row["visits"] == node.N

    for name in ("plan_pairs", "solution_pairs"):
        for row in read_jsonl(out / f"{name}.jsonl"):
            tree = trees[row["tree_id"]]
            chosen, rejected = tree.nodes[row["chosen_id"]], tree.nodes[row["rejected_id"]]
            assert chosen.parent == rejected.parent == row["parent_id"]
            assert (row["chosen_value"], row["rejected_value"]) == (chosen.V, rejected.V)
            assert chosen.V > 0 > rejected.V
            assert chosen.text in row["chosen"] and rejected.text in row["rejected"]
            parent = tree.nodes[row["parent_id"]]
            assert row["prompt"] == render_prompt(
                tree.question, tree.state(parent).as_steps(), tree.config.format, few_shot=False
            )

    correct = {(t.id, n.id) for t in trees.values() for n in t.nodes if n.kind is StepKind.SOLUTION and n.correct}
    sft = read_jsonl(out / "sft.jsonl")
    assert {(r["tree_id"], r["node_id"]) for r in sft} <= correct
    # The planner finds right answers and every tree has visited states, so these may not be empty (checks on
    # nothing pass); the demo's seed makes both pair files non-empty too (test_demo_searches_real_plans...).
    assert sft and values
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sft"] == len(sft) and stats["value"] == len(values) and stats["trees"] == 3
    assert stats["plan_pairs"] == len(read_jsonl(out / "plan_pairs.jsonl"))


@pytest.mark.vllm
def test_search_resumes_finished_trees_without_new_work(search_run: Path, toy_sample: Path):
    before = {p.name: p.read_text() for p in (search_run / "trees").iterdir()}
    stats = (search_run / "stats.json").read_text()
    result = cpl(*search_args(toy_sample, search_run), timeout=120)  # nothing to search: no engine starts
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.read_text() for p in (search_run / "trees").iterdir()} == before
    assert (search_run / "stats.json").read_text() == stats and "Table 1" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["search", "--out", "x"], "give --input"),
        (["search", "--input", "/nonexistent.jsonl", "--out", "x"], "no such file"),
        (["search", "--answer", "3", "--out", "x"], "--answer goes with --question"),
        (["search", "--question", "q", "--simulations", "0", "--out", "x"], "positive integer"),
        (
            ["search", "--question", "q", "--policy", "/nonexistent", "--value", "/nonexistent", "--out", "x"],
            "not a model directory",
        ),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message):
    result = cpl(*args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr


def test_malformed_problem_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What?", "answer": "#### 4"}\nnot json\n')
    result = cpl("search", "--input", str(bad), "--out", str(tmp_path / "o"), timeout=120)
    assert result.returncode == 2 and "bad.jsonl:2: not JSON" in result.stderr
    bad.write_text('{"question": "What?"}\n')
    result = cpl("search", "--input", str(bad), "--out", str(tmp_path / "o"), timeout=120)
    assert result.returncode == 2 and "bad.jsonl:1" in result.stderr


@pytest.mark.vllm
def test_demo_searches_real_plans_with_the_embedded_planner(demo_run):
    """README's main job: the shipped planner builds trees of real plans, some reach the right answer, and the
    output is a short summary, not vLLM's logs."""
    tmp_path, result = demo_run
    output = result.stdout + result.stderr
    # lines as a terminal shows them: progress bars redraw one line with \r, so count newlines only
    assert output.count("\n") < 60, output
    assert "INFO" not in output
    trees = [Tree.model_validate_json(p.read_text()) for p in (tmp_path / "trees").glob("*.json")]
    assert len(trees) == 3
    plans = [n for t in trees for n in t.nodes if n.kind is StepKind.PLAN]
    assert plans and all(n.text.startswith("Plan ") for n in plans)
    solutions = [n for t in trees for n in t.nodes if n.kind is StepKind.SOLUTION]
    # The planner writes boxed answers; a sampled step now and then ends without one (it is then graded wrong).
    assert solutions and sum(n.answer is not None for n in solutions) >= 0.75 * len(solutions)
    assert any(n.correct for n in solutions)
    # Pairs need siblings on both sides of zero, which the planner rarely writes; the demo's search seed
    # (DEMO_SEARCH_SEED, docs/decisions/005-search-seeds.md) was chosen so that it yields both kinds, every run.
    assert {t.config.seed for t in trees} == {DEMO_SEARCH_SEED}
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["sft"] > 0 and stats["value"] > 0
    assert stats["plan_pairs"] > 0 and stats["solution_pairs"] > 0, stats
    assert f"plan pairs / solution pairs     {stats['plan_pairs']} / {stats['solution_pairs']}" in result.stdout
    assert all(f"{t.id}: " in result.stdout for t in trees)  # each tree's best plan


@pytest.mark.vllm
def test_round_2_with_200_simulations_runs_200(tmp_path, tiny_models):
    """A flag equal to its default still overrides the round preset (round 2 alone would run 100)."""
    policy, value = tiny_models
    args = ["search", "--policy", str(policy), "--value", str(value), "--question", "What is 2 + 3?", "--answer", "5"]
    # Depth 1: the root's children are solutions (terminal), so 200 simulations cost one expansion.
    args += ["--round", "2", "--simulations", "200", "--out", str(tmp_path), "--max-step-tokens", "8"]
    flags = ["--max-depth", "1", "--marker-bias", "4", "--no-few-shot", "--quiet", "--dtype", "float32"]
    result = cpl(*args, *flags, timeout=1500)  # engine start-up dominates; slow on a loaded 2-core machine
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "trees").glob("*.json")
    tree = Tree.model_validate_json(path.read_text())
    assert tree.config.format == "xml" and tree.config.simulations == 200
    assert tree.simulations_done == tree.root.N == 200


@pytest.mark.vllm
def test_the_embedded_planner_branches_at_the_root(tmp_path):
    """The planner has real choices (docs/toy-world.md, "World v2"): the root expansions of 10 held-out problems
    (5 samples at T = 0.7, the paper's root count) keep at least 2.5 distinct plan steps on average."""
    sample = world.write_gsm8k_jsonl(world.generate("arith", 10, seed=21, split="test"), tmp_path / "ten.jsonl")
    args = ["search", "--input", str(sample), "--out", str(tmp_path / "out"), "--simulations", "2", "--seed", "0"]
    result = cpl(*args, "--no-few-shot", "--max-step-tokens", "96", "--dtype", "float32", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["trees"] == 10 and stats["root_expansions"] == 10
    assert stats["root_children"] / stats["root_expansions"] >= 2.5, stats
