import asyncio
import hashlib
import json
import math
import random
from collections import Counter

import pytest

from cpl.config import PriorMode, SearchConfig
from cpl.formats import PromptFormat, StepKind
from cpl.mcts import DEAD_END_VALUE, MCTS, SearchCancelled, backup, expansion_seed, priors, puct_score
from cpl.protocols import Candidate, ExpandRequest, State
from cpl.tree import Node, Tree
from tests.scripted import GOLD, GOOD_FIRST_PLAN, DeadEndPolicy, ScriptedPolicy, ScriptedValue


def run(coro):
    return asyncio.run(coro)


def search(simulations: int = 120, **config) -> tuple[Tree, ScriptedPolicy]:
    policy = ScriptedPolicy()
    mcts = MCTS(policy, ScriptedValue(), SearchConfig(simulations=simulations, **config))
    tree = run(mcts.search(mcts.new_tree("t1", "What is the answer?", GOLD)))
    return tree, policy


def assert_invariants(tree: Tree, leaf_value: float = 0.0) -> None:
    assert tree.simulations_done == tree.root.N
    for node in tree.nodes:
        children = tree.children(node)
        visited = [c for c in children if c.N > 0]
        if node.terminal:
            assert not children
        if node.kind is StepKind.SOLUTION and tree.gold is not None:
            assert node.reward in (1.0, -1.0)
            assert node.reward == node.V
        if node.expanded and node.parent is not None and not node.dead_end:
            assert 1 + sum(c.N for c in children) == node.N  # the visit that expanded it, then its children's
        if visited:
            expected = sum(c.N * c.Q for c in visited) / sum(c.N for c in visited)
            assert math.isclose(node.V, expected, abs_tol=1e-12)  # eq. 3
        for child in children:
            # eq. 2, Q(s,a) = r + V(s'), computed here from what the child's value is made of, not from child.V
            grandchildren = [g for g in tree.children(child) if g.N > 0]
            if child.reward is not None:
                expected_q = child.reward
            elif child.dead_end:
                expected_q = DEAD_END_VALUE
            elif grandchildren:
                expected_q = sum(g.N * g.Q for g in grandchildren) / sum(g.N for g in grandchildren)
            else:
                expected_q = leaf_value  # never expanded below: the value model's initial value
            assert math.isclose(child.Q, expected_q, abs_tol=1e-12)
        assert node.depth <= tree.config.max_depth
        if node.depth == tree.config.max_depth:
            assert node.kind is StepKind.SOLUTION
        if children:
            assert math.isclose(sum(c.prior for c in children), 1.0)


def test_finds_the_best_first_plan():
    tree, _ = search(simulations=150)
    root_children = tree.children(tree.root)
    best = max(root_children, key=lambda c: c.N)
    assert best.text == GOOD_FIRST_PLAN
    assert best.V > 0
    assert all(c.V <= 0 for c in root_children if c.text != GOOD_FIRST_PLAN)
    assert_invariants(tree)


def test_invariants_hold_at_every_simulation_count():
    for sims in (1, 2, 3, 7, 40):
        tree, _ = search(simulations=sims)
        assert tree.simulations_done == sims
        assert_invariants(tree)


def test_expansion_widths_merging_and_dropping():
    tree, policy = search(simulations=30)
    root_children = tree.children(tree.root)
    texts = [c.text for c in root_children]
    assert len(texts) == len(set(texts)) == 5  # duplicate merged, truncated candidate dropped
    assert "Plan 1: cut" not in texts
    assert policy.calls[0].n == 5 and policy.calls[0].temperature == 0.7
    first_asks = {}  # each node's first request asks for the paper's count; later ones for the missing steps
    for r in policy.calls[1:]:
        first_asks.setdefault(str(r.state.steps), r.n)
    assert set(first_asks.values()) == {3}
    assert all(r.force_solution == (len(r.state.steps) >= 5) for r in policy.calls)


def test_depth_limit_forces_solution_steps():
    tree, _ = search(simulations=200, max_depth=3, c_puct=50.0)
    depths = Counter(n.depth for n in tree.nodes)
    assert max(depths) == 3
    assert all(n.kind is StepKind.SOLUTION for n in tree.nodes if n.depth == 3)
    assert_invariants(tree)


def test_terminal_rewards_are_plus_minus_one_and_graded():
    tree, _ = search(simulations=60)
    terminals = [n for n in tree.nodes if n.kind is StepKind.SOLUTION]
    assert terminals
    for node in terminals:
        assert node.answer in (GOLD, "7")
        assert node.correct == (node.answer == GOLD)
        assert node.reward == (1.0 if node.correct else -1.0)


def test_inference_mode_scores_terminals_with_the_value_model():
    mcts = MCTS(ScriptedPolicy(), ScriptedValue(0.25), SearchConfig(simulations=40))
    tree = run(mcts.search(mcts.new_tree("t", "q", gold=None)))
    terminals = [n for n in tree.nodes if n.kind is StepKind.SOLUTION]
    assert terminals and all(n.reward is None and n.correct is None for n in terminals)
    assert all(n.V == 0.25 for n in terminals)


def test_dead_end_leaf_gets_minus_one():
    mcts = MCTS(DeadEndPolicy(), ScriptedValue(0.5), SearchConfig(simulations=3))
    tree = run(mcts.search(mcts.new_tree("t", "q", GOLD)))
    assert tree.root.dead_end and tree.root.V == -1.0 and tree.root.N == 3
    assert len(tree.nodes) == 1


def test_backup_transcribes_eqs_2_to_4():
    tree = Tree.new("h", "q", "1", SearchConfig())
    root = tree.root
    root.expanded = True
    a = tree.add_child(root, kind=StepKind.PLAN, text="a", V=0.5, N=2)
    b = tree.add_child(root, kind=StepKind.PLAN, text="b", V=-1.0, N=1)
    c = tree.add_child(root, kind=StepKind.PLAN, text="c", V=0.9)  # unvisited: no weight
    a.Q, b.Q, c.Q = a.V, b.V, c.V
    root.N = 3
    backup(tree, b)
    assert b.N == 2 and root.N == 4
    assert math.isclose(root.V, (2 * 0.5 + 2 * -1.0) / 4)


def test_puct_and_priors():
    node = Node(id=1, parent=0, depth=1, Q=0.2, prior=0.5, N=3)
    assert math.isclose(puct_score(node, 16, 1.5), 0.2 + 1.5 * 0.5 * 4 / 4)
    cands = [
        Candidate(kind=StepKind.PLAN, text="x", num_tokens=2, logprob=-2.0, finish_reason="stop"),
        Candidate(kind=StepKind.PLAN, text="y", num_tokens=4, logprob=-2.0, finish_reason="stop"),
    ]
    mean = priors(cands, PriorMode.MEAN_LOGPROB)
    assert math.isclose(mean[0] / mean[1], math.exp(-1.0) / math.exp(-0.5))
    assert priors(cands, PriorMode.SUM_LOGPROB) == [0.5, 0.5]
    assert priors(cands, PriorMode.UNIFORM) == [0.5, 0.5]


def test_snapshot_round_trip_and_resume_equals_uninterrupted():
    full, _ = search(simulations=50)
    mcts = MCTS(ScriptedPolicy(), ScriptedValue(), SearchConfig(simulations=20))
    partial = run(mcts.search(mcts.new_tree("t1", "What is the answer?", GOLD)))
    snapshot = partial.model_dump_json()
    restored = Tree.model_validate_json(snapshot)
    assert restored == partial
    restored.config = restored.config.model_copy(update={"simulations": 50})
    resumed = run(MCTS(ScriptedPolicy(), ScriptedValue()).search(restored))
    assert resumed.model_dump(exclude={"created_at", "config"}) == full.model_dump(exclude={"created_at", "config"})


def test_cancel_between_simulations_keeps_work():
    done = []

    def progress(tree: Tree) -> None:
        done.append(tree.simulations_done)

    mcts = MCTS(ScriptedPolicy(), ScriptedValue(), SearchConfig(simulations=100))
    tree = mcts.new_tree("t", "q", GOLD)
    with pytest.raises(SearchCancelled) as info:
        run(mcts.search(tree, on_progress=progress, should_cancel=lambda: len(done) >= 7))
    assert info.value.tree.simulations_done == 7 == tree.root.N
    assert done == list(range(1, 8))


def test_many_trees_batch_together():
    class CountingPolicy(ScriptedPolicy):
        in_flight = 0
        peak = 0

        async def expand(self, requests):
            CountingPolicy.in_flight += 1
            CountingPolicy.peak = max(CountingPolicy.peak, CountingPolicy.in_flight)
            await asyncio.sleep(0.001)
            try:
                return await super().expand(requests)
            finally:
                CountingPolicy.in_flight -= 1

    mcts = MCTS(CountingPolicy(), ScriptedValue(), SearchConfig(simulations=10))
    trees = [mcts.new_tree(f"t{i}", "q", GOLD) for i in range(8)]
    out = run(mcts.search_many(trees, max_concurrent=8))
    assert [t.simulations_done for t in out] == [10] * 8
    assert CountingPolicy.peak == 8  # all eight trees waited on the policy at the same time


class SamplingPolicy:
    """Samples each step from a small vocabulary (seeded): duplicates are frequent, as with a small planner."""

    def __init__(self, vocabulary: int, seed: int = 0) -> None:
        import random

        self.rng = random.Random(seed)
        self.vocabulary = vocabulary
        self.calls = []

    async def expand(self, requests):
        from cpl.protocols import ExpandResult

        self.calls.extend(requests)
        results = []
        for r in requests:
            depth = len(r.state.steps) + 1
            texts = [f"Plan {depth}: option {self.rng.randrange(self.vocabulary)}" for _ in range(r.n)]
            cands = [
                Candidate(kind=StepKind.PLAN, text=t, num_tokens=3, logprob=-1.0, finish_reason="stop") for t in texts
            ]
            results.append(ExpandResult(candidates=cands, model_version="sampling-1"))
        return results


def _expand_root(policy, **config) -> Tree:
    from tests.scripted import ScriptedValue

    mcts = MCTS(policy, ScriptedValue(), SearchConfig(**config))
    tree = mcts.new_tree("t", "Q?", GOLD)
    run(mcts.expand(tree, tree.root))
    return tree


@pytest.mark.parametrize("vocabulary", [1, 2, 3, 4, 8, 50])
@pytest.mark.parametrize("budget", [1.0, 1.5, 2.0, 4.0])
def test_sampling_until_distinct_never_keeps_duplicates_nor_exceeds_its_draws(vocabulary, budget):
    for seed in range(20):
        policy = SamplingPolicy(vocabulary, seed)
        tree = _expand_root(policy, root_children=5, draw_budget=budget)
        texts = [c.text for c in tree.children(tree.root)]
        assert len(texts) == len(set(texts)) <= 5
        drawn = sum(r.n for r in policy.calls)
        assert drawn <= math.floor(5 * budget), (drawn, budget)
        assert policy.calls[0].n == 5
        if budget == 1.0:
            assert len(policy.calls) == 1  # one round of samples, as the paper
        # it stops early only for a reason: all five, the budget spent, or a round that brought nothing new
        if len(texts) < 5 and drawn < math.floor(5 * budget):
            last = policy.calls[-1]
            assert len(policy.calls) > 1 or vocabulary == 1, "a short first round is followed by another"
            assert last.n == 5 - len(texts) or len(policy.calls) == 1


def test_sampling_again_finds_the_missing_distinct_steps():
    counts = {1.0: [], 2.0: []}
    for seed in range(30):
        for budget in counts:
            tree = _expand_root(SamplingPolicy(6, seed), root_children=5, draw_budget=budget)
            counts[budget].append(len(tree.children(tree.root)))
    # with 6 equally likely steps five samples give ~4 distinct; more draws give more, never fewer
    assert sum(counts[2.0]) > sum(counts[1.0])
    assert all(b >= a for a, b in zip(counts[1.0], counts[2.0], strict=True))


# --- search seeds (docs/decisions/005-search-seeds.md) ---------------------------------------------------------


def test_expansion_seed_is_stable_fits_62_bits_and_depends_on_seed_and_state():
    root = State(question="What is 6*7?")
    plan = State(question="What is 6*7?", steps=[(StepKind.PLAN, "Plan 1: Multiply.")])
    # Pinned: the derivation decides every seeded tree, so changing it changes what a seed reproduces.
    assert expansion_seed(0, root) == 540678771858500152
    canonical = json.dumps([0, "What is 6*7?", [["plan", "Plan 1: Multiply."]]], separators=(",", ":"))
    assert expansion_seed(0, plan) == int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big") >> 2
    # The same node, however it was built (a JSON round trip, another format), gets the same seed.
    assert expansion_seed(5, State.model_validate_json(plan.model_dump_json())) == expansion_seed(5, plan)
    assert expansion_seed(5, plan.model_copy(update={"format": PromptFormat.XML})) == expansion_seed(5, plan)
    states = [
        root,
        plan,
        State(question="What is 6*7?", steps=[(StepKind.SOLUTION, "Plan 1: Multiply.")]),  # the kind counts
        State(question="What is 6*7?", steps=[(StepKind.PLAN, "Plan 1: Multiply"), (StepKind.PLAN, ".")]),
        State(question="What is 6*7 ?"),
    ]
    seeds = {
        (search_seed, i): expansion_seed(search_seed, s)
        for search_seed in (0, 1, 2**63 - 1)
        for i, s in enumerate(states)
    }
    assert len(set(seeds.values())) == len(seeds)
    for value in seeds.values():
        assert 0 <= value < 2**62
        ExpandRequest(state=root, n=64, seed=value)  # vLLM's n samples use value .. value + 63: int64 still


def test_expansion_requests_carry_the_node_seed_only_when_the_search_is_seeded():
    tree, policy = search(simulations=40, seed=7, max_depth=3)  # forced solutions are duplicates: sampled again
    by_node: dict[str, list[ExpandRequest]] = {}
    for r in policy.calls:
        by_node.setdefault(str(r.state.steps), []).append(r)
    assert len(by_node) == sum(n.expanded for n in tree.nodes)
    assert any(len(calls) > 1 for calls in by_node.values()), "some expansions sampled again (duplicates)"
    for calls in by_node.values():
        # the node's seed, then for each further round the seed that continues its stream of samples
        drawn = 0
        for r in calls:
            assert r.seed == expansion_seed(7, r.state) + drawn
            drawn += r.n
    _, unseeded = search(simulations=40)
    assert unseeded.calls and all(r.seed is None for r in unseeded.calls)
    with pytest.raises(ValueError, match="seed"):
        SearchConfig(seed=-1)


class SeedSampledPolicy(ScriptedPolicy):
    """Samples its candidates from the request's seed alone (as seeded vLLM does): plans and answers vary."""

    async def expand(self, requests):
        await asyncio.sleep(random.random() / 1000)  # expansions of concurrent trees interleave differently
        return await super().expand(requests)

    def _candidates(self, request):
        rng = random.Random(request.seed)  # None: unseeded, a different tree every time
        if request.force_solution or len(request.state.steps) >= 2:
            return [
                Candidate(
                    kind=StepKind.SOLUTION,
                    text=f"$\\boxed{{{rng.choice([GOLD, '7'])}}}$",
                    num_tokens=4,
                    logprob=-1.0,
                    finish_reason="stop",
                )
                for _ in range(request.n)
            ]
        return [
            Candidate(
                kind=StepKind.PLAN,
                text=f"Plan {len(request.state.steps) + 1}: {rng.randrange(4)}",
                num_tokens=4,
                logprob=-rng.random() * 3,
                finish_reason="stop",
            )
            for _ in range(request.n)
        ]


def test_a_seeded_search_is_the_same_alone_among_other_trees_and_resumed():
    config = SearchConfig(simulations=30, seed=3)

    def shape(tree: Tree) -> list:
        return [(n.parent, n.kind, n.text, n.N, n.V) for n in tree.nodes]

    alone = run(MCTS(SeedSampledPolicy(), ScriptedValue(), config).search(Tree.new("a", "Q?", GOLD, config)))
    mcts = MCTS(SeedSampledPolicy(), ScriptedValue(), config)
    others = [Tree.new(f"o{i}", f"Other {i}?", GOLD, config) for i in range(5)]
    batched = run(mcts.search_many([*others[:3], Tree.new("a", "Q?", GOLD, config), *others[3:]]))[3]
    assert shape(batched) == shape(alone)
    partial = run(mcts.search(Tree.new("a", "Q?", GOLD, config.model_copy(update={"simulations": 11}))))
    restored = Tree.model_validate_json(partial.model_dump_json())
    restored.config = config
    assert shape(run(mcts.search(restored))) == shape(alone)
    other_seed = config.model_copy(update={"seed": 4})
    assert shape(run(mcts.search(Tree.new("a", "Q?", GOLD, other_seed)))) != shape(alone)
