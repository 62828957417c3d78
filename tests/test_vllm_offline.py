"""In-process vLLM engines (library mode) against transformers references, and the micro-batcher."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time

import pytest

from cpl.engines import MicroBatcher, PromptTooLongError
from cpl.formats import END_SOLUTION, MARKERS, PromptFormat, StepKind, stop_strings
from cpl.protocols import ExpandRequest, PolicyModel, State, ValueModel
from tests.conftest import ENVIRON_AT_START

# --- micro-batcher (no vLLM) ------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, delay: float = 0.0, fail_on: object = None) -> None:
        self.calls: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.calls.append(list(items))
            time.sleep(self.delay)
            if self.fail_on is not None and self.fail_on in items:
                raise RuntimeError("boom")
            return [x * 10 for x in items]
        finally:
            with self._lock:
                self.active -= 1


def test_batcher_merges_concurrent_calls_in_order():
    run = _Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(run)

    async def main():
        return await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(5)), batcher.submit([]))

    results = asyncio.run(main())
    assert results == [[i * 10, (i + 100) * 10] for i in range(5)] + [[]]
    assert len(run.calls) == 1 == batcher.batches
    assert sorted(run.calls[0]) == sorted([*range(5), *range(100, 105)])


def test_batcher_queues_calls_while_a_batch_runs():
    run = _Recorder(delay=0.05)
    batcher: MicroBatcher[int, int] = MicroBatcher(run)

    async def late(i: int):
        await asyncio.sleep(0.01 * i)
        return await batcher.submit([i])

    async def main():
        return await asyncio.gather(*(late(i) for i in range(6)))

    assert asyncio.run(main()) == [[i * 10] for i in range(6)]
    assert run.max_active == 1
    assert 2 <= len(run.calls) < 6  # the first batch runs alone, the rest pile up behind it


def test_batcher_error_reaches_every_caller_of_the_batch_only():
    run = _Recorder(fail_on=3)
    batcher: MicroBatcher[int, int] = MicroBatcher(run)

    async def main():
        first = await asyncio.gather(batcher.submit([1]), batcher.submit([3]), return_exceptions=True)
        second = await batcher.submit([4])
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in first)
    assert second == [40]


def test_batcher_survives_a_cancelled_caller_and_new_loops():
    run = _Recorder(delay=0.02)
    batcher: MicroBatcher[int, int] = MicroBatcher(run)

    async def main():
        task = asyncio.ensure_future(batcher.submit([1]))
        other = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.sleep(0)
        task.cancel()
        return await other

    assert asyncio.run(main()) == [20]
    assert asyncio.run(batcher.submit([5])) == [50]  # a second event loop gets its own queue


def test_batcher_lock_spans_event_loops():
    run = _Recorder(delay=0.05)
    batcher: MicroBatcher[int, int] = MicroBatcher(run)
    out: list[list[int]] = []
    threads = [threading.Thread(target=lambda i=i: out.append(asyncio.run(batcher.submit([i])))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == [[0], [10], [20]]
    assert run.max_active == 1


# --- vLLM ---------------------------------------------------------------------------------------------------

QUESTION = "Ann has 3 apples and buys 4 more. How many apples does Ann have now?"


def _states() -> list[State]:
    return [
        State(question=QUESTION, format=PromptFormat.PLAIN),
        State(question=QUESTION, format=PromptFormat.XML),
        State(
            question=QUESTION,
            steps=[(StepKind.PLAN, "Plan 1: Take the starting number of apples.")],
            format=PromptFormat.PLAIN,
        ),
        State(
            question="What is 6*7?",
            steps=[(StepKind.PLAN, "Plan 1: Multiply."), (StepKind.PLAN, "Plan 2: Check.")],
            format=PromptFormat.XML,
        ),
    ]


@pytest.mark.vllm
def test_engines_satisfy_protocols(vllm_engines):
    policy, value = vllm_engines
    assert isinstance(policy, PolicyModel)
    assert isinstance(value, ValueModel)


@pytest.mark.vllm
def test_starting_the_engines_leaves_this_process_environment_as_it_was(vllm_engines):
    """An engine's start writes settings for its children (LD_PRELOAD, LOCAL_WORLD_SIZE, ...) into os.environ;
    processes started later would inherit them. (What importing vLLM sets, such as KMP_INIT_AT_FORK, stays.)"""
    keys = ("LD_PRELOAD", "LOCAL_WORLD_SIZE", "VLLM_WORKER_MULTIPROC_METHOD")
    assert {k: os.environ.get(k) for k in keys} == {k: ENVIRON_AT_START.get(k) for k in keys}


def test_prompt_tokens_match_transformers(vllm_engines, tiny_models):
    from transformers import AutoTokenizer

    policy, _ = vllm_engines
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[0])
    prompts = [s.policy_prompt() for s in _states()]
    assert policy._tokenize(prompts) == [tokenizer(p).input_ids for p in prompts]


@pytest.mark.vllm
def test_expand_candidates_match_transformers_logprobs(vllm_engines, tiny_models):
    from transformers import AutoTokenizer

    from cpl.models.reference import transformers_step_logprob

    policy, _ = vllm_engines
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[0])
    states = _states()
    requests = [ExpandRequest(state=s, n=3, temperature=0.7, max_tokens=12) for s in states]
    results = asyncio.run(policy.expand(requests))

    assert len(results) == len(requests)
    stopped = 0
    for request, result in zip(requests, results, strict=True):
        assert result.model_version == "tiny-policy"
        assert len(result.candidates) == request.n
        fmt = request.state.format
        prompt = request.prompt()
        for cand in result.candidates:
            assert cand.finish_reason in ("stop", "length")
            assert cand.token_ids and cand.num_tokens == len(cand.token_ids) <= request.max_tokens
            assert all(stop not in cand.text for stop in stop_strings(fmt))
            if cand.finish_reason == "length":
                assert cand.num_tokens == request.max_tokens and cand.stop_reason is None
            if cand.stop_reason is not None:
                stopped += 1
                assert cand.stop_reason in stop_strings(fmt)
                # the step's token ids include the tokens of the stop marker
                assert cand.stop_reason in tokenizer.decode(cand.token_ids, skip_special_tokens=True)
            if cand.stop_reason in (END_SOLUTION, "</solution>"):
                assert cand.kind is StepKind.SOLUTION
            reference = transformers_step_logprob(tiny_models[0], prompt, cand.token_ids)
            assert math.isclose(cand.logprob, reference, abs_tol=1e-3), (cand.logprob, reference)
    assert stopped > 0  # the biased stop markers were sampled and honoured


@pytest.mark.vllm
def test_forced_solution_candidates_are_solution_steps(vllm_engines, tiny_models):
    from cpl.models.reference import transformers_step_logprob

    policy, _ = vllm_engines
    states = _states()[2:]
    requests = [ExpandRequest(state=s, n=2, max_tokens=8, force_solution=True) for s in states]
    results = asyncio.run(policy.expand(requests))
    for request, result in zip(requests, results, strict=True):
        assert len(result.candidates) == 2
        prompt = request.prompt()
        for cand in result.candidates:
            assert cand.kind is StepKind.SOLUTION
            if request.state.format is PromptFormat.PLAIN:
                assert cand.text.startswith("Detailed Implementation:")
            assert all(stop not in cand.text for stop in stop_strings(request.state.format))
            reference = transformers_step_logprob(tiny_models[0], prompt, cand.token_ids)
            assert math.isclose(cand.logprob, reference, abs_tol=1e-3)


@pytest.mark.vllm
def test_concurrent_expand_calls_share_one_generate(vllm_engines):
    policy, value = vllm_engines
    states = _states()

    async def main():
        before_p, before_v = policy.batches, value.batches
        expands = [policy.expand([ExpandRequest(state=s, n=2, max_tokens=4)]) for s in states]
        evals = [value.evaluate([s]) for s in states]
        out = await asyncio.gather(*expands, *evals)
        return out, policy.batches - before_p, value.batches - before_v

    out, policy_batches, value_batches = asyncio.run(main())
    assert policy_batches == 1 and value_batches == 1
    assert [len(r[0].candidates) for r in out[: len(states)]] == [2] * len(states)
    assert all(len(r) == 1 for r in out[len(states) :])


@pytest.mark.vllm
def test_too_long_prompt_fails_only_its_caller(vllm_engines):
    policy, _ = vllm_engines
    long_state = State(question="1 " * 5000)
    short_state = _states()[0]

    async def main():
        return await asyncio.gather(
            policy.expand([ExpandRequest(state=long_state, n=1, max_tokens=4)]),
            policy.expand([ExpandRequest(state=short_state, n=1, max_tokens=4)]),
            return_exceptions=True,
        )

    long_result, short_result = asyncio.run(main())
    assert isinstance(long_result, PromptTooLongError)
    assert len(short_result[0].candidates) == 1


@pytest.mark.vllm
def test_values_match_transformers(vllm_engines, tiny_models):
    from cpl.models import transformers_values

    _, value = vllm_engines
    states = _states()
    results = asyncio.run(value.evaluate(states))
    reference = transformers_values(tiny_models[1], [s.value_prompt() for s in states])
    assert len(results) == len(states)
    for result, ref in zip(results, reference, strict=True):
        assert -1.0 <= result.value <= 1.0
        assert math.isclose(result.value, ref, abs_tol=1e-3), (result.value, ref)
        assert result.model_version == tiny_models[1].name
    logits = asyncio.run(value.logits(states[:1]))
    assert math.isclose(math.tanh(logits[0]), reference[0], abs_tol=1e-3)


@pytest.mark.vllm
def test_seeded_samples_repeat_and_the_n_samples_of_one_seed_differ(vllm_engines):
    policy, _ = vllm_engines
    request = ExpandRequest(state=_states()[0], n=6, temperature=1.0, max_tokens=12, seed=2**62 - 1)

    def samples(result) -> list[tuple[int, ...]]:
        return [tuple(c.token_ids or ()) for c in result.candidates]

    first, same_batch = asyncio.run(policy.expand([request, request]))
    (later,) = asyncio.run(policy.expand([request, ExpandRequest(state=_states()[3], n=2, max_tokens=8)]))[:1]
    (other_seed,) = asyncio.run(policy.expand([request.model_copy(update={"seed": 1})]))
    assert samples(first) == samples(same_batch) == samples(later)  # batched alone, twice, or with others
    assert len(set(samples(first))) > 1  # vLLM gives the i-th sample seed + i, not n copies of one sample
    assert samples(other_seed) != samples(first)


@pytest.mark.vllm
def test_two_seeded_searches_build_the_same_tree(vllm_engines):
    """docs/decisions/005-search-seeds.md: equal seeds, equal trees (in practice), even among other trees."""
    from cpl.config import SearchConfig
    from cpl.mcts import MCTS

    policy, value = vllm_engines
    config = SearchConfig(simulations=16, max_step_tokens=12, max_depth=3, temperature=1.0, few_shot=False, seed=7)
    mcts = MCTS(policy, value, config)

    def shape(tree) -> list[tuple]:
        return [(n.parent, n.kind, n.text, n.N, n.expanded) for n in tree.nodes]

    alone = asyncio.run(mcts.search(mcts.new_tree("t", QUESTION, "7")))
    trees = [mcts.new_tree("o1", "What is 6*7?", "42"), mcts.new_tree("t", QUESTION, "7")]
    _, among_others = asyncio.run(mcts.search_many(trees))
    assert len(alone.nodes) > 4 and shape(among_others) == shape(alone)
    assert [n.V for n in among_others.nodes] == pytest.approx([n.V for n in alone.nodes], abs=1e-4)
    unseeded = MCTS(policy, value, config.model_copy(update={"seed": None}))
    assert shape(asyncio.run(unseeded.search(unseeded.new_tree("t", QUESTION, "7")))) != shape(alone)


def test_markers_cover_stop_strings():
    assert {s for fmt in PromptFormat for s in stop_strings(fmt)} <= set(MARKERS)
