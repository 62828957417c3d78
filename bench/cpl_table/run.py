"""The paper's Tables 2, 3 and 5 in miniature, with stated power: does Step-APO beat Step-DPO on the toy world?

    python bench/cpl_table/run.py --pilot --out runs/cpl_table_pilot          # one seed, < 20 min on 2 CPU cores
    python bench/cpl_table/run.py --seeds 0 1 2 3 4 --out runs/cpl_table      # the powered protocol (~60 min/seed)
    python bench/cpl_table/run.py --seeds 3 --out runs/cpl_table              # one seed per machine, then:
    python bench/cpl_table/run.py --report --out runs/cpl_table               # merge every seed<k>/ found in OUT

Per seed (`protocol.SeedRun`): round 1 (and round 2 in the full protocol) of CPL on in-domain training problems;
SFT; Step-APO and Step-DPO each tuned over the same grid of learning rates and epochs on a dev split; a control
arm, Step-APO on the same pairs with the advantages shuffled across pairs; then greedy accuracy of every model on
the same held-out problems: in-domain (and its trap subset: an inverted comparison is needed), the shared-grammar
out-of-domain families (heights, money), ages, and the negative controls (units, sequence).

The report (`report`) gives accuracies, paired differences with 95% bootstrap intervals over problems and seeds
(`stats.paired_difference`), the disagreement of every pair of models, the search's Table-1 statistics of each
round, the smallest difference the design could detect, and the verdict (`stats.verdict`). A seed resumes from
what it left in OUT. ``--device cuda`` trains and evaluates on a GPU (transformers; the search needs vLLM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.cpl_table import stats
from bench.cpl_table.protocol import FULL, PILOT, SeedRun, Sizes
from cpl.search_stats import SearchStats
from cpl.toy import world

DEFAULT_PLANNER = Path(__file__).resolve().parents[2] / "cpl" / "assets" / "planner"
SHARED = "shared-grammar OOD"
CONTROLS = "controls"


def columns(evals: dict) -> dict[str, dict[str, list]]:
    """Per model: the correctness vectors of every reported column (sets, the trap subset, family groups)."""
    out: dict[str, dict[str, list]] = {}
    for model, sets in evals.items():
        cols = {name: sets[name]["correct"] for name in ("in-domain", *world.OUT_OF_DOMAIN)}
        trap = sets["in-domain"]["trap"]
        cols["in-domain, trap"] = [c for c, t in zip(sets["in-domain"]["correct"], trap, strict=True) if t]
        cols[SHARED] = [c for f in world.SHARED_GRAMMAR for c in sets[f]["correct"]]
        cols[CONTROLS] = [c for f in world.CONTROLS for c in sets[f]["correct"]]
        out[model] = cols
    return out


COLUMNS = ("in-domain", "in-domain, trap", *world.SHARED_GRAMMAR, SHARED, "ages", *world.CONTROLS, CONTROLS)


def load_seeds(out: Path) -> list[dict]:
    seeds = []
    for summary in sorted(out.glob("seed*/summary.json")):
        seed_dir = summary.parent
        s = json.loads(summary.read_text())
        evals = {m: json.loads((seed_dir / "evals" / f"{m}.json").read_text()) for m in s["models"]}
        seeds.append({"summary": s, "evals": evals})
    return seeds


def report(seeds: list[dict], sizes: Sizes, minutes: float | None) -> str:
    if not seeds:
        raise SystemExit("no finished seed in OUT (seed<k>/summary.json): run some seeds first")
    models = [m for m in seeds[0]["summary"]["models"] if all(m in s["evals"] for s in seeds)]
    cols = [columns({m: s["evals"][m] for m in models}) for s in seeds]
    n = {c: len(cols[0]["base"][c]) for c in COLUMNS}
    lines = [f"Seeds: {', '.join(str(s['summary']['seed']) for s in seeds)}. Sizes: {sizes}."]
    if minutes is not None:
        lines.append(f"Wall time of this invocation: {minutes:.1f} min.")
    lines += [
        "",
        "Accuracy (%), mean ± std over seeds; problems per column: " + ", ".join(f"{c} {n[c]}" for c in COLUMNS),
        "",
    ]
    lines += ["| model | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for m in models:
        cells = []
        for c in COLUMNS:
            values = [100 * statistics.fmean(col[m][c]) if col[m][c] else float("nan") for col in cols]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.1f} ± {std:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")

    def diff(a: str, b: str, column: str = "in-domain") -> stats.Interval:
        return stats.paired_difference([c[a][column] for c in cols], [c[b][column] for c in cols])

    comparisons = [
        ("r1_sft", "base", "in-domain"),
        ("r1_step_apo", "r1_sft", "in-domain"),
        ("r1_step_dpo", "r1_sft", "in-domain"),
        ("r1_step_apo", "r1_step_dpo", "in-domain"),
        ("r1_step_apo", "r1_apo_shuffled", "in-domain"),
        ("r1_step_apo", "r1_step_dpo", "in-domain, trap"),
        ("r1_step_apo", "base", SHARED),
        ("r1_step_apo", "base", CONTROLS),
        ("r2_step_apo", "r1_step_apo", "in-domain"),
        ("r2_step_apo", "r2_step_dpo", "in-domain"),
    ]
    lines += ["", "Paired differences (accuracy points, 95% bootstrap interval over problems and seeds):", ""]
    lines += [
        "| comparison | column | difference [95% CI] | per seed | detectable at 80% power |",
        "| --- | --- | --- | --- | --- |",
    ]
    found: dict[tuple[str, str, str], stats.Interval] = {}
    for a, b, column in comparisons:
        if a not in models or b not in models or not n[column]:
            continue
        d = found[(a, b, column)] = diff(a, b, column)
        per_seed = ", ".join(f"{x:+.1f}" for x in d.per_seed)
        lines.append(f"| {a} − {b} | {column} | {d} | {per_seed} | {stats.minimal_detectable(d):.1f} |")

    answers = {m: [s["evals"][m]["in-domain"]["predicted"] for s in seeds] for m in models}
    lines += ["", "Disagreement (share of in-domain problems with different final answers):", ""]
    lines += ["| | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    pairs = stats.disagreements(answers)
    for m in models:
        cells = ["–" if m == o else f"{pairs.get((m, o), pairs.get((o, m), 0)):.1%}" for o in models]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")

    lines += ["", "The search's Table-1 statistics (per seed and round):", ""]
    header = "| seed | round | trees | plan pairs | solution pairs | pos:neg | depth of correct | distinct children"
    lines += [header + " / expansion (root, below) |"]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in seeds:
        for number, raw in s["summary"]["search_stats"].items():
            st = SearchStats.model_validate(raw)
            root, below = st.children_per_root_expansion, st.children_per_expansion
            lines.append(
                f"| {s['summary']['seed']} | {number} | {st.trees} | {st.plan_pairs} | {st.solution_pairs} "
                f"| {st.pos_neg} | {_num(st.avg_depth_correct)} | {_num(root)}, {_num(below)} |"
            )

    if ("r1_step_apo", "r1_step_dpo", "in-domain") in found:
        evidence = stats.Evidence(
            sft_vs_base=found[("r1_sft", "base", "in-domain")],
            apo_vs_sft=found[("r1_step_apo", "r1_sft", "in-domain")],
            apo_vs_dpo=found[("r1_step_apo", "r1_step_dpo", "in-domain")],
            apo_vs_shuffled=found[("r1_step_apo", "r1_apo_shuffled", "in-domain")],
            shared_ood_vs_base=found[("r1_step_apo", "base", SHARED)],
            controls_vs_base=found[("r1_step_apo", "base", CONTROLS)],
            apo_dpo_disagreement=pairs[("r1_step_apo", "r1_step_dpo")],
        )
        name, reasons = stats.verdict(evidence)
        lines += [
            "",
            f"Precondition: Step-APO and Step-DPO disagree on {evidence.apo_dpo_disagreement:.1%} of in-domain "
            f"problems (needs ≥ {stats.PRECONDITION_DISAGREEMENT:.0%}).",
            "",
            f"**Verdict: {name}**",
            "",
        ]
        lines += [f"- {r}" for r in reasons]
    else:
        lines += ["", "**Verdict: void** — no preference pairs, so no Step-APO / Step-DPO models to compare."]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--planner", type=Path, default=DEFAULT_PLANNER)
    p.add_argument("--out", type=Path, default=Path("runs/cpl_table"))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-4 (the pilot: 0)")
    p.add_argument("--pilot", action="store_true", help="the pilot's sizes (one seed, < 20 min on 2 cores)")
    p.add_argument("--report", action="store_true", help="only merge and report the seeds already in OUT")
    p.add_argument("--device", default="cpu", help="cpu (vLLM evaluation) or cuda (transformers, no vLLM needed)")
    p.add_argument("--concurrency", type=int, default=64)
    for name in ("train_problems", "simulations", "dev_problems", "eval_problems", "ood_problems", "rounds"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="override the preset's size")
    args = p.parse_args(argv)
    sizes = PILOT if args.pilot else FULL
    overrides = {
        k: getattr(args, k)
        for k in ("train_problems", "simulations", "dev_problems", "eval_problems", "ood_problems", "rounds")
    }
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    seeds = args.seeds if args.seeds is not None else ([0] if args.pilot else [0, 1, 2, 3, 4])
    start = time.monotonic()
    if not args.report:
        for seed in seeds:
            SeedRun(args.out, seed, sizes, args.planner, device=args.device, concurrency=args.concurrency).run()
    minutes = (time.monotonic() - start) / 60
    text = report(load_seeds(args.out), sizes, None if args.report else minutes)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
