"""Rows of the exported datasets (JSONL). Documented in docs/data-formats.md."""

from __future__ import annotations

from pydantic import BaseModel, Field

from cpl.formats import PromptFormat, StepKind


class SFTExample(BaseModel):
    """A correct full response: ``prompt + response`` is the text the policy is fine-tuned on."""

    prompt: str
    response: str
    question: str
    answer: str | None
    tree_id: str
    node_id: int = Field(description="the terminal node that ends this path")
    format: PromptFormat


class PreferencePair(BaseModel):
    """Two sibling steps under one state: ``prompt + chosen`` beats ``prompt + rejected``.

    ``chosen``/``rejected`` are the steps as the policy generated them (text + stop marker), so that TRL-style
    tools that concatenate prompt and completion score exactly the generated tokens.
    """

    prompt: str
    chosen: str
    rejected: str
    chosen_value: float
    rejected_value: float
    kind: StepKind
    tree_id: str
    depth: int = Field(description="depth of the two steps (1 = first step after the question)")
    parent_id: int
    chosen_id: int
    rejected_id: int
    format: PromptFormat


class ValueExample(BaseModel):
    """A state with its search value as the regression label (`cpl.pairs.has_search_value` says which)."""

    text: str
    value: float = Field(ge=-1.0, le=1.0)
    tree_id: str
    node_id: int
    depth: int
    visits: int
    terminal: bool
