"""Model and tokenizer loading for the training jobs (a policy is a causal LM, a value model a one-label
classifier; :func:`load_value_model` turns a causal LM into one)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from torch import nn

from cpl.models.hf import quiet_transformers
from cpl.training.data import (
    TrainingInputError,
)
from cpl.training.runtime import Runtime

log = logging.getLogger(__name__)


def _architecture(model_dir: Path) -> str:
    from transformers import AutoConfig

    archs = AutoConfig.from_pretrained(model_dir).architectures or []
    return archs[0] if archs else ""


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None:
        raise TrainingInputError(f"{model_dir}: the tokenizer has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(model_dir: Path, runtime: Runtime, *, gradient_checkpointing: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if _architecture(model_dir).endswith("ForSequenceClassification"):
        raise TrainingInputError(f"--model {model_dir}: a value model; policy jobs need a causal LM")
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=runtime.load_dtype, attn_implementation=runtime.attn_implementation
        )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_value_model(model_dir: Path, runtime: Runtime, *, seed: int = 0, gradient_checkpointing: bool = False):
    """A value checkpoint as is, or a causal LM turned into one (fresh score head, :func:`make_value_model`)."""
    from transformers import AutoModelForSequenceClassification

    from cpl.models.value_head import make_value_model

    arch = _architecture(model_dir)
    with tempfile.TemporaryDirectory(prefix="cpl-value-init-") as tmp:
        if arch.endswith("ForCausalLM"):
            source = make_value_model(model_dir, Path(tmp) / "value", seed=seed)
        elif arch.endswith("ForSequenceClassification"):
            source = model_dir
        else:
            raise TrainingInputError(f"--model {model_dir}: unknown architecture {arch!r}")
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                source, dtype=runtime.load_dtype, attn_implementation=runtime.attn_implementation
            )
    if model.config.num_labels != 1:
        raise TrainingInputError(f"--model {model_dir}: a classifier with {model.config.num_labels} labels, not 1")
    if model.config.pad_token_id is None:
        raise TrainingInputError(f"--model {model_dir}: value model config has no pad_token_id")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
