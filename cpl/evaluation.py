"""Zero-shot accuracy on GSM8K/MATH-format problems, graded by `cpl.grading`.

The model writes a whole response (plan steps and the solution) greedily from the zero-step prompt; its last
``\\boxed{}`` is compared with the gold answer. Generation is pluggable: in-process vLLM from a model directory
(`generate_offline`) or any OpenAI-compatible ``/v1/completions`` endpoint, such as the policy service
(`generate_http`).
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
    few_shot: bool = True,
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

    from cpl.engines.vllm_offline import build_engine_kwargs, shutdown_llm

    kwargs = build_engine_kwargs(
        max_model_len=max_model_len,
        seed=0,
        dtype=dtype,
        enforce_eager=None,
        gpu_memory_utilization=None,
        kv_cache_memory_bytes=None,
        extra=None,
    )
    llm = LLM(model=model_dir, **kwargs)

    def generate(prompts: Sequence[str], max_tokens: int) -> list[str]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=response_stop(fmt))
        outputs = llm.generate(list(prompts), params, use_tqdm=True)
        return [o.outputs[0].text for o in outputs]

    try:
        yield generate
    finally:
        shutdown_llm(llm)


def http_generator(base_url: str, fmt: PromptFormat, *, timeout_s: float = 300.0, batch: int = 32) -> Generate:
    """Greedy generation through an OpenAI-compatible ``/v1/completions`` endpoint (e.g. the policy service)."""
    import httpx

    def generate(prompts: Sequence[str], max_tokens: int) -> list[str]:
        url = base_url.rstrip("/")
        with httpx.Client(timeout=timeout_s) as client:
            models = client.get(f"{url}/v1/models")
            models.raise_for_status()
            model = models.json()["data"][0]["id"]
            texts: list[str] = []
            for start in range(0, len(prompts), batch):
                chunk = list(prompts[start : start + batch])
                body = {
                    "model": model,
                    "prompt": chunk,
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "stop": response_stop(fmt),
                }
                reply = client.post(f"{url}/v1/completions", json=body)
                reply.raise_for_status()
                choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
                texts += [c["text"] for c in choices]
        return texts

    return generate
