"""One translation from a vLLM completion to candidates, for the in-process engine and the policy gateway.

tests/data/completions/recorded.json holds one prompt's completions recorded from both vLLM paths on the
embedded planner (tests/data/completions/record.py): a greedy request with n = 3, and a step cut at the context
limit. Each is fed through the offline engine's translation and the gateway's, which must agree exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cpl.completions import PromptTooLongError, sampling_plan
from cpl.engines.vllm_offline import candidates_from_output
from cpl.protocols import ExpandRequest, State
from services.policy.app import candidates_from_completion, completion_payload

RECORDED = json.loads((Path(__file__).parent / "data" / "completions" / "recorded.json").read_text())
CASES = RECORDED["cases"]
MAX_MODEL_LEN = RECORDED["max_model_len"]


def vllm_output(recorded: dict) -> SimpleNamespace:
    """The ``vllm.RequestOutput`` of a recording, rebuilt from vLLM's own output classes."""
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput

    outputs = [
        CompletionOutput(
            index=o["index"],
            text=o["text"],
            token_ids=o["token_ids"],
            cumulative_logprob=o["cumulative_logprob"],
            logprobs=[{int(t): Logprob(logprob=lp) for t, lp in entry.items()} for entry in o["logprobs"]],
            finish_reason=o["finish_reason"],
            stop_reason=o["stop_reason"],
        )
        for o in recorded["outputs"]
    ]
    return SimpleNamespace(outputs=outputs)


def both_paths(name: str):
    case = CASES[name]
    request = ExpandRequest.model_validate(case["request"])
    offline = candidates_from_output(request, vllm_output(case["offline"]))
    gateway = candidates_from_completion(request, case["server"]["response"])
    return request, offline, gateway


def test_greedy_n3_gives_three_identical_candidates_on_both_paths():
    request, offline, gateway = both_paths("greedy")
    assert request.temperature == 0 and request.n == 3
    assert offline == gateway
    assert len(offline) == 3 and offline[0] == offline[1] == offline[2]
    assert offline[0].finish_reason == "stop" and offline[0].stop_reason == "<endstep>"
    assert offline[0].text.startswith("Plan 1:") and offline[0].num_tokens == len(offline[0].token_ids) == 18
    # One completion is asked for, on both paths (vLLM refuses n > 1 without sampling).
    assert completion_payload(request, "planner", MAX_MODEL_LEN)["n"] == 1
    assert sampling_plan(request, max_model_len=MAX_MODEL_LEN, prompt_tokens=48).n == 1


def test_step_cut_at_the_context_limit_is_the_same_on_both_paths():
    request, offline, gateway = both_paths("context_limit")
    assert offline == gateway
    (cand,) = offline
    room = MAX_MODEL_LEN - CASES["context_limit"]["offline"]["prompt_tokens"]
    assert cand.finish_reason == "length" and cand.num_tokens == room < request.max_tokens
    # The offline engine clips max_tokens to the room left; the gateway sends at most max_model_len - 1 and the
    # server clips the rest the same way (the recorded server answer is exactly `room` tokens long).
    plan = sampling_plan(request, max_model_len=MAX_MODEL_LEN, prompt_tokens=MAX_MODEL_LEN - room)
    assert plan.max_tokens == room
    payload = completion_payload(request, "planner", MAX_MODEL_LEN)
    assert payload == CASES["context_limit"]["server"]["payload"]
    assert payload["max_tokens"] == min(request.max_tokens, MAX_MODEL_LEN - 1)


def test_logprob_is_the_sum_of_the_token_logprobs():
    _, offline, _ = both_paths("context_limit")
    tokens = CASES["context_limit"]["server"]["response"]["choices"][0]["logprobs"]["token_logprobs"]
    assert offline[0].logprob == sum(tokens)


def test_a_prompt_that_fills_the_context_is_refused():
    request = ExpandRequest(state=State(question="q"), n=2, max_tokens=10)
    with pytest.raises(PromptTooLongError, match="100 tokens"):
        sampling_plan(request, max_model_len=100, prompt_tokens=100)
    plan = sampling_plan(request, max_model_len=100, prompt_tokens=95)
    assert (plan.n, plan.max_tokens) == (2, 5)
