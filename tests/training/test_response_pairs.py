"""Response-level pairs for the DPO baseline: correct vs wrong full paths of a tree."""

from __future__ import annotations

from cpl.config import SearchConfig
from cpl.formats import PromptFormat, StepKind, parse_response, render_prompt
from cpl.training import response_pairs
from cpl.tree import Tree


def _tree(fmt=PromptFormat.PLAIN) -> Tree:
    tree = Tree.new("t1", "What is 2+3?", "5", SearchConfig(format=fmt, few_shot=False))
    a = tree.add_child(tree.root, kind=StepKind.PLAN, text="Plan 1: Add.", N=3, V=0.3)
    b = tree.add_child(tree.root, kind=StepKind.PLAN, text="Plan 1: Multiply.", N=2, V=-1.0)
    tree.add_child(a, kind=StepKind.SOLUTION, text="Detailed Implementation:\n1. 2+3=5", correct=True, reward=1, N=1)
    tree.add_child(a, kind=StepKind.SOLUTION, text="Detailed Implementation:\n1. 2+3=6", correct=False, reward=-1, N=1)
    tree.add_child(b, kind=StepKind.SOLUTION, text="Detailed Implementation:\n1. 2*3=6", correct=False, reward=-1, N=1)
    tree.add_child(b, kind=StepKind.SOLUTION, text="Detailed Implementation:\n1. 5", correct=True, reward=1, N=1)
    tree.add_child(b, kind=StepKind.SOLUTION, text="Detailed Implementation:\n1. ungraded", N=0)
    return tree


def test_every_correct_wrong_combination():
    tree = _tree()
    pairs = response_pairs(tree, max_pairs=None)
    assert {(p.chosen_id, p.rejected_id) for p in pairs} == {(3, 4), (3, 5), (6, 4), (6, 5)}
    for p in pairs:
        assert p.prompt == render_prompt(tree.question, [], PromptFormat.PLAIN, few_shot=False)
        chosen = parse_response(p.chosen, PromptFormat.PLAIN)
        assert chosen == tree.state(tree.nodes[p.chosen_id]).as_steps()
        assert tree.nodes[p.chosen_id].correct and tree.nodes[p.rejected_id].correct is False


def test_capped_and_seeded():
    tree = _tree()
    first = response_pairs(tree, max_pairs=2, seed=1)
    assert len(first) == 2
    assert first == response_pairs(tree, max_pairs=2, seed=1)
    assert response_pairs(Tree.new("empty", "q", "1", SearchConfig())) == []
