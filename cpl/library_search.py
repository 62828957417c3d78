"""`cpl search` in library mode: MCTS in-process on vLLM's offline engine, trees and datasets on disk.

Trees are written to ``OUT/trees/<id>.json`` as they finish, and an interrupted run resumes: finished trees
are kept, unfinished snapshots continue where they stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from cpl.config import SearchConfig
from cpl.mcts import MCTS
from cpl.pairs import export_datasets
from cpl.problems import Problem
from cpl.protocols import PolicyModel, ValueModel
from cpl.search_stats import compute_stats, write_stats
from cpl.tree import Tree

log = logging.getLogger(__name__)

SNAPSHOT_EVERY = 10  # simulations between snapshots of an unfinished tree


def tree_path(out: Path, tree_id: str) -> Path:
    return out / "trees" / f"{tree_id}.json"


def load_or_create(mcts: MCTS, out: Path, problem: Problem) -> Tree:
    path = tree_path(out, problem.id)
    if path.is_file():
        tree = Tree.model_validate_json(path.read_text())
        if tree.question == problem.question and tree.config == mcts.config:
            return tree
        log.warning("tree %s was searched with other settings or question; starting it again", problem.id)
    return mcts.new_tree(problem.id, problem.question, problem.gold)


def save_tree(out: Path, tree: Tree) -> None:
    path = tree_path(out, tree.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(tree.model_dump_json())
    tmp.replace(path)  # atomic: a crash never leaves half a tree


async def search_problems(
    problems: Sequence[Problem],
    policy: PolicyModel,
    value: ValueModel,
    config: SearchConfig,
    out: Path,
    *,
    max_concurrent: int = 32,
    show_progress: bool = True,
) -> dict[str, int]:
    """Search every problem (resuming saved trees), then export the four datasets and ``stats.json`` (Table 1,
    `cpl.search_stats`). Returns dataset sizes."""
    mcts = MCTS(policy, value, config)
    trees = [load_or_create(mcts, out, p) for p in problems]
    total = sum(config.simulations for _ in trees)
    bar = tqdm(total=total, initial=sum(t.simulations_done for t in trees), unit="sim", disable=not show_progress)

    def progress(tree: Tree) -> None:
        bar.update(1)
        if tree.finished or tree.simulations_done % SNAPSHOT_EVERY == 0:
            save_tree(out, tree)

    try:
        await mcts.search_many(
            [t for t in trees if not t.finished], max_concurrent=max_concurrent, on_progress=progress
        )
    finally:
        bar.close()
    for tree in trees:
        save_tree(out, tree)
    counts = export_datasets(trees, out)
    write_stats(out, compute_stats(trees, counts))
    return counts


def run_library_search(
    problems: Sequence[Problem],
    policy_dir: Path,
    value_dir: Path,
    config: SearchConfig,
    out: Path,
    *,
    max_concurrent: int = 32,
    seed: int = 0,
    dtype: str = "auto",
    marker_bias: float = 0.0,
    show_progress: bool = True,
) -> dict[str, int]:
    from cpl.engines.vllm_offline import VLLMPolicy, VLLMValue, stop_marker_bias

    extra = {"logit_bias": stop_marker_bias(policy_dir, marker_bias)} if marker_bias else None
    policy = VLLMPolicy(policy_dir, seed=seed, dtype=dtype, extra_sampling=extra)
    value = VLLMValue(value_dir, dtype=dtype)
    try:
        return asyncio.run(
            search_problems(
                problems, policy, value, config, out, max_concurrent=max_concurrent, show_progress=show_progress
            )
        )
    finally:
        policy.close()
        value.close()
