"""Monte Carlo Tree Search over plan steps (paper §3.1, docs/decisions/001-mcts-reading.md).

One simulation: *select* by PUCT (eq. 1) from the root while the node is expanded and not terminal; a
*terminal* node's value is its reward; a *leaf* keeps its initial value and is *expanded* (its children get
initial values in one batched call: graded rewards for solutions, the value model for the rest); then *backup*
(eqs. 2-4) from the reached node to the root.

The engine is sequential inside one tree; `search_many` runs many trees in one event loop so that their
expansions reach the inference engine together.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cpl.config import PriorMode, SearchConfig
from cpl.formats import StepKind
from cpl.grading import extract_answer, is_equivalent
from cpl.protocols import Candidate, ExpandRequest, PolicyModel, State, ValueModel
from cpl.tree import Node, Tree
from cpl.values import clamp_value

ProgressCallback = Callable[[Tree], Awaitable[None] | None]
CancelCheck = Callable[[], Awaitable[bool] | bool]

DEAD_END_VALUE = -1.0


class SearchCancelled(Exception):
    """Raised when the cancel flag is set between simulations; the tree keeps the work done so far."""

    def __init__(self, tree: Tree) -> None:
        super().__init__(f"search of tree {tree.id} cancelled after {tree.simulations_done} simulations")
        self.tree = tree


def expansion_seed(search_seed: int, state: State) -> int:
    """The sampling seed of the expansion of ``state`` in a search seeded with ``search_seed``.

    The first 62 bits of SHA-256 over the search seed and a canonical serialisation of the state (the question
    and the steps so far, as compact JSON): a function of the node alone, so a node gets the same samples
    whatever the order or batching of expansions, and a resumed search equals an uninterrupted one. 62 bits
    leave room for vLLM's per-sample seeds (seed + i for the i-th of n) in a signed 64-bit integer.
    docs/decisions/005-search-seeds.md.
    """
    canonical = json.dumps(
        [search_seed, state.question, [[str(kind), text] for kind, text in state.steps]],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def puct_score(child: Node, parent_visits: int, c_puct: float) -> float:
    """Eq. 1: Q(s,a) + c_puct * pi(a|s) * sqrt(N(s)) / (1 + N(s,a))."""
    return child.Q + c_puct * child.prior * math.sqrt(parent_visits) / (1 + child.N)


def priors(candidates: Sequence[Candidate], mode: PriorMode) -> list[float]:
    """pi(a|s) for each sibling, normalised to sum to 1 (see `PriorMode`)."""
    if not candidates:
        return []
    if mode is PriorMode.UNIFORM:
        return [1.0 / len(candidates)] * len(candidates)
    if mode is PriorMode.MEAN_LOGPROB:
        scores = [c.logprob / max(c.num_tokens, 1) for c in candidates]
    else:
        scores = [c.logprob for c in candidates]
    top = max(scores)  # subtract the max so exp() cannot underflow to all zeros
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def backup(tree: Tree, node: Node) -> None:
    """Eqs. 2-4 along the path from ``node`` up to the root."""
    node.N += 1  # eq. 4; the reached node keeps its value
    child = node
    while child.parent is not None:
        parent = tree.nodes[child.parent]
        child.Q = child.V  # eq. 2: Q(s,a) = r(s,a) + V(s'); r is already inside terminal values
        visited = [c for c in tree.children(parent) if c.N > 0]
        parent.V = sum(c.N * c.Q for c in visited) / sum(c.N for c in visited)  # eq. 3
        parent.N += 1  # eq. 4
        child = parent


class MCTS:
    def __init__(self, policy: PolicyModel, value: ValueModel, config: SearchConfig | None = None) -> None:
        self.policy = policy
        self.value = value
        self.config = config or SearchConfig()

    def new_tree(self, tree_id: str, question: str, gold: str | None = None) -> Tree:
        return Tree.new(tree_id, question, gold, self.config)

    def select(self, tree: Tree) -> Node:
        node = tree.root
        while node.expanded and not node.terminal:
            children = tree.children(node)
            # max() keeps the first of equal scores, so ties go to the earlier-sampled child.
            node = max(children, key=lambda c: puct_score(c, node.N, tree.config.c_puct))
        return node

    async def expand(self, tree: Tree, node: Node) -> None:
        """Sample the node's children and give each an initial value (step 3 of a simulation).

        The paper's count of samples (5 at the root, 3 elsewhere) is the target of distinct steps: while fewer came
        back, the policy is asked again for the missing ones, within ``draw_budget`` times the count in all, and
        not after a round that brought nothing new (docs/decisions/006-distinct-expansions.md).
        """
        config = tree.config
        wanted = config.root_children if node.depth == 0 else config.children
        budget = math.floor(wanted * config.draw_budget)
        state = tree.state(node)
        # Seeded: vLLM gives the i-th of n samples seed + i, so a later round seeded with base + drawn continues the
        # same stream of samples instead of repeating its start.
        base_seed = None if config.seed is None else expansion_seed(config.seed, state)
        kept: dict[tuple[StepKind, str], tuple[Candidate, str]] = {}
        drawn = 0
        while len(kept) < wanted and drawn < budget:
            n = min(wanted - len(kept), budget - drawn)
            request = ExpandRequest(
                state=state,
                n=n,
                temperature=config.temperature,
                max_tokens=config.max_step_tokens,
                force_solution=node.depth >= config.max_depth - 1,
                few_shot=config.few_shot,
                seed=None if base_seed is None else base_seed + drawn,
            )
            (result,) = await self.policy.expand([request])
            drawn += n
            before = len(kept)
            for cand in result.candidates:
                # A step cut off by the token limit is not a step; identical siblings are one action.
                if cand.finish_reason != "length" and cand.text and (cand.kind, cand.text) not in kept:
                    kept[(cand.kind, cand.text)] = (cand, result.model_version)
            if len(kept) == before:
                break  # nothing new: the node's samples have collapsed, more draws would repeat them
        node.expanded = True
        if not kept:
            node.dead_end = True
            node.V = DEAD_END_VALUE
            return
        candidates = [cand for cand, _ in kept.values()]
        for (cand, version), prior in zip(kept.values(), priors(candidates, config.prior), strict=True):
            tree.add_child(
                node,
                kind=cand.kind,
                text=cand.text,
                prior=prior,
                logprob=cand.logprob,
                num_tokens=cand.num_tokens,
                model_version=version,
            )
        await self.initial_values(tree, tree.children(node))

    async def initial_values(self, tree: Tree, nodes: Sequence[Node]) -> None:
        """Graded rewards for solution steps (when the gold answer is known), the value model for the rest."""
        to_value: list[Node] = []
        for node in nodes:
            if node.kind is StepKind.SOLUTION:
                node.answer = extract_answer(node.text)
            if node.kind is StepKind.SOLUTION and tree.gold is not None:
                node.correct = await asyncio.to_thread(is_equivalent, node.answer, tree.gold)
                node.reward = 1.0 if node.correct else -1.0
                node.V = node.reward
            else:
                to_value.append(node)
        if to_value:
            results = await self.value.evaluate([tree.state(n) for n in to_value])
            for node, res in zip(to_value, results, strict=True):
                node.V = clamp_value(res.value)
        for node in nodes:
            node.Q = node.V  # an unvisited child enters PUCT with Q = its initial value

    async def simulate(self, tree: Tree) -> None:
        node = self.select(tree)
        if not node.terminal:
            await self.expand(tree, node)
        backup(tree, node)
        tree.simulations_done += 1

    async def search(
        self,
        tree: Tree,
        *,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> Tree:
        """Run simulations until ``tree.config.simulations`` are done (resuming a snapshot continues it)."""
        if not tree.nodes:
            raise ValueError(f"tree {tree.id} has no root")
        if tree.simulations_done == 0 and tree.root.N == 0:
            (root_value,) = await self.value.evaluate([tree.state(tree.root)])
            tree.root.V = clamp_value(root_value.value)
        while not tree.finished:
            if should_cancel is not None and await _maybe_await(should_cancel()):
                raise SearchCancelled(tree)
            await self.simulate(tree)
            if on_progress is not None:
                await _maybe_await(on_progress(tree))
        return tree

    async def search_many(
        self,
        trees: Sequence[Tree],
        *,
        max_concurrent: int = 64,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> list[Tree]:
        """Search many trees concurrently; at most ``max_concurrent`` are in flight at once."""
        gate = asyncio.Semaphore(max_concurrent)

        async def one(tree: Tree) -> Tree:
            async with gate:
                return await self.search(tree, on_progress=on_progress, should_cancel=should_cancel)

        return list(await asyncio.gather(*(one(t) for t in trees)))


async def _maybe_await(value: Awaitable[Any] | Any) -> Any:
    return await value if inspect.isawaitable(value) else value
