"""Search records built from trees: progress, the best answer, the model versions (shared by worker and API)."""

from __future__ import annotations

from cpl.formats import StepKind
from cpl.search_stats import SearchStats, merge_stats
from cpl.tree import Node, Tree
from services.search.schemas import BestAnswer, Progress, SearchRecord


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


def table_stats(records: list[SearchRecord]) -> SearchStats:
    """The paper's Table 1 over the finished trees of ``records``: each record keeps its tree's
    (:func:`cpl.search_stats.tree_stats`), merged exactly as library mode computes it over the same trees."""
    return merge_stats([r.tree_stats for r in records if r.tree_stats is not None])
