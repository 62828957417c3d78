"""Typed configuration of the search, with the paper's Table 6 defaults."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from cpl.formats import PromptFormat


class PriorMode(StrEnum):
    """How pi(a|s) in PUCT (eq. 1) is computed from a sampled step's token log-probs.

    ``mean_logprob`` (default, as OpenR): exp(mean token log-prob) of each sibling, normalised across the
    siblings. Length-neutral, so a long careful step is not punished for its length.
    ``sum_logprob``: the siblings' sequence probabilities exp(sum of log-probs), normalised (a softmax over
    the summed log-probs). Faithful to the sequence likelihood, but strongly favours short steps.
    ``uniform``: 1/k for k siblings (pure UCT-style exploration).
    """

    MEAN_LOGPROB = "mean_logprob"
    SUM_LOGPROB = "sum_logprob"
    UNIFORM = "uniform"


SEED_MAX = 2**63 - 1
"""Largest search seed (vLLM's own seeds are signed 64-bit integers)."""


class SearchConfig(BaseModel):
    """MCTS settings. Defaults are Table 6 of the paper (round 1)."""

    c_puct: float = Field(default=1.5, gt=0, description="PUCT exploration constant (eq. 1)")
    simulations: int = Field(
        default=200, ge=1, description="MCTS simulations per tree (200 in round 1, 100 in round 2)"
    )
    root_children: int = Field(default=5, ge=1, le=64, description="candidates sampled at the root")
    children: int = Field(default=3, ge=1, le=64, description="candidates sampled at other nodes")
    draw_budget: float = Field(
        default=2.0,
        ge=1.0,
        le=8.0,
        description=(
            "an expansion that kept fewer distinct steps than root_children / children samples again for the "
            "missing ones, up to this many times that count in all (1: one round of samples); "
            "docs/decisions/006-distinct-expansions.md"
        ),
    )
    temperature: float = Field(
        default=0.7, ge=0.0, le=5.0, description="sampling temperature of the policy's candidate steps (0: greedy)"
    )
    max_depth: int = Field(default=6, ge=1, description="a node at max_depth - 1 may only write the solution")
    max_step_tokens: int = Field(default=512, ge=1, description="token limit of one generated step")
    prior: PriorMode = Field(
        default=PriorMode.MEAN_LOGPROB, description="how pi(a|s) of PUCT comes from a step's log-probs (PriorMode)"
    )
    format: PromptFormat = Field(
        default=PromptFormat.PLAIN, description="prompt format: plain (round 1) or xml (round 2 and later)"
    )
    few_shot: bool = Field(default=True, description="prepend the appendix A.1 demonstrations to prompts")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description=(
            "search seed: each expansion samples with a seed derived from it and the node's state "
            "(cpl.mcts.expansion_seed), so the same settings give the same tree; None: unseeded sampling"
        ),
    )

    @classmethod
    def round_preset(cls, round_number: int, **overrides: object) -> SearchConfig:
        """Round 1: plain prompt, 200 simulations. Round 2 and later: XML prompt, 100 simulations."""
        if round_number < 1:
            raise ValueError(f"round numbers start at 1, got {round_number}")
        preset: dict[str, object] = (
            {"format": PromptFormat.PLAIN, "simulations": 200}
            if round_number == 1
            else {"format": PromptFormat.XML, "simulations": 100}
        )
        return cls.model_validate(preset | overrides)
