"""Search records built from trees: progress, the best answer, the model versions (shared by worker and API)."""

from __future__ import annotations

from cpl.formats import StepKind
from cpl.pairs import plan_pairs, solution_pairs
from cpl.tree import Node, Tree
from services.search.schemas import BestAnswer, Progress, SearchRecord, TableStats, TreeStats


def best_solution(tree: Tree) -> Node | None:
    """The solution node of highest value (more visits, then the earlier node, break ties)."""
    solutions = [n for n in tree.nodes if n.kind is StepKind.SOLUTION]
    if not solutions:
        return None
    return max(solutions, key=lambda n: (n.V, n.N, -n.id))


def best_answer(tree: Tree) -> BestAnswer | None:
    node = best_solution(tree)
    if node is None:
        return None
    return BestAnswer(
        answer=node.answer,
        value=node.V,
        correct=node.correct,
        node_id=node.id,
        plan=[n.text for n in tree.path(node)[1:]],
    )


def with_tree(record: SearchRecord, tree: Tree, value_versions: set[str]) -> SearchRecord:
    """A copy of ``record`` whose progress, best answer, root value and versions are the tree's."""
    policy_versions = sorted({n.model_version for n in tree.nodes if n.model_version})
    return record.model_copy(
        update={
            "progress": Progress(
                simulations_done=tree.simulations_done,
                simulations_total=tree.config.simulations,
                nodes=len(tree.nodes),
            ),
            "best": best_answer(tree),
            "root_value": tree.root.V if tree.nodes else None,
            "model_versions": record.model_versions.model_copy(
                update={
                    "policy": sorted(set(record.model_versions.policy) | set(policy_versions)),
                    "value": sorted(set(record.model_versions.value) | value_versions),
                }
            ),
        }
    )


def tree_stats(tree: Tree) -> TreeStats:
    """Table 1 counts of one tree; pairs are counted by :mod:`cpl.pairs`, as the exports make them."""
    solutions = [n for n in tree.nodes if n.kind is StepKind.SOLUTION and n.correct is not None]
    correct = [n for n in solutions if n.correct]
    return TreeStats(
        correct_solutions=len(correct),
        incorrect_solutions=len(solutions) - len(correct),
        correct_depth_sum=sum(n.depth for n in correct),
        plan_pairs=len(plan_pairs(tree)),
        solution_pairs=len(solution_pairs(tree)),
    )


def table_stats(records: list[SearchRecord]) -> TableStats:
    """The paper's Table 1 over finished trees: average depth of correct solutions, positive:negative solution
    steps, plan pairs, solution pairs."""
    stats = [r.tree_stats for r in records if r.tree_stats is not None]
    positive = sum(s.correct_solutions for s in stats)
    negative = sum(s.incorrect_solutions for s in stats)
    return TableStats(
        trees=len(stats),
        avg_depth=sum(s.correct_depth_sum for s in stats) / positive if positive else None,
        positive=positive,
        negative=negative,
        pos_neg_ratio=f"1:{negative / positive:.2f}" if positive else None,
        plan_pairs=sum(s.plan_pairs for s in stats),
        solution_pairs=sum(s.solution_pairs for s in stats),
    )
