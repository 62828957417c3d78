"""A scripted environment for MCTS unit tests: a policy and a value model with a known best plan.

At the root the policy offers five first plans; only ``Plan 1: route 2`` leads to a correct answer. Deeper
states offer two further plan steps and one solution step; a solution is correct iff its path starts with
the good first plan. The value model knows nothing (V = 0), so only the search can find the good plan.
"""

from __future__ import annotations

from collections.abc import Sequence

from cpl.formats import StepKind
from cpl.protocols import Candidate, ExpandRequest, ExpandResult, State, ValueResult

GOOD_FIRST_PLAN = "Plan 1: route 2"
GOLD = "42"


def _cand(kind: StepKind, text: str, logprob: float = -2.0, finish: str = "stop") -> Candidate:
    return Candidate(kind=kind, text=text, num_tokens=4, logprob=logprob, finish_reason=finish)


def _solution(answer: str) -> str:
    return f"Detailed Implementation:\n1. Compute it.\nThe final answer is $\\boxed{{{answer}}}$."


class ScriptedPolicy:
    def __init__(self) -> None:
        self.calls: list[ExpandRequest] = []
        self.batch_sizes: list[int] = []

    async def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        self.batch_sizes.append(len(requests))
        self.calls.extend(requests)
        return [ExpandResult(candidates=self._candidates(r), model_version="scripted-1") for r in requests]

    def _candidates(self, request: ExpandRequest) -> list[Candidate]:
        steps = request.state.steps
        good = bool(steps) and steps[0][1] == GOOD_FIRST_PLAN
        answer = GOLD if good else "7"
        if request.force_solution:
            return [_cand(StepKind.SOLUTION, _solution(answer)) for _ in range(request.n)]
        if not steps:
            first = [_cand(StepKind.PLAN, f"Plan 1: route {k}") for k in range(request.n)]
            # A duplicate and a step cut off by the token limit: both must not become children.
            return [
                *first,
                _cand(StepKind.PLAN, "Plan 1: route 0"),
                _cand(StepKind.PLAN, "Plan 1: cut", finish="length"),
            ]
        depth = len(steps)
        return [
            _cand(StepKind.PLAN, f"Plan {depth + 1}: refine a"),
            _cand(StepKind.PLAN, f"Plan {depth + 1}: refine b", logprob=-3.0),
            _cand(StepKind.SOLUTION, _solution(answer), logprob=-1.0),
        ][: request.n]


class ScriptedValue:
    def __init__(self, value: float = 0.0) -> None:
        self.value = value
        self.calls: list[State] = []

    async def evaluate(self, states: Sequence[State]) -> list[ValueResult]:
        self.calls.extend(states)
        return [ValueResult(value=self.value, model_version="scripted-v") for _ in states]


class DeadEndPolicy:
    """Every candidate hits the token limit."""

    async def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        return [
            ExpandResult(
                candidates=[_cand(StepKind.PLAN, "Plan 1: too long", finish="length")] * r.n,
                model_version="scripted-1",
            )
            for r in requests
        ]
