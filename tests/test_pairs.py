import json

from cpl.config import SearchConfig
from cpl.formats import PromptFormat, StepKind
from cpl.pairs import export_datasets, plan_pairs, sft_examples, solution_pairs, value_examples
from cpl.tree import Tree


def sol(answer: str, note: str = "") -> str:
    return f"Detailed Implementation:\n1. Work{note}.\nThe final answer is $\\boxed{{{answer}}}$."


def hand_built_tree() -> Tree:
    """root -> a (+0.6) {sol 5 ok, sol 4 wrong, sol 5' ok}, b (-0.4) {c (+0.2), d (-0.5)}, e (-0.2), f (unvisited)."""
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
    for node in tree.nodes:
        node.Q = node.V
    return tree


def test_plan_pairs_by_hand():
    pairs = plan_pairs(hand_built_tree())
    got = [(p.parent_id, p.chosen_id, p.rejected_id, p.chosen_value, p.rejected_value) for p in pairs]
    assert got == [(0, 1, 2, 0.6, -0.4), (0, 1, 3, 0.6, -0.2), (2, 7, 8, 0.2, -0.5)]
    first = pairs[0]
    assert first.prompt == "Question: What is 2+3?\n\nPlans:\n"
    assert (first.chosen, first.rejected) == ("Plan 1: a<endstep>", "Plan 1: b<endstep>")
    assert first.kind is StepKind.PLAN and first.depth == 1 and first.tree_id == "hand"
    assert pairs[2].prompt == "Question: What is 2+3?\n\nPlans:\nPlan 1: b<endstep>\n" and pairs[2].depth == 2


def test_solution_pairs_by_hand():
    pairs = solution_pairs(hand_built_tree())
    assert [(p.parent_id, p.chosen_id, p.rejected_id) for p in pairs] == [(1, 4, 5)]
    assert pairs[0].chosen == "\n" + sol("5") + "<endsolution>"
    assert pairs[0].prompt.endswith("Plans:\nPlan 1: a<endstep>\n")
    assert (pairs[0].chosen_value, pairs[0].rejected_value) == (1.0, -1.0)


def test_no_solution_pair_without_both_signs():
    tree = hand_built_tree()
    tree.nodes[5].V = tree.nodes[5].reward = 1.0
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


def test_value_examples_are_visited_states():
    rows = value_examples(hand_built_tree())
    assert [(r.node_id, r.value) for r in rows] == [
        (0, 0.0),
        (1, 0.6),
        (2, -0.4),
        (3, -0.2),
        (4, 1.0),
        (5, -1.0),
        (6, 1.0),
        (7, 0.2),
        (8, -0.5),
    ]
    assert rows[7].text == "Question: What is 2+3?\n\nPlans:\nPlan 1: b<endstep>\nPlan 2: c<endstep>\n"


def test_xml_pairs_render_xml_steps():
    tree = hand_built_tree()
    tree.config = tree.config.model_copy(update={"format": PromptFormat.XML})
    pair = plan_pairs(tree)[0]
    assert pair.prompt == "<question>\nWhat is 2+3?\n</question>\n<plan>\n"
    assert pair.chosen == "<step>\nPlan 1: a\n</step>"


def test_export_writes_all_four_files(tmp_path):
    counts = export_datasets([hand_built_tree()], tmp_path)
    assert counts == {"sft": 2, "plan_pairs": 3, "solution_pairs": 1, "value": 9}
    for name, n in counts.items():
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == n and all(json.loads(line)["tree_id"] == "hand" for line in lines)
