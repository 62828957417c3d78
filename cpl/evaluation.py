"""Accuracy on GSM8K/MATH-format problems, graded by `cpl.grading`; zero-shot by default, as the paper reports
in-domain accuracy (§4.2).

The model writes a whole response (plan steps and the solution) greedily from the zero-step prompt; its last
``\\boxed{}`` is compared with the gold answer. Generation is pluggable (`Generate`): in-process vLLM from a model
directory (`offline_generator`), or, in the service layer, any OpenAI-compatible ``/v1/completions`` endpoint such
as the policy service (`services.policy.evaluation.http_generator`; `cpl/` itself speaks no HTTP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from pydantic import BaseModel, Field

from cpl.formats import END_SOLUTION, XML_SOLUTION_CLOSE, PromptFormat, render_prompt
from cpl.grading import extract_answer, is_equivalent
from cpl.problems import Problem

Generate = Callable[[Sequence[str], int], list[str]]
"""(prompts, max_tokens) -> one greedy completion per prompt."""


class EvalItem(BaseModel):
    id: str
    gold: str | None
    predicted: str | None
    correct: bool
    response: str


class EvalReport(BaseModel):
    total: int
    correct: int
    accuracy: float = Field(description="correct / total")
    format: PromptFormat
    items: list[EvalItem]


def response_stop(fmt: PromptFormat) -> list[str]:
    """A whole response ends with the solution's marker (plan-step markers must not stop it)."""
    return [END_SOLUTION] if fmt is PromptFormat.PLAIN else [XML_SOLUTION_CLOSE]


def evaluate(
    problems: Sequence[Problem],
    generate: Generate,
    *,
    fmt: PromptFormat = PromptFormat.PLAIN,
    few_shot: bool = False,
    max_tokens: int = 512,
) -> EvalReport:
    if not problems:
        raise ValueError("no problems to evaluate")
    prompts = [render_prompt(p.question, [], fmt, few_shot=few_shot) for p in problems]
    responses = generate(prompts, max_tokens)
    items = []
    for problem, response in zip(problems, responses, strict=True):
        predicted = extract_answer(response)
        correct = problem.gold is not None and is_equivalent(predicted, problem.gold)
        items.append(
            EvalItem(id=problem.id, gold=problem.gold, predicted=predicted, correct=correct, response=response)
        )
    correct = sum(i.correct for i in items)
    return EvalReport(total=len(items), correct=correct, accuracy=correct / len(items), format=fmt, items=items)


@contextmanager
def offline_generator(
    model_dir: str, fmt: PromptFormat, *, dtype: str = "auto", max_model_len: int | None = None
) -> Iterator[Generate]:
    """Greedy generation on an in-process vLLM engine, shut down on exit (vLLM starts processes with spawn)."""
    from vllm import LLM, SamplingParams

    from cpl.engines.vllm_offline import environ_kept, llm_kwargs, shutdown_llm

    kwargs = llm_kwargs(
        max_model_len=max_model_len,
        seed=0,
        dtype=dtype,
        enforce_eager=None,
        gpu_memory_utilization=None,
        kv_cache_memory_bytes=None,
        extra=None,
    )
    with environ_kept():
        llm = LLM(model=model_dir, **kwargs)

    def generate(prompts: Sequence[str], max_tokens: int) -> list[str]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=response_stop(fmt))
        outputs = llm.generate(list(prompts), params, use_tqdm=True)
        return [o.outputs[0].text for o in outputs]

    try:
        yield generate
    finally:
        shutdown_llm(llm)
