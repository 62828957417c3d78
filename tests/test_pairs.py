import asyncio
import json
import random

import pytest

from cpl.config import SearchConfig
from cpl.formats import PromptFormat, StepKind
from cpl.mcts import MCTS
from cpl.pairs import export_datasets, has_search_value, plan_pairs, sft_examples, solution_pairs, value_examples
from cpl.protocols import ValueResult
from cpl.tree import Tree
from tests.scripted import GOLD, ScriptedPolicy


def sol(answer: str, note: str = "") -> str:
    return f"Detailed Implementation:\n1. Work{note}.\nThe final answer is $\\boxed{{{answer}}}$."


def hand_built_tree() -> Tree:
    """root -> a (+0.6) {sol 5 ok, sol 4 wrong, sol 5' ok, sol 6 graded, never visited}, b (-0.4) {c (+0.2),
    d (-0.5)}, e (-0.2), f (unvisited).

    c, d and e were reached once (N = 1) and never expanded: their V is the value model's guess, not a search value.
    """
    tree = Tree.new("hand", "What is 2+3?", "5", SearchConfig(few_shot=False))
    root = tree.root
    root.N, root.expanded = 10, True
    add = tree.add_child
    a = add(root, kind=StepKind.PLAN, text="Plan 1: a", N=5, V=0.6, expanded=True)
    b = add(root, kind=StepKind.PLAN, text="Plan 1: b", N=3, V=-0.4, expanded=True)
    add(root, kind=StepKind.PLAN, text="Plan 1: e", N=1, V=-0.2)
    add(a, kind=StepKind.SOLUTION, text=sol("5"), N=2, V=1.0, reward=1.0, correct=True, answer="5")
    add(a, kind=StepKind.SOLUTION, text=sol("4"), N=1, V=-1.0, reward=-1.0, correct=False, answer="4")
    add(a, kind=StepKind.SOLUTION, text=sol("5", " again"), N=1, V=1.0, reward=1.0, correct=True, answer="5")
    add(b, kind=StepKind.PLAN, text="Plan 2: c", N=1, V=0.2)
    add(b, kind=StepKind.PLAN, text="Plan 2: d", N=1, V=-0.5)
    add(root, kind=StepKind.PLAN, text="Plan 1: f", N=0, V=0.8)  # the value model's guess only
    add(a, kind=StepKind.SOLUTION, text=sol("6"), N=0, V=-1.0, reward=-1.0, correct=False, answer="6")  # exact
    for node in tree.nodes:
        node.Q = node.V
    return tree


def test_plan_pairs_by_hand():
    pairs = plan_pairs(hand_built_tree())
    got = [(p.parent_id, p.chosen_id, p.rejected_id, p.chosen_value, p.rejected_value) for p in pairs]
    # e (node 3) and b's children c, d (7, 8) were reached once and keep the value model's guesses: no pairs
    assert got == [(0, 1, 2, 0.6, -0.4)]
    first = pairs[0]
    assert first.prompt == "Question: What is 2+3?\n\nPlans:\n"
    assert (first.chosen, first.rejected) == ("Plan 1: a<endstep>", "Plan 1: b<endstep>")
    assert first.kind is StepKind.PLAN and first.depth == 1 and first.tree_id == "hand"


def test_plan_pairs_below_the_root():
    tree = hand_built_tree()
    for leaf, answer, reward in ((7, "5", 1.0), (8, "6", -1.0)):  # c and d each get one visited, graded solution
        tree.nodes[leaf].expanded = True
        tree.add_child(tree.nodes[leaf], kind=StepKind.SOLUTION, text=sol(answer), N=1, V=reward, reward=reward)
    pairs = [p for p in plan_pairs(tree) if p.parent_id == 2]
    assert [(p.chosen_id, p.rejected_id) for p in pairs] == [(7, 8)]
    assert pairs[0].prompt == "Question: What is 2+3?\n\nPlans:\nPlan 1: b<endstep>\n" and pairs[0].depth == 2


def test_minimum_visited_children_is_configurable():
    tree = hand_built_tree()  # root: 3 visited children, a: 3, b: 2
    assert [(p.chosen_id, p.rejected_id) for p in plan_pairs(tree, min_visited_children=2)] == [(1, 2)]
    assert plan_pairs(tree, min_visited_children=3) == []  # b drops out
    assert [r.node_id for r in value_examples(tree, min_visited_children=3)] == [0, 1, 4, 5, 6, 10]
    assert [r.node_id for r in value_examples(tree, min_visited_children=4)] == [4, 5, 6, 10]  # graded terminals
    with pytest.raises(ValueError, match="at least 1"):
        value_examples(tree, min_visited_children=0)


def test_has_search_value():
    tree = hand_built_tree()
    assert [n.id for n in tree.nodes if has_search_value(tree, n)] == [0, 1, 2, 4, 5, 6, 10]
    dead = tree.add_child(tree.nodes[3], kind=StepKind.PLAN, text="Plan 2: g", N=1, V=-1.0, dead_end=True)
    assert has_search_value(tree, dead)
    # an inference-mode solution (no gold answer, so no reward) has only the value model's guess
    guess = tree.add_child(tree.nodes[3], kind=StepKind.SOLUTION, text=sol("7"), N=3, V=0.9)
    assert not has_search_value(tree, guess)


def test_solution_pairs_by_hand():
    pairs = solution_pairs(hand_built_tree())
    assert [(p.parent_id, p.chosen_id, p.rejected_id) for p in pairs] == [(1, 4, 5)]
    assert pairs[0].chosen == "\n" + sol("5") + "<endsolution>"
    assert pairs[0].prompt.endswith("Plans:\nPlan 1: a<endstep>\n")
    assert (pairs[0].chosen_value, pairs[0].rejected_value) == (1.0, -1.0)


def test_no_solution_pair_without_both_signs():
    tree = hand_built_tree()
    for wrong in (5, 10):
        tree.nodes[wrong].V = tree.nodes[wrong].reward = 1.0
    assert solution_pairs(tree) == []


def test_sft_by_hand():
    rows = sft_examples(hand_built_tree())
    assert [r.node_id for r in rows] == [4, 6]
    assert rows[0].prompt == "Question: What is 2+3?\n\nPlans:\n"
    assert rows[0].response == "Plan 1: a<endstep>\n\n" + sol("5") + "<endsolution>"


def test_sft_caps_at_four_and_is_seeded():
    tree = hand_built_tree()
    a = tree.nodes[1]
    for i in range(5):
        tree.add_child(a, kind=StepKind.SOLUTION, text=sol("5", f" {i}"), N=1, V=1.0, reward=1.0, correct=True)
    picks = [r.node_id for r in sft_examples(tree, seed=3)]
    assert len(picks) == 4 and picks == [r.node_id for r in sft_examples(tree, seed=3)]
    assert any([r.node_id for r in sft_examples(tree, seed=s)] != picks for s in range(10))


def test_value_examples_are_states_with_search_values():
    rows = value_examples(hand_built_tree())
    # not 3, 7, 8 (reached once: guesses) nor 9 (never reached); 10 is graded although never visited
    assert [(r.node_id, r.value) for r in rows] == [
        (0, 0.0),
        (1, 0.6),
        (2, -0.4),
        (4, 1.0),
        (5, -1.0),
        (6, 1.0),
        (10, -1.0),
    ]
    assert rows[2].text == "Question: What is 2+3?\n\nPlans:\nPlan 1: b<endstep>\n"


def test_xml_pairs_render_xml_steps():
    tree = hand_built_tree()
    tree.config = tree.config.model_copy(update={"format": PromptFormat.XML})
    pair = plan_pairs(tree)[0]
    assert pair.prompt == "<question>\nWhat is 2+3?\n</question>\n<plan>\n"
    assert pair.chosen == "<step>\nPlan 1: a\n</step>"


def test_export_writes_all_four_files(tmp_path):
    counts = export_datasets([hand_built_tree()], tmp_path)
    assert counts == {"sft": 2, "plan_pairs": 1, "solution_pairs": 1, "value": 7}
    for name, n in counts.items():
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == n and all(json.loads(line)["tree_id"] == "hand" for line in lines)


class RandomValue:
    """A value model that guesses at random, as round 1's untrained value head does."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    async def evaluate(self, states):
        return [ValueResult(value=self.rng.uniform(-1, 1), model_version="random") for _ in states]


def test_scripted_search_with_a_random_value_model_exports_no_guesses():
    mcts = MCTS(ScriptedPolicy(), RandomValue(seed=0), SearchConfig(simulations=40, few_shot=False))
    tree = asyncio.run(mcts.search(mcts.new_tree("scripted", "What is 6*7?", GOLD)))
    guessed = {
        n.id
        for n in tree.nodes
        if n.N > 0 and n.reward is None and not n.dead_end and not any(tree.nodes[c].N for c in n.children)
    }
    assert guessed  # the search does leave first-visit leaves behind
    rows = value_examples(tree)
    pairs = plan_pairs(tree) + solution_pairs(tree)
    assert rows and pairs
    used = {r.node_id for r in rows} | {p.chosen_id for p in pairs} | {p.rejected_id for p in pairs}
    assert not used & guessed
    for node_id in used:
        node = tree.nodes[node_id]
        assert node.reward is not None or any(tree.nodes[c].N > 0 for c in node.children)
