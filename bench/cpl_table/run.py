"""The paper's Tables 2, 3 and 5 in miniature, on the toy world and the shipped planner.

For each seed: one CPL round (`cpl.round.Round`: MCTS over toy training problems, SFT, Step-APO and the
Step-DPO baseline), then greedy accuracy of base / SFT / Step-APO / Step-DPO on held-out in-domain (``arith``)
and out-of-domain (``units``, ``ages``, ``sequence``) problems. Prints a markdown table of mean ± std over seeds
and writes every number to ``--out``.

    python bench/cpl_table/run.py --seeds 0 1 2 --out runs/cpl_table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cpl.config import SearchConfig
from cpl.evaluation import evaluate, offline_generator
from cpl.formats import PromptFormat
from cpl.problems import Problem
from cpl.round import Round, RoundSettings, print_stage
from cpl.toy import world

DEFAULT_PLANNER = Path(__file__).resolve().parents[2] / "cpl" / "assets" / "planner"
POLICIES = ("base", "sft", "step_apo", "step_dpo")


def problems(family: str, n: int, seed: int, split: str) -> list[Problem]:
    return [
        Problem(id=f"{family}-{split}-{seed}-{i}", question=p.question, gold=str(p.answer))
        for i, p in enumerate(world.generate(family, n, seed=seed, split=split))
    ]


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    run_dir = args.out / f"seed{seed}"
    train = problems("arith", args.train_problems, 1000 + seed, "train")
    search = SearchConfig.round_preset(
        1, simulations=args.simulations, few_shot=False, max_step_tokens=args.max_step_tokens
    )
    settings = RoundSettings(
        round=1,
        base=args.planner / "policy",
        search_value=args.planner / "value",
        search=search,
        concurrency=args.concurrency,
        dtype="float32",
        sft={"epochs": args.sft_epochs, "batch_size": 32, "learning_rate": args.sft_lr, "micro_batch_size": 16},
        preference={"epochs": args.apo_epochs, "batch_size": 16, "learning_rate": args.apo_lr, "micro_batch_size": 16},
        value={"epochs": 1, "batch_size": 64, "learning_rate": 1e-4, "micro_batch_size": 32},
        seed=seed,
    )
    records = Round(run_dir, settings, train, eval_problems=[]).run_all(on_stage=print_stage)
    models = {"base": args.planner / "policy"}
    for stage in POLICIES[1:]:
        if stage in records and records[stage].status == "done":
            models[stage] = Path(records[stage].outputs["model"])
    eval_sets = {"in-domain": problems("arith", args.eval_problems, 7, "test")}
    for family in world.OUT_OF_DOMAIN:
        eval_sets[family] = problems(family, args.eval_problems // 2, 7, "test")
    results: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        results[name] = {}
        with offline_generator(str(model), PromptFormat.PLAIN, dtype="float32") as generate:
            for set_name, items in eval_sets.items():
                report = evaluate(items, generate, fmt=PromptFormat.PLAIN, few_shot=False, max_tokens=256)
                results[name][set_name] = report.accuracy
        ood = [results[name][f] for f in world.OUT_OF_DOMAIN]
        results[name]["out-of-domain"] = sum(ood) / len(ood)
    (run_dir / "table.json").write_text(json.dumps(results, indent=2))
    return results


def table(per_seed: list[dict[str, dict[str, float]]]) -> str:
    columns = ["in-domain", *world.OUT_OF_DOMAIN, "out-of-domain"]
    lines = ["| policy | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for policy in POLICIES:
        rows = [r[policy] for r in per_seed if policy in r]
        if not rows:
            continue
        cells = []
        for col in columns:
            values = [100 * r[col] for r in rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        lines.append(f"| {policy} (n={len(rows)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--planner", type=Path, default=DEFAULT_PLANNER)
    p.add_argument("--out", type=Path, default=Path("runs/cpl_table"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-problems", type=int, default=64)
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--simulations", type=int, default=24)
    p.add_argument("--max-step-tokens", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--sft-epochs", type=int, default=3)
    p.add_argument("--sft-lr", type=float, default=1e-4)
    p.add_argument("--apo-epochs", type=int, default=2)
    p.add_argument("--apo-lr", type=float, default=2e-5)
    args = p.parse_args()
    start = time.monotonic()
    per_seed = [run_seed(args, seed) for seed in args.seeds]
    minutes = (time.monotonic() - start) / 60
    text = table(per_seed)
    (args.out / "table.md").write_text(text + f"\n\nwall time: {minutes:.1f} min\n")
    print(text)
    print(f"wall time: {minutes:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
