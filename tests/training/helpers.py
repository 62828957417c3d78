"""Small datasets for the trainer tests."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from cpl.formats import PromptFormat, Step, StepKind, plan_text, render_prompt, render_response, render_step
from cpl.formats import solution_text as _solution_text
from cpl.models.tiny import _arithmetic_example
from cpl.protocols import State


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def problems(n: int, seed: int) -> list[tuple[str, list[Step], list[str], str]]:
    rng = random.Random(seed)
    return [_arithmetic_example(rng) for _ in range(n)]


def sft_rows(n: int, seed: int = 0, fmt: PromptFormat = PromptFormat.PLAIN) -> list[dict]:
    rows = []
    for question, plans, impl, answer in problems(n, seed):
        steps = [*plans, Step(StepKind.SOLUTION, _solution_text(impl, answer, fmt))]
        rows.append(
            {"prompt": render_prompt(question, [], fmt, few_shot=False), "response": render_response(steps, fmt)}
        )
    return rows


WRONG_PLANS = ["Guess a number.", "Ignore the question.", "Write the answer as zero.", "Count the letters."]


def pair_rows(n: int, seed: int, chosen_value: float, rejected_value: float, kind: str = "plan") -> list[dict]:
    """Distinct plan-step pairs: the problem's first plan step beats an unhelpful one."""
    fmt = PromptFormat.PLAIN
    rows = []
    for i, (question, plans, impl, answer) in enumerate(problems(n, seed)):
        if kind == "plan":
            prompt = render_prompt(question, [], fmt, few_shot=False)
            chosen = render_step(plans[0], fmt)
            rejected = render_step(Step(StepKind.PLAN, plan_text(1, WRONG_PLANS[i % len(WRONG_PLANS)])), fmt)
        else:
            prompt = render_prompt(question, plans, fmt, few_shot=False)
            chosen = render_step(Step(StepKind.SOLUTION, _solution_text(impl, answer, fmt)), fmt)
            rejected = render_step(Step(StepKind.SOLUTION, _solution_text(impl, str(int(answer) + 7), fmt)), fmt)
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_value": chosen_value,
                "rejected_value": rejected_value,
                "kind": kind,
            }
        )
    return rows


def states(n: int, seed: int) -> list[tuple[str, float]]:
    """Plain-format states are worth +0.6, XML-format ones -0.6 (a feature the model can pick up)."""
    out = []
    for i, (question, plans, _, _) in enumerate(problems(n, seed)):
        fmt = PromptFormat.PLAIN if i % 2 == 0 else PromptFormat.XML
        steps = [(s.kind, s.text) for s in plans[: i % 3]]
        text = State(question=question, steps=steps, format=fmt).value_prompt()
        out.append((text, 0.6 if fmt is PromptFormat.PLAIN else -0.6))
    return out
