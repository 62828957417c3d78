"""Training data from finished trees (paper §4.1, DESIGN.md §2).

* Plan-step pairs: under one parent, every (V > 0, V < 0) combination of sibling plan steps.
* Solution-step pairs: among sibling solution steps, only (max V, if > 0) vs (min V, if < 0).
* SFT: up to ``max_per_problem`` (4) correct full responses per problem, chosen at random (seeded).
* Value data: every visited state with its MCTS value.

Only nodes whose value the search produced take part: visited nodes (N > 0) and graded terminal nodes (their
value is the exact reward). An unvisited non-terminal node's V is the value model's own guess, which would
train the models on their own noise.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel

from cpl.formats import PromptFormat, Step, StepKind, render_prompt, render_response, render_step
from cpl.schemas import PreferencePair, SFTExample, ValueExample
from cpl.tree import Node, Tree
from cpl.values import clamp_value


def has_search_value(node: Node) -> bool:
    return node.N > 0 or node.reward is not None


def _prompt(tree: Tree, parent: Node) -> str:
    return render_prompt(
        tree.question, tree.state(parent).as_steps(), tree.config.format, few_shot=tree.config.few_shot
    )


def _completion(node: Node, fmt: PromptFormat) -> str:
    """The step as the policy generated it: up to and including its stop marker.

    The newline that `render_step` puts after a marker belongs to the next prompt, not to this step.
    """
    assert node.kind is not None
    return render_step(Step(node.kind, node.text), fmt).removesuffix("\n")


def _pair(tree: Tree, parent: Node, chosen: Node, rejected: Node) -> PreferencePair:
    fmt = tree.config.format
    assert chosen.kind is not None and rejected.kind is not None
    return PreferencePair(
        prompt=_prompt(tree, parent),
        chosen=_completion(chosen, fmt),
        rejected=_completion(rejected, fmt),
        chosen_value=chosen.V,
        rejected_value=rejected.V,
        kind=chosen.kind,
        tree_id=tree.id,
        depth=chosen.depth,
        parent_id=parent.id,
        chosen_id=chosen.id,
        rejected_id=rejected.id,
        format=fmt,
    )


def _valued_children(tree: Tree, parent: Node, kind: StepKind) -> list[Node]:
    return [c for c in tree.children(parent) if c.kind is kind and has_search_value(c)]


def plan_pairs(tree: Tree) -> list[PreferencePair]:
    pairs = []
    for parent in tree.nodes:
        siblings = _valued_children(tree, parent, StepKind.PLAN)
        preferred = [c for c in siblings if c.V > 0]
        dispreferred = [c for c in siblings if c.V < 0]
        pairs += [_pair(tree, parent, w, lose) for w, lose in itertools.product(preferred, dispreferred)]
    return pairs


def solution_pairs(tree: Tree) -> list[PreferencePair]:
    pairs = []
    for parent in tree.nodes:
        siblings = _valued_children(tree, parent, StepKind.SOLUTION)
        if not siblings:
            continue
        # max()/min() keep the first of equal values: the earliest-sampled sibling wins ties.
        best = max(siblings, key=lambda c: c.V)
        worst = min(siblings, key=lambda c: c.V)
        if best.V > 0 and worst.V < 0:
            pairs.append(_pair(tree, parent, best, worst))
    return pairs


def sft_examples(tree: Tree, *, max_per_problem: int = 4, seed: int = 0) -> list[SFTExample]:
    """Up to ``max_per_problem`` correct root-to-solution paths, sampled with a seed tied to the tree."""
    correct = [n for n in tree.nodes if n.kind is StepKind.SOLUTION and n.correct]
    # Seed per tree, so a tree's sample does not depend on which other trees are in the same export.
    rng = random.Random(f"{seed}:{tree.id}")
    chosen = sorted(rng.sample(correct, min(max_per_problem, len(correct))), key=lambda n: n.id)
    fmt = tree.config.format
    return [
        SFTExample(
            prompt=render_prompt(tree.question, [], fmt, few_shot=tree.config.few_shot),
            response=render_response(tree.state(node).as_steps(), fmt),
            question=tree.question,
            answer=node.answer,
            tree_id=tree.id,
            node_id=node.id,
            format=fmt,
        )
        for node in chosen
    ]


def value_examples(tree: Tree) -> list[ValueExample]:
    return [
        ValueExample(
            text=tree.state(node).value_prompt(),
            value=clamp_value(node.V),
            tree_id=tree.id,
            node_id=node.id,
            depth=node.depth,
            visits=node.N,
            terminal=node.terminal,
        )
        for node in tree.nodes
        if node.N > 0
    ]


DATASETS = {
    "sft": sft_examples,
    "plan_pairs": plan_pairs,
    "solution_pairs": solution_pairs,
    "value": value_examples,
}


def write_jsonl(path: Path, rows: Iterable[BaseModel]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(row.model_dump_json() + "\n")
            count += 1
    return count


def export_datasets(trees: Iterable[Tree], out_dir: Path, *, sft_seed: int = 0) -> dict[str, int]:
    """Write ``sft.jsonl``, ``plan_pairs.jsonl``, ``solution_pairs.jsonl`` and ``value.jsonl``; return counts."""
    trees = list(trees)

    def rows(name: str) -> Iterator[BaseModel]:
        for tree in trees:
            yield from (sft_examples(tree, seed=sft_seed) if name == "sft" else DATASETS[name](tree))

    return {name: write_jsonl(out_dir / f"{name}.jsonl", rows(name)) for name in DATASETS}


def tree_digest(tree: Tree) -> str:
    """A short content hash, handy to check that exports and trees agree."""
    return hashlib.sha256(tree.model_dump_json(exclude={"created_at"}).encode()).hexdigest()[:16]
