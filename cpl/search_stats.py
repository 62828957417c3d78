"""The paper's Table 1 for any set of searched trees, written to ``stats.json``, and a short readable summary.

Table 1 reports, per round: the average depth of correct solutions, the positive:negative ratio of plan steps
(sibling plan steps with V > 0 vs V < 0, the ones plan pairs are formed from), and the numbers of plan pairs and
solution pairs. We add the SFT and value rows and a few counts that say how the search went. Only values the
search produced count (`cpl.pairs.has_search_value`, docs/decisions/003-search-values.md), as in the exports.

`format_summary` is what ``cpl search``, ``cpl round`` and ``cpl demo`` print at the end; it only needs the trees,
the statistics and the output directory, so a service can print the same summary for its own trees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from cpl.formats import Step, StepKind, display_text
from cpl.pairs import DATASETS, has_search_value
from cpl.tree import Node, Tree

STATS_FILE = "stats.json"


class SearchStats(BaseModel):
    """Table 1 of the paper, for the trees of one search (one round)."""

    trees: int
    simulations: int = Field(description="simulations done, all trees together")
    nodes: int
    solved_trees: int = Field(description="trees with at least one correct solution step")
    correct_solutions: int
    incorrect_solutions: int
    avg_depth_correct: float | None = Field(
        description="Table 1 'Avg Depths': mean depth (steps, solution included) of correct solution steps"
    )
    positive_plan_steps: int = Field(description="plan steps with a search value V > 0")
    negative_plan_steps: int = Field(description="plan steps with a search value V < 0")
    negatives_per_positive: float | None = Field(description="Table 1 'Pos:Neg' is 1 : this")
    plan_pairs: int
    solution_pairs: int
    sft: int = Field(description="SFT rows")
    value: int = Field(description="value rows")
    root_expansions: int = Field(default=0, description="expanded roots")
    root_children: int = Field(default=0, description="distinct children kept by those root expansions")
    expansions: int = Field(default=0, description="expanded nodes below the root")
    children: int = Field(default=0, description="distinct children kept by those expansions")

    @property
    def pos_neg(self) -> str:
        return "n/a" if self.negatives_per_positive is None else f"1:{self.negatives_per_positive:.2f}"

    @property
    def children_per_root_expansion(self) -> float | None:
        """Distinct steps an expansion of the root kept (the paper asks for 5 samples)."""
        return self.root_children / self.root_expansions if self.root_expansions else None

    @property
    def children_per_expansion(self) -> float | None:
        """Distinct steps an expansion below the root kept (the paper asks for 3 samples)."""
        return self.children / self.expansions if self.expansions else None


def compute_stats(trees: Sequence[Tree], counts: Mapping[str, int]) -> SearchStats:
    """Table 1 from the trees; ``counts`` are the dataset sizes `cpl.pairs.export_datasets` returned."""
    solutions = [(t, n) for t in trees for n in t.nodes if n.kind is StepKind.SOLUTION and n.correct is not None]
    correct = [n for _, n in solutions if n.correct]
    plans = [n for t in trees for n in t.nodes if n.kind is StepKind.PLAN and has_search_value(t, n)]
    positive = sum(1 for n in plans if n.V > 0)
    negative = sum(1 for n in plans if n.V < 0)
    expanded = [(n, len(n.children)) for t in trees for n in t.nodes if n.expanded]
    return SearchStats(
        trees=len(trees),
        simulations=sum(t.simulations_done for t in trees),
        nodes=sum(len(t.nodes) for t in trees),
        solved_trees=len({t.id for t, n in solutions if n.correct}),
        correct_solutions=len(correct),
        incorrect_solutions=len(solutions) - len(correct),
        avg_depth_correct=sum(n.depth for n in correct) / len(correct) if correct else None,
        positive_plan_steps=positive,
        negative_plan_steps=negative,
        negatives_per_positive=negative / positive if positive else None,
        plan_pairs=counts.get("plan_pairs", 0),
        solution_pairs=counts.get("solution_pairs", 0),
        sft=counts.get("sft", 0),
        value=counts.get("value", 0),
        root_expansions=sum(1 for n, _ in expanded if n.depth == 0),
        root_children=sum(k for n, k in expanded if n.depth == 0),
        expansions=sum(1 for n, _ in expanded if n.depth > 0),
        children=sum(k for n, k in expanded if n.depth > 0),
    )


def dataset_counts(tree: Tree) -> dict[str, int]:
    """The rows each dataset of `cpl.pairs` makes from one tree (its share of `export_datasets`' counts)."""
    return {name: len(make(tree)) for name, make in DATASETS.items()}


def tree_stats(tree: Tree) -> SearchStats:
    """Table 1 of one tree, to be combined with others by :func:`merge_stats` (a service keeps one per tree)."""
    return compute_stats([tree], dataset_counts(tree))


def merge_stats(parts: Sequence[SearchStats]) -> SearchStats:
    """Table 1 of several sets of trees from theirs: what :func:`compute_stats` gives for all the trees at once."""
    total = {name: sum(getattr(p, name) for p in parts) for name in _SUMMED}
    # depths are whole steps, so each part's depth sum is an integer: rounding makes the merge exact
    depth_sum = sum(round((p.avg_depth_correct or 0.0) * p.correct_solutions) for p in parts)
    positive, negative, correct = total["positive_plan_steps"], total["negative_plan_steps"], total["correct_solutions"]
    return SearchStats(
        **total,
        avg_depth_correct=depth_sum / correct if correct else None,
        negatives_per_positive=negative / positive if positive else None,
    )


_SUMMED = [name for name in SearchStats.model_fields if name not in ("avg_depth_correct", "negatives_per_positive")]


def write_stats(out_dir: Path, stats: SearchStats) -> Path:
    path = out_dir / STATS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(stats.model_dump_json(indent=2) + "\n")
    return path


def best_path(tree: Tree) -> list[Node]:
    """The most visited path from the root (ties: the higher V), the search's preferred plan for the question."""
    path: list[Node] = []
    node = tree.root
    while node.children:
        node = max(tree.children(node), key=lambda c: (c.N, c.V))
        if node.N == 0 and node.reward is None:
            break
        path.append(node)
    return path


def _one_line(text: str, width: int) -> str:
    line = " / ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= width else line[: width - 1] + "…"


def _per(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table1(stats: SearchStats) -> str:
    depth = _per(stats.avg_depth_correct)
    return "\n".join(
        [
            "Table 1 (paper §4.1) for this search:",
            f"  avg depth of correct solutions  {depth}",
            f"  pos:neg plan steps              {stats.pos_neg} ({stats.positive_plan_steps} : "
            f"{stats.negative_plan_steps})",
            f"  plan pairs / solution pairs     {stats.plan_pairs} / {stats.solution_pairs}",
            f"  SFT rows / value rows           {stats.sft} / {stats.value}",
            f"  solved trees                    {stats.solved_trees} of {stats.trees} "
            f"({stats.correct_solutions} correct, {stats.incorrect_solutions} wrong solution steps)",
            f"  distinct children / expansion   root {_per(stats.children_per_root_expansion)}, "
            f"below {_per(stats.children_per_expansion)}",
        ]
    )


def format_summary(trees: Sequence[Tree], stats: SearchStats, out_dir: Path | None = None, *, width: int = 100) -> str:
    """Best plan of each tree, Table 1, and where the files are."""
    lines: list[str] = []
    for tree in trees:
        path = best_path(tree)
        final = path[-1] if path else None
        verdict = "no solution yet"
        if final is not None and final.kind is StepKind.SOLUTION:
            mark = {True: "correct", False: "wrong"}.get(final.correct, "ungraded")  # type: ignore[arg-type]
            verdict = f"answer {final.answer} ({mark}, gold {tree.gold})"
        lines.append(f"{tree.id}: {_one_line(tree.question, width - len(tree.id) - 2)}")
        for node in path:
            assert node.kind is not None
            shown = display_text(Step(node.kind, node.text), tree.config.format)
            head = f"  {'plan' if node.kind is StepKind.PLAN else 'solution'} N={node.N} V={node.V:+.2f}  "
            lines.append(head + _one_line(shown, width - len(head)))
        lines.append(f"  -> {verdict}")
    lines.append(format_table1(stats))
    if out_dir is not None:
        lines.append(
            f"files: {out_dir / 'trees'}/*.json, {out_dir}/{{sft,plan_pairs,solution_pairs,value}}.jsonl, "
            f"{out_dir / STATS_FILE}"
        )
        lines.append(f"look at a tree: python -m cpl.show {out_dir / 'trees'}")
    return "\n".join(lines)


def summary_of_run(out_dir: Path, tree_ids: Sequence[str] | None = None, *, width: int = 100) -> str:
    """`format_summary` of a finished ``cpl search`` directory (its trees and ``stats.json``)."""
    stats = SearchStats.model_validate_json((out_dir / STATS_FILE).read_text())
    files = [out_dir / "trees" / f"{i}.json" for i in tree_ids] if tree_ids is not None else None
    files = files if files is not None else sorted((out_dir / "trees").glob("*.json"))
    trees = [Tree.model_validate_json(f.read_text()) for f in files]
    return format_summary(trees, stats, out_dir, width=width)
