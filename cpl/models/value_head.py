"""The value model: a causal LM's backbone with a scalar head, V = tanh(logit) in [-1, 1].

Value checkpoints are ``*ForSequenceClassification`` with ``num_labels=1``: a linear ``score`` head (no bias)
applied to the hidden state of the *last* token. transformers and vLLM's pooling runner (``runner="pooling"``,
``classify``) both serve that layout. The head's raw output is the logit; the value is its tanh. vLLM applies
an activation (sigmoid for one label) to classification outputs by default, so the serving side must ask for
the raw logit (``use_activation=False``) and apply :func:`cpl.values.value_from_logit` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from cpl.models.hf import copy_tokenizer, quiet_transformers
from cpl.values import value_from_logit

SCORE_INIT_STD = 0.02
"""Standard deviation of the fresh score head (small, so that untrained values stay near 0)."""


def make_value_model(base_dir: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """Turn the causal LM in ``base_dir`` into an untrained value model in ``out_dir``.

    The backbone weights are copied, the ``score`` head (hidden -> 1, no bias) is freshly initialised
    (normal, std :data:`SCORE_INIT_STD`, seeded), ``pad_token_id`` is set (transformers needs it to find the
    last token of a batch), and the tokenizer files are copied.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = AutoConfig.from_pretrained(base_dir)
    config.num_labels = 1
    config.problem_type = "regression"
    pad = config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config.pad_token_id = pad
    config.architectures = [config.architectures[0].replace("ForCausalLM", "ForSequenceClassification")]

    with quiet_transformers():  # the load report lists lm_head as unexpected and score as missing, by design
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, config=config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = model.score.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * SCORE_INIT_STD)
        if getattr(model.score, "bias", None) is not None:
            model.score.bias.zero_()
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(base_dir, out_dir)
    return out_dir


@torch.no_grad()
def transformers_values(model_dir: Path, texts: Sequence[str]) -> list[float]:
    """Reference values: tanh of the score head's logit on each text's last token (one text at a time)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    values: list[float] = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        logit = model(input_ids=ids).logits[0, 0].item()
        values.append(float(value_from_logit(logit)))
    return values
