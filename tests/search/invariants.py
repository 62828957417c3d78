"""The invariants every tree the service stores must satisfy (paper §3.1: eqs. 2-4, the search's limits)."""

from __future__ import annotations

import pytest

from cpl.formats import StepKind
from cpl.tree import Tree


def check_tree(tree: Tree) -> None:
    config = tree.config
    root = tree.root
    assert root.parent is None and root.depth == 0
    # Eq. 4: every simulation adds one visit to the root.
    assert root.N == tree.simulations_done, (root.N, tree.simulations_done)
    ids = [n.id for n in tree.nodes]
    assert ids == list(range(len(tree.nodes))), "node ids are positions, no duplicates"
    seen_children: set[int] = set()
    for node in tree.nodes:
        children = tree.children(node)
        for child in children:
            assert child.parent == node.id and child.depth == node.depth + 1
            assert child.id not in seen_children, f"node {child.id} has two parents"
            seen_children.add(child.id)
            # Eq. 2: Q(s, a) = r + V(s') with the reward folded into terminal values.
            assert child.Q == pytest.approx(child.V)
        assert node.depth <= config.max_depth
        limit = config.root_children if node.depth == 0 else config.children
        assert len(children) <= limit
        texts = [(c.kind, c.text) for c in children]
        assert len(set(texts)) == len(texts), "identical siblings are one action"
        if node.depth >= config.max_depth - 1:
            assert all(c.kind is StepKind.SOLUTION for c in children), "the last level may only solve"
        if node.kind is StepKind.SOLUTION:
            assert not children
        if children:
            assert node.expanded
            visited = [c for c in children if c.N > 0]
            # Eq. 4 per node: the simulation that expanded it, plus every one that went on to a child.
            assert node.N == 1 + sum(c.N for c in children), (node.id, node.N, [c.N for c in children])
            if visited:
                # Eq. 3: V(s) is the visit-weighted mean of the children's Q.
                expected = sum(c.N * c.Q for c in visited) / sum(c.N for c in visited)
                assert node.V == pytest.approx(expected), node.id
        elif not node.terminal:
            assert node.N == 0 or (node.id == 0 and node.dead_end)
        if node.reward is not None:
            assert node.kind is StepKind.SOLUTION and node.V == node.reward == (1.0 if node.correct else -1.0)
        assert -1.0 <= node.V <= 1.0
    assert seen_children == set(ids[1:]), "every node but the root has exactly one parent"
