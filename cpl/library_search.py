"""`cpl search` in library mode: MCTS in-process on vLLM's offline engine, trees and datasets on disk.

Trees are written to ``OUT/trees/<id>.json`` (`cpl.store.FileTreeStore`) as they finish, and an interrupted run
resumes: finished trees are kept, unfinished snapshots continue where they stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from cpl.config import SearchConfig
from cpl.mcts import MCTS
from cpl.pairs import export_datasets
from cpl.problems import Problem
from cpl.protocols import PolicyModel, ValueModel
from cpl.search_stats import compute_stats, write_stats
from cpl.store import FileTreeStore, load_trees, search_into_store
from cpl.tree import Tree


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
    """Search every problem (resuming the trees stored in ``OUT/trees``), then export the four datasets and
    ``stats.json`` (Table 1, `cpl.search_stats`).

    Returns dataset sizes. Trees are read and written only through the `cpl.store.TreeStore` protocol.
    """
    mcts = MCTS(policy, value, config)
    store = FileTreeStore(out / "trees")
    trees = await load_trees(store, mcts, problems)
    total = len(trees) * config.simulations
    bar = tqdm(total=total, initial=sum(t.simulations_done for t in trees), unit="sim", disable=not show_progress)
    try:
        await search_into_store(
            mcts, trees, store, max_concurrent=max_concurrent, on_simulation=lambda _: bar.update(1)
        )
    finally:
        bar.close()
    counts = export_datasets(trees, out)
    write_stats(out, compute_stats(trees, counts))
    return counts


def finished_trees(problems: Sequence[Problem], config: SearchConfig, out: Path) -> list[Tree] | None:
    """The stored trees when every problem's tree is finished with these settings (nothing left to search)."""
    store = FileTreeStore(out / "trees")
    trees = []
    for problem in problems:
        tree = asyncio.run(store.load(problem.id))
        if tree is None or not tree.finished or tree.question != problem.question or tree.config != config:
            return None
        trees.append(tree)
    return trees


def run_library_search(
    problems: Sequence[Problem],
    policy_dir: Path,
    value_dir: Path,
    config: SearchConfig,
    out: Path,
    *,
    max_concurrent: int = 32,
    engine_seed: int | None = None,
    dtype: str = "auto",
    marker_bias: float = 0.0,
    show_progress: bool = True,
) -> dict[str, int]:
    """Search ``problems`` with in-process engines (or only re-export when every tree is already finished).

    ``engine_seed`` seeds vLLM's global generator, which samples only requests without a seed of their own;
    None: ``config.seed`` (or 0). A seeded search (``config.seed``) seeds every expansion itself.
    """
    from cpl.engines.vllm_offline import VLLMPolicy, VLLMValue, stop_marker_bias

    done = finished_trees(problems, config, out)
    if done is not None:  # a re-run of a finished search: re-export, no engine to start
        counts = export_datasets(done, out)
        write_stats(out, compute_stats(done, counts))
        return counts
    extra = {"logit_bias": stop_marker_bias(policy_dir, marker_bias)} if marker_bias else None
    if engine_seed is None:
        engine_seed = (config.seed or 0) % 2**32  # vLLM seeds numpy too, which takes 32 bits
    policy = VLLMPolicy(policy_dir, seed=engine_seed, dtype=dtype, extra_sampling=extra)
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
