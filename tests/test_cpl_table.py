"""bench/cpl_table's statistics, control arm and report (the experiment itself is run by hand: BENCHMARKS.md)."""

from __future__ import annotations

import json
import random

import pytest

from bench.cpl_table import stats
from bench.cpl_table.protocol import PILOT, Sizes, shuffle_advantages
from bench.cpl_table.run import COLUMNS, load_seeds, report
from cpl.toy import world


def bernoulli(p: float, n: int, rng: random.Random) -> list[bool]:
    return [rng.random() < p for _ in range(n)]


def test_paired_difference_of_identical_and_opposite_models():
    a = [[True, False, True, True]] * 3
    same = stats.paired_difference(a, a, reps=200)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    better = stats.paired_difference([[True] * 50] * 2, [[False] * 50] * 2, reps=200)
    assert better.mean == better.low == better.high == 100.0
    with pytest.raises(ValueError, match="same problems"):
        stats.paired_difference([[True, False]], [[True]])
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_difference([[True]], [])


def test_paired_difference_covers_the_true_difference_and_narrows_with_more_problems():
    rng = random.Random(0)
    covered, widths = 0, {}
    for n in (60, 600):
        for trial in range(40 if n == 60 else 5):
            # a is right with p 0.5, b is a with 10% of a's right answers turned wrong: true difference 5 points
            a = [bernoulli(0.5, n, rng) for _ in range(3)]
            b = [[x and rng.random() >= 0.1 for x in row] for row in a]
            d = stats.paired_difference(a, b, reps=300, seed=trial)
            assert d.low <= d.mean <= d.high
            if n == 60:
                covered += d.low <= 5.0 <= d.high
            widths.setdefault(n, []).append(d.half_width)
    assert covered >= 32  # ~95% nominal, of 40
    assert max(widths[600]) < min(widths[60])
    assert stats.minimal_detectable(d) == pytest.approx(2.8 * (d.high - d.low) / 3.92)


def test_disagreement_counts_different_answers_including_none():
    assert stats.disagreement([["1", "2", None]], [["1", "3", None]]) == pytest.approx(1 / 3)
    assert stats.disagreement([["1"], ["2"]], [["1"], [None]]) == 0.5
    table = stats.disagreements({"a": [["1"]], "b": [["2"]], "c": [["1"]]})
    assert table == {("a", "b"): 1.0, ("a", "c"): 0.0, ("b", "c"): 1.0}


def interval(mean: float, half: float) -> stats.Interval:
    return stats.Interval(mean, mean - half, mean + half, (mean,))


def evidence(**changes) -> stats.Evidence:
    base = dict(
        sft_vs_base=interval(6, 2),
        apo_vs_sft=interval(4, 2),
        apo_vs_dpo=interval(2, 1.5),
        apo_vs_shuffled=interval(3, 2),
        shared_ood_vs_base=interval(3, 2),
        controls_vs_base=interval(0.2, 1),
        apo_dpo_disagreement=0.12,
    )
    return stats.Evidence(**{**base, **changes})


def test_verdict_rules():
    assert stats.verdict(evidence())[0] == "reproduced"
    name, reasons = stats.verdict(evidence(apo_dpo_disagreement=0.01))
    assert name == "void" and "1.0%" in reasons[0]
    # Step-APO indistinguishable from Step-DPO and from its own shuffled control: refuted
    name, reasons = stats.verdict(evidence(apo_vs_dpo=interval(0, 0.5), apo_vs_shuffled=interval(0.1, 0.6)))
    assert name == "refuted at this scale" and len(reasons) == 2
    assert stats.verdict(evidence(apo_vs_sft=interval(-3, 1)))[0] == "refuted at this scale"
    # wide intervals decide nothing
    name, reasons = stats.verdict(evidence(apo_vs_dpo=interval(1, 6), apo_vs_shuffled=interval(1, 6)))
    assert name == "inconclusive" and any("shuffled" in r for r in reasons)
    # the controls moving breaks the transfer claim only
    assert stats.verdict(evidence(controls_vs_base=interval(5, 1)))[0] == "inconclusive"


def test_shuffled_control_keeps_pairs_and_values_but_not_their_pairing(tmp_path):
    rows = [
        {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "chosen_value": i / 10, "rejected_value": -i / 20}
        for i in range(1, 30)
    ]
    plan = tmp_path / "plan_pairs.jsonl"
    plan.write_text("".join(json.dumps(r) + "\n" for r in rows))
    solution = tmp_path / "solution_pairs.jsonl"
    solution.write_text(json.dumps({**rows[0], "chosen_value": 0.3, "rejected_value": -0.3}) + "\n")
    out = shuffle_advantages([plan, solution], tmp_path / "shuffled", seed=0)
    shuffled = [json.loads(line) for line in out[0].read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in shuffled] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]
    values = sorted((r["chosen_value"], r["rejected_value"]) for r in shuffled)
    assert values == sorted((r["chosen_value"], r["rejected_value"]) for r in rows)  # each value keeps its partner
    moved = sum(s["chosen_value"] != r["chosen_value"] for s, r in zip(shuffled, rows, strict=True))
    assert moved > len(rows) // 2
    assert json.loads(out[1].read_text())["chosen_value"] == 0.3  # shuffled within its own file (kind) only
    assert shuffle_advantages([plan], tmp_path / "again", seed=0)[0].read_text() == out[0].read_text()


def test_report_merges_seeds_and_states_the_verdict(tmp_path):
    """The report on synthetic evaluations: Step-APO right far more often than everything else."""
    rng = random.Random(1)
    sizes = Sizes(**{**PILOT.__dict__, "eval_problems": 200, "ood_problems": 40})
    problems = {"in-domain": world.generate("arith", sizes.eval_problems, seed=7, split="test")}
    problems |= {f: world.generate(f, sizes.ood_problems, seed=7, split="test") for f in world.OUT_OF_DOMAIN}
    accuracy = {"base": 0.2, "r1_sft": 0.3, "r1_step_apo": 0.6, "r1_step_dpo": 0.35, "r1_apo_shuffled": 0.3}
    for seed in (0, 1):
        seed_dir = tmp_path / f"seed{seed}"
        (seed_dir / "evals").mkdir(parents=True)
        for model, p in accuracy.items():
            evals = {}
            for name, items in problems.items():
                shared_or_domain = name == "in-domain" or name in world.SHARED_GRAMMAR
                correct = bernoulli(p if shared_or_domain else 0.05, len(items), rng)
                evals[name] = {
                    "correct": correct,
                    "predicted": [str(x.answer) if c else None for x, c in zip(items, correct, strict=True)],
                    "trap": [bool(world.inverted_comparisons(x)) for x in items],
                }
            (seed_dir / "evals" / f"{model}.json").write_text(json.dumps(evals))
        summary = {"seed": seed, "models": {m: "x" for m in accuracy}, "search_stats": {}}
        (seed_dir / "summary.json").write_text(json.dumps(summary))
    text = report(load_seeds(tmp_path), sizes, minutes=1.0)
    assert "Seeds: 0, 1" in text and all(c in text for c in COLUMNS)
    assert "| r1_step_apo − r1_step_dpo | in-domain |" in text
    assert "**Verdict: reproduced**" in text, text
    with pytest.raises(SystemExit, match="no finished seed"):
        report(load_seeds(tmp_path / "empty"), sizes, None)
