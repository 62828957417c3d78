"""Where searched trees live: the `TreeStore` protocol and the file store `cpl search` uses.

The search loop (`search_into_store`) reads and writes trees only through a `TreeStore`, so the same loop runs
against the files of library mode (`FileTreeStore`, ``OUT/trees/<id>.json``) and against the search service's
Redis store. A store holds whole snapshots of `cpl.tree.Tree` (one schema for search, store and exports):

- ``save_snapshot(tree)``: overwrite the tree's stored copy with this (possibly unfinished) tree; a crash
  loses at most the simulations since the last snapshot. A snapshot never replaces a finished tree.
- ``load(tree_id)``: the stored tree, or None.
- ``list_ids()``: the ids of every stored tree, sorted.
- ``mark_finished(tree)``: store the final tree and record that its search is over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from cpl.mcts import MCTS
from cpl.problems import Problem
from cpl.tree import Tree

log = logging.getLogger(__name__)

SNAPSHOT_EVERY = 10
"""Simulations between two snapshots of an unfinished tree."""


@runtime_checkable
class TreeStore(Protocol):
    async def save_snapshot(self, tree: Tree) -> None:
        """Store this state of the tree; ignored when the stored tree is already finished."""
        ...

    async def load(self, tree_id: str) -> Tree | None:
        """The stored tree, or None when there is none."""
        ...

    async def list_ids(self) -> list[str]:
        """Ids of every stored tree, sorted."""
        ...

    async def mark_finished(self, tree: Tree) -> None:
        """Store the final tree; later snapshots of it are ignored."""
        ...


class FileTreeStore:
    """One JSON file per tree, ``DIR/<id>.json``, replaced atomically (a crash never leaves half a tree).

    A tree is finished when its file says ``simulations_done >= config.simulations`` (the file format carries
    no other flag), so finished trees survive restarts and an interrupted run resumes the others.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # (id, created_at) of the finished searches this store has seen: a search is one tree's lineage, so a
        # fresh search of the same id (other settings) may still replace a finished tree of an older one.
        self._finished: set[tuple[str, datetime]] = set()

    def path(self, tree_id: str) -> Path:
        return self.directory / f"{tree_id}.json"

    def _read(self, tree_id: str) -> Tree | None:
        path = self.path(tree_id)
        return Tree.model_validate_json(path.read_text()) if path.is_file() else None

    def _write(self, tree: Tree) -> None:
        path = self.path(tree.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(tree.model_dump_json())
        tmp.replace(path)

    async def save_snapshot(self, tree: Tree) -> None:
        if (tree.id, tree.created_at) in self._finished:
            log.warning("tree %s is already finished in %s; snapshot ignored", tree.id, self.directory)
            return
        await asyncio.to_thread(self._write, tree)

    async def load(self, tree_id: str) -> Tree | None:
        tree = await asyncio.to_thread(self._read, tree_id)
        if tree is not None and tree.finished:
            self._finished.add((tree.id, tree.created_at))
        return tree

    async def list_ids(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json"))

    async def mark_finished(self, tree: Tree) -> None:
        if not tree.finished:
            raise ValueError(f"tree {tree.id} has {tree.simulations_done}/{tree.config.simulations} simulations")
        await asyncio.to_thread(self._write, tree)
        self._finished.add((tree.id, tree.created_at))


async def load_or_create(store: TreeStore, mcts: MCTS, problem: Problem) -> Tree:
    """The stored tree of this problem when it was searched with the same settings, else a new one."""
    tree = await store.load(problem.id)
    if tree is not None:
        if tree.question == problem.question and tree.config == mcts.config:
            return tree
        log.warning("tree %s was searched with other settings or question; starting it again", problem.id)
    return mcts.new_tree(problem.id, problem.question, problem.gold)


async def load_trees(store: TreeStore, mcts: MCTS, problems: Sequence[Problem]) -> list[Tree]:
    return [await load_or_create(store, mcts, p) for p in problems]


async def search_into_store(
    mcts: MCTS,
    trees: Sequence[Tree],
    store: TreeStore,
    *,
    max_concurrent: int = 32,
    snapshot_every: int = SNAPSHOT_EVERY,
    on_simulation: Callable[[Tree], None] | None = None,
) -> None:
    """Search the unfinished ``trees`` (from `load_trees`: stored ones resume); snapshots go to ``store`` every
    ``snapshot_every`` simulations and each tree is marked finished when its search ends.

    ``on_simulation`` (a callable taking the tree) is told of every simulation, e.g. to move a progress bar.
    """

    async def progress(tree: Tree) -> None:
        if on_simulation is not None:
            on_simulation(tree)
        if tree.finished:
            await store.mark_finished(tree)
        elif tree.simulations_done % snapshot_every == 0:
            await store.save_snapshot(tree)

    try:
        unfinished = [t for t in trees if not t.finished]
        await mcts.search_many(unfinished, max_concurrent=max_concurrent, on_progress=progress)
    finally:
        for tree in trees:  # keep the work done so far, also when the search stops early
            if not tree.finished:
                await store.save_snapshot(tree)
