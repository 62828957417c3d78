"""Table 1 statistics and the end-of-search summary, on the hand-built tree of test_pairs."""

from __future__ import annotations

import json

from cpl.pairs import export_datasets
from cpl.search_stats import (
    SearchStats,
    best_path,
    compute_stats,
    format_summary,
    merge_stats,
    summary_of_run,
    tree_stats,
    write_stats,
)
from cpl.tree import Tree
from tests.test_pairs import hand_built_tree


def test_table1_by_hand(tmp_path):
    tree = hand_built_tree()
    counts = export_datasets([tree], tmp_path)
    stats = compute_stats([tree], counts)
    # correct solutions: nodes 4 and 6, both at depth 2; plan steps with search values: a (+0.6), b (-0.4);
    # e, c, d keep value-model guesses and f was never reached, so they are not counted
    assert stats.avg_depth_correct == 2.0
    assert (stats.positive_plan_steps, stats.negative_plan_steps, stats.pos_neg) == (1, 1, "1:1.00")
    assert (stats.plan_pairs, stats.solution_pairs, stats.sft, stats.value) == (1, 1, 2, 7)
    assert (stats.correct_solutions, stats.incorrect_solutions, stats.solved_trees) == (2, 2, 1)
    assert (stats.trees, stats.nodes, stats.simulations) == (1, 11, 0)
    # expanded: the root (a, b, e, f), a (four solutions) and b (c, d)
    assert (stats.root_expansions, stats.root_children, stats.expansions, stats.children) == (1, 4, 2, 6)
    assert (stats.children_per_root_expansion, stats.children_per_expansion) == (4.0, 3.0)


def test_no_correct_solution_has_no_depth():
    tree = Tree.new("empty", "Q?", "1", hand_built_tree().config)
    stats = compute_stats([tree], {})
    assert stats.avg_depth_correct is None and stats.pos_neg == "n/a" and stats.plan_pairs == 0


def test_stats_file_and_summary(tmp_path):
    tree = hand_built_tree()
    (tmp_path / "trees").mkdir()
    (tmp_path / "trees" / "hand.json").write_text(tree.model_dump_json())
    stats = compute_stats([tree], export_datasets([tree], tmp_path))
    path = write_stats(tmp_path, stats)
    assert SearchStats.model_validate(json.loads(path.read_text())) == stats

    assert [n.id for n in best_path(tree)] == [1, 4]  # most visited plan, then its most visited solution
    summary = summary_of_run(tmp_path)
    assert summary == format_summary([tree], stats, tmp_path)
    lines = summary.splitlines()
    assert lines[0] == "hand: What is 2+3?"
    assert lines[1].startswith("  plan N=5 V=+0.60  Plan 1: a")
    assert lines[2].startswith("  solution N=2 V=+1.00  Detailed Implementation: / 1. Work.")
    assert lines[3] == "  -> answer 5 (correct, gold 5)"
    assert "avg depth of correct solutions  2.00" in summary
    assert "plan pairs / solution pairs     1 / 1" in summary
    assert str(tmp_path / "stats.json") in summary


def test_per_tree_stats_merge_to_the_stats_of_all_trees(tmp_path):
    """What the search service does (one Table 1 per finished tree, merged per batch) equals library mode's."""
    hand = hand_built_tree()
    other = hand.model_copy(deep=True, update={"id": "other"})
    for node in other.nodes:  # a second tree with other values: one correct solution less, depths differ
        if node.correct:
            node.correct, node.V, node.reward = False, -1.0, -1.0
            break
    empty = Tree.new("empty", "Q?", "1", hand.config)
    trees = [hand, other, empty]
    expected = compute_stats(trees, export_datasets(trees, tmp_path))
    assert merge_stats([tree_stats(t) for t in trees]) == expected
    assert merge_stats([tree_stats(hand)]) == tree_stats(hand)
    assert expected.correct_solutions == 3 and expected.trees == 3
    assert merge_stats([]) == compute_stats([], {})
