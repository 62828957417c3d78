"""The two models the search talks to, as async protocols.

The same MCTS engine runs against in-process vLLM (`cpl.engines`), the HTTP services (`services.*.client`) or
a scripted environment in tests. Requests are batched: one call carries every state a search step needs, so
implementations can send them to the engine together (siblings share their prompt, which prefix caching
rewards).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field

from cpl.formats import PromptFormat, Step, StepKind, render_prompt


class State(BaseModel):
    """A node's state: the question and the steps taken so far."""

    question: str
    steps: list[tuple[StepKind, str]] = Field(default_factory=list)
    format: PromptFormat = PromptFormat.PLAIN

    def as_steps(self) -> list[Step]:
        return [Step(kind, text) for kind, text in self.steps]

    def policy_prompt(self, *, force_solution: bool = False, few_shot: bool = True) -> str:
        return render_prompt(
            self.question, self.as_steps(), self.format, few_shot=few_shot, force_solution=force_solution
        )

    def value_prompt(self) -> str:
        """The text the value model scores: the state without the few-shot demonstrations."""
        return render_prompt(self.question, self.as_steps(), self.format, few_shot=False)


class ExpandRequest(BaseModel):
    state: State
    n: int = Field(ge=1, le=64)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    max_tokens: int = Field(default=256, ge=1)
    force_solution: bool = False
    few_shot: bool = True
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 64,  # vLLM seeds the i-th of the n samples with seed + i, a signed 64-bit integer
        description="sampling seed of this request (cpl.mcts.expansion_seed); None: unseeded sampling",
    )

    def prompt(self) -> str:
        return self.state.policy_prompt(force_solution=self.force_solution, few_shot=self.few_shot)


class Candidate(BaseModel):
    """One sampled next step."""

    kind: StepKind
    text: str
    num_tokens: int
    logprob: float = Field(description="sum of the step's token log-probs under the policy (untempered)")
    finish_reason: str = Field(description="'stop' (a stop marker or EOS ended it) or 'length'")
    stop_reason: str | None = None
    token_ids: list[int] | None = None


class ExpandResult(BaseModel):
    candidates: list[Candidate]
    model_version: str


@runtime_checkable
class PolicyModel(Protocol):
    async def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        """Sample ``n`` candidate next steps for each state."""
        ...


class ValueResult(BaseModel):
    value: float = Field(ge=-1.0, le=1.0)
    model_version: str


@runtime_checkable
class ValueModel(Protocol):
    async def evaluate(self, states: Sequence[State]) -> list[ValueResult]:
        """V(s) in [-1, 1] for each state."""
        ...
