"""Training data from finished trees (paper §4.1, docs/architecture.md, docs/decisions/003-search-values.md).

* Plan-step pairs: under one parent, every (V > 0, V < 0) combination of sibling plan steps.
* Solution-step pairs: among sibling solution steps, only (max V, if > 0) vs (min V, if < 0).
* SFT: up to ``max_per_problem`` (4) correct full responses per problem, chosen at random (seeded).
* Value data: every state with a search value, and that value.

Only nodes whose value the search produced take part, in all four datasets alike (`has_search_value`,
docs/decisions/003-search-values.md): terminal nodes whose value is exact (a graded reward, a dead end) and
nodes with at least `MIN_VISITED_CHILDREN` visited children (their V is the eq. 3 backup of what the search
found below them). A leaf reached for the first time has N = 1 but still the V the value model guessed for it;
training on it would train the models on their own noise.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel

from cpl.formats import PromptFormat, Step, StepKind, render_prompt, render_response, render_step
from cpl.schemas import PreferencePair, SFTExample, ValueExample
from cpl.tree import Node, Tree
from cpl.values import clamp_value

MIN_VISITED_CHILDREN: int = 1
"""Visited children a non-terminal node needs for its V to count as a search value (default of the exports)."""


def has_search_value(tree: Tree, node: Node, *, min_visited_children: int = MIN_VISITED_CHILDREN) -> bool:
    """Whether ``node.V`` was produced by the search rather than guessed by the value model.

    True for a graded terminal node (V is its reward), a dead end (every candidate hit the token limit: V is
    the fixed dead-end value) and a node with at least ``min_visited_children`` visited children (V is their
    visit-weighted mean, eq. 3). A terminal solution of an inference-mode tree (no gold answer) has only a guess.
    """
    if node.reward is not None or node.dead_end:
        return True
    if min_visited_children < 1:
        raise ValueError(f"min_visited_children must be at least 1, got {min_visited_children}")
    return sum(1 for c in tree.children(node) if c.N > 0) >= min_visited_children


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


def _valued_children(tree: Tree, parent: Node, kind: StepKind, min_visited_children: int) -> list[Node]:
    return [
        c
        for c in tree.children(parent)
        if c.kind is kind and has_search_value(tree, c, min_visited_children=min_visited_children)
    ]


def plan_pairs(tree: Tree, *, min_visited_children: int = MIN_VISITED_CHILDREN) -> list[PreferencePair]:
    pairs = []
    for parent in tree.nodes:
        siblings = _valued_children(tree, parent, StepKind.PLAN, min_visited_children)
        preferred = [c for c in siblings if c.V > 0]
        dispreferred = [c for c in siblings if c.V < 0]
        pairs += [_pair(tree, parent, w, lose) for w, lose in itertools.product(preferred, dispreferred)]
    return pairs


def solution_pairs(tree: Tree, *, min_visited_children: int = MIN_VISITED_CHILDREN) -> list[PreferencePair]:
    pairs = []
    for parent in tree.nodes:
        siblings = _valued_children(tree, parent, StepKind.SOLUTION, min_visited_children)
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


def value_examples(tree: Tree, *, min_visited_children: int = MIN_VISITED_CHILDREN) -> list[ValueExample]:
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
        if has_search_value(tree, node, min_visited_children=min_visited_children)
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


def export_datasets(
    trees: Iterable[Tree], out_dir: Path, *, sft_seed: int = 0, min_visited_children: int = MIN_VISITED_CHILDREN
) -> dict[str, int]:
    """Write ``sft.jsonl``, ``plan_pairs.jsonl``, ``solution_pairs.jsonl`` and ``value.jsonl``; return counts."""
    trees = list(trees)

    def rows(name: str) -> Iterator[BaseModel]:
        for tree in trees:
            if name == "sft":
                yield from sft_examples(tree, seed=sft_seed)
            else:
                yield from DATASETS[name](tree, min_visited_children=min_visited_children)

    return {name: write_jsonl(out_dir / f"{name}.jsonl", rows(name)) for name in DATASETS}
