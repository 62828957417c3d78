"""What a replica must answer after a swap: the checkpoint's own answers, computed with transformers.

Policy: the greedy continuation (``probe_max_tokens`` tokens, token ids) of a fixed prompt, sent as token ids so
no tokenizer sits between the two. Value: V(s) of fixed states, within ``probe_value_tolerance``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cpl.formats import PromptFormat, StepKind, render_prompt
from cpl.protocols import State

PROBE_QUESTION = "Ann has 3 apples and buys 4 more. How many apples does Ann have now?"
PROBE_STATES = [
    State(question=PROBE_QUESTION),
    State(question=PROBE_QUESTION, steps=[(StepKind.PLAN, "Plan 1: Take the starting number of apples.")]),
    State(question="Ben has 12 coins and gives away 5. How many coins are left?", format=PromptFormat.XML),
]


@dataclass
class PolicyProbe:
    prompt_ids: list[int]
    expected: list[int]


@dataclass
class ValueProbe:
    states: list[dict[str, Any]] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)


@torch.no_grad()
def policy_probe(model_dir: Path, max_tokens: int) -> PolicyProbe:
    """Greedy token ids of the checkpoint in ``model_dir`` (float32, transformers, KV cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpl.models.tiny import quiet_transformers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = list(tokenizer(render_prompt(PROBE_QUESTION, [], PromptFormat.PLAIN, few_shot=False)).input_ids)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    past = None
    out: list[int] = []
    for _ in range(max_tokens):
        result = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        ids = torch.tensor([[token]])
    return PolicyProbe(prompt_ids=prompt_ids, expected=out)


def value_probe(model_dir: Path) -> ValueProbe:
    from cpl.models.value_head import transformers_values

    expected = transformers_values(Path(model_dir), [s.value_prompt() for s in PROBE_STATES])
    return ValueProbe(states=[s.model_dump(mode="json") for s in PROBE_STATES], expected=list(expected))
