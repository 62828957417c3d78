"""From an expand request to vLLM sampling settings, and from vLLM's completions back to candidate steps.

Both vLLM paths use this module: the in-process engine (`cpl.engines.vllm_offline.VLLMPolicy`, which gets
``vllm.CompletionOutput`` objects) and the policy gateway (`services/policy/app.py`, which gets the JSON choices
of vLLM's ``/v1/completions``). Each path only maps its own shape to `Completion`; what the candidates are is
decided here, once:

- Greedy sampling (temperature 0) with ``n > 1``: vLLM refuses ``n > 1`` without randomness and the ``n``
  candidates would all be the same, so one completion is generated and repeated ``n`` times.
- ``max_tokens`` is clipped to the room left in the context (``max_model_len`` minus the prompt's tokens), so a
  long prompt yields shorter steps (``finish_reason="length"``) instead of a failed request. The gateway does
  not tokenise the prompt: it clips to ``max_model_len - 1`` and vLLM's server clips the rest the same way.
- A candidate's ``logprob`` is the sum of the generated tokens' log-probs, in generation order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cpl.formats import parse_generated_step, stop_strings
from cpl.protocols import Candidate, ExpandRequest


class PromptTooLongError(ValueError):
    """A prompt does not leave room for a single generated token within ``max_model_len``."""


@dataclass(frozen=True)
class SamplingPlan:
    """What to ask vLLM for one expand request."""

    n: int
    temperature: float
    max_tokens: int
    stop: list[str]
    seed: int | None = None
    """vLLM's per-request sampling seed (the request's own, :func:`cpl.mcts.expansion_seed`); None: unseeded."""


def sampling_plan(request: ExpandRequest, *, max_model_len: int, prompt_tokens: int | None = None) -> SamplingPlan:
    """The sampling settings of one request (see the module doc for the greedy and context-room rules)."""
    used = 1 if prompt_tokens is None else prompt_tokens
    room = max_model_len - used
    if room < 1:
        raise PromptTooLongError(f"prompt has {prompt_tokens} tokens, max_model_len is {max_model_len}")
    return SamplingPlan(
        n=1 if request.temperature == 0 else request.n,
        temperature=request.temperature,
        max_tokens=min(request.max_tokens, room),
        stop=stop_strings(request.state.format),
        seed=request.seed,
    )


@dataclass(frozen=True)
class Completion:
    """One generated sequence, whichever vLLM path produced it."""

    index: int
    text: str
    token_ids: list[int] | None
    token_logprobs: list[float] | None
    finish_reason: str
    stop_reason: str | None
    cumulative_logprob: float | None = None

    @property
    def logprob(self) -> float:
        """The sum of the generated tokens' (raw) log-probs."""
        if self.token_logprobs is not None:
            return float(sum(self.token_logprobs))
        if self.cumulative_logprob is not None:
            return float(self.cumulative_logprob)
        raise ValueError("the completion carries neither per-token nor cumulative log-probs")


def completion_from_openai_choice(choice: Mapping[str, Any]) -> Completion:
    """A choice of vLLM's ``/v1/completions`` answer (asked with ``logprobs=0`` and ``return_token_ids``)."""
    stop_reason = choice.get("stop_reason")
    token_logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    return Completion(
        index=int(choice["index"]),
        text=choice["text"],
        token_ids=None if choice.get("token_ids") is None else [int(t) for t in choice["token_ids"]],
        token_logprobs=None if token_logprobs is None else [float(lp) for lp in token_logprobs if lp is not None],
        finish_reason=choice.get("finish_reason") or "stop",
        stop_reason=None if stop_reason is None else str(stop_reason),
    )


def completion_from_vllm_output(output: Any) -> Completion:
    """A ``vllm.CompletionOutput`` (from ``LLM.generate`` with ``logprobs=0``).

    A stop token id as the stop reason becomes its decimal string, as in the server's JSON.
    """
    stop_reason = None if output.stop_reason is None else str(output.stop_reason)
    ids = [int(t) for t in output.token_ids]
    token_logprobs = None
    if output.logprobs is not None:
        token_logprobs = [float(entry[tid].logprob) for entry, tid in zip(output.logprobs, ids, strict=True)]
    return Completion(
        index=int(output.index),
        text=output.text,
        token_ids=ids,
        token_logprobs=token_logprobs,
        finish_reason=str(output.finish_reason or "stop"),
        stop_reason=stop_reason,
        cumulative_logprob=output.cumulative_logprob,
    )


def candidates_from_completions(request: ExpandRequest, completions: Sequence[Completion]) -> list[Candidate]:
    """The candidate steps of one request, in vLLM's order; greedy requests get their one completion n times."""
    fmt = request.state.format
    candidates = []
    for completion in sorted(completions, key=lambda c: c.index):
        step = parse_generated_step(completion.text, completion.stop_reason, fmt, forced=request.force_solution)
        ids = completion.token_ids
        candidates.append(
            Candidate(
                kind=step.kind,
                text=step.text,
                num_tokens=len(ids) if ids is not None else len(completion.token_logprobs or []),
                logprob=completion.logprob,
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
                token_ids=ids,
            )
        )
    if request.temperature == 0 and candidates:
        candidates = [candidates[0].model_copy(deep=True) for _ in range(request.n)]
    return candidates
