"""Reference computations with plain transformers, for tests of the serving engines."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=4)
def _load_causal_lm(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model


@torch.no_grad()
def transformers_step_logprob(model_dir: Path | str, prompt: str, step_token_ids: Sequence[int]) -> float:
    """Sum of the log-probs of ``step_token_ids`` following the tokenised ``prompt``.

    The prompt is tokenised alone (with the tokenizer's special tokens, as vLLM does) and the step's ids are
    appended, so no token is merged across the boundary. The log-probs are untempered.
    """
    tokenizer, model = _load_causal_lm(str(Path(model_dir).resolve()))
    prompt_ids = tokenizer(prompt).input_ids
    step = list(step_token_ids)
    if not step:
        return 0.0
    ids = torch.tensor([prompt_ids + step])
    logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return float(logps.gather(-1, torch.tensor(step).unsqueeze(-1)).sum())
