"""The `TreeStore` protocol: the file store `cpl search` uses, and the search loop writing only through it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cpl.config import SearchConfig
from cpl.library_search import search_problems
from cpl.mcts import MCTS
from cpl.problems import Problem
from cpl.store import FileTreeStore, TreeStore, load_trees, search_into_store
from cpl.tree import Tree
from tests.scripted import GOLD, ScriptedPolicy, ScriptedValue

PROBLEMS = [Problem(id=f"p{i}", question=f"What is the answer {i}?", gold=GOLD) for i in range(3)]


def run(coro):
    return asyncio.run(coro)


class RecordingStore:
    """An in-memory `TreeStore` that remembers every call (what a Redis store would receive)."""

    def __init__(self) -> None:
        self.trees: dict[str, Tree] = {}
        self.finished: set[str] = set()
        self.calls: list[tuple[str, str, int]] = []

    async def save_snapshot(self, tree: Tree) -> None:
        self.calls.append(("snapshot", tree.id, tree.simulations_done))
        if tree.id not in self.finished:
            self.trees[tree.id] = tree.model_copy(deep=True)

    async def load(self, tree_id: str) -> Tree | None:
        self.calls.append(("load", tree_id, -1))
        return self.trees.get(tree_id)

    async def list_ids(self) -> list[str]:
        return sorted(self.trees)

    async def mark_finished(self, tree: Tree) -> None:
        self.calls.append(("finished", tree.id, tree.simulations_done))
        self.trees[tree.id] = tree.model_copy(deep=True)
        self.finished.add(tree.id)


def test_both_stores_satisfy_the_protocol(tmp_path: Path):
    assert isinstance(FileTreeStore(tmp_path), TreeStore)
    assert isinstance(RecordingStore(), TreeStore)


def test_file_store_round_trip_and_finished_trees_are_final(tmp_path: Path):
    store = FileTreeStore(tmp_path / "trees")
    mcts = MCTS(ScriptedPolicy(), ScriptedValue(), SearchConfig(simulations=4))
    tree = mcts.new_tree("t1", "q?", GOLD)
    assert run(store.list_ids()) == [] and run(store.load("t1")) is None
    run(store.save_snapshot(tree))
    assert run(store.load("t1")) == tree
    assert (tmp_path / "trees" / "t1.json").is_file()  # the file layout of `cpl search` is unchanged
    with pytest.raises(ValueError, match="0/4 simulations"):
        run(store.mark_finished(tree))
    run(mcts.search(tree))
    run(store.mark_finished(tree))
    stale = tree.model_copy(update={"simulations_done": 2})
    run(store.save_snapshot(stale))  # a late snapshot of the same search is ignored
    assert run(store.load("t1")).simulations_done == 4
    assert run(store.list_ids()) == ["t1"]
    # A new store (a new process) knows the tree is finished from its file once it has loaded it.
    again = FileTreeStore(tmp_path / "trees")
    assert run(again.load("t1")).finished
    run(again.save_snapshot(stale))
    assert run(again.load("t1")).simulations_done == 4


def test_search_loop_writes_only_through_the_store():
    store = RecordingStore()
    mcts = MCTS(ScriptedPolicy(), ScriptedValue(), SearchConfig(simulations=25))
    trees = run(load_trees(store, mcts, PROBLEMS))
    run(search_into_store(mcts, trees, store, snapshot_every=10))
    for problem in PROBLEMS:
        calls = [(kind, sims) for kind, tid, sims in store.calls if tid == problem.id]
        assert calls == [("load", -1), ("snapshot", 10), ("snapshot", 20), ("finished", 25)]
        assert store.trees[problem.id].finished and store.trees[problem.id].root.N == 25


def test_interrupted_search_resumes_from_the_store():
    store = RecordingStore()
    config = SearchConfig(simulations=30)

    class Interrupt(Exception):
        pass

    def stop_at_12(tree: Tree) -> None:
        if tree.id == "p0" and tree.simulations_done == 12:
            raise Interrupt

    mcts = MCTS(ScriptedPolicy(), ScriptedValue(), config)
    trees = run(load_trees(store, mcts, PROBLEMS[:1]))
    with pytest.raises(Interrupt):
        run(search_into_store(mcts, trees, store, on_simulation=stop_at_12))
    assert store.trees["p0"].simulations_done == 12 and "p0" not in store.finished  # kept by the final snapshot

    policy = ScriptedPolicy()
    mcts = MCTS(policy, ScriptedValue(), config)
    (resumed,) = run(load_trees(store, mcts, PROBLEMS[:1]))
    assert resumed.simulations_done == 12
    run(search_into_store(mcts, [resumed], store))
    assert store.trees["p0"].simulations_done == store.trees["p0"].root.N == 30
    assert len(policy.calls) <= 18  # only the remaining simulations ran


def test_library_search_resumes_finished_and_reruns_changed_trees(tmp_path: Path):
    counts = run(search_problems(PROBLEMS, ScriptedPolicy(), ScriptedValue(), SearchConfig(simulations=8), tmp_path))
    assert counts["value"] > 0
    store = FileTreeStore(tmp_path / "trees")
    assert run(store.list_ids()) == ["p0", "p1", "p2"]
    policy = ScriptedPolicy()
    run(search_problems(PROBLEMS, policy, ScriptedValue(), SearchConfig(simulations=8), tmp_path))
    assert policy.calls == []  # every tree was finished: nothing searched again
    run(search_problems(PROBLEMS, policy, ScriptedValue(), SearchConfig(simulations=9), tmp_path, show_progress=False))
    assert all(run(store.load(p.id)).simulations_done == 9 for p in PROBLEMS)
