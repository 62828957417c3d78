"""Model building blocks: tiny local models for tests and development, the value head, references."""

from cpl.models.tiny import build_tiny_models, build_tokenizer, default_corpus
from cpl.models.value_head import make_value_model, transformers_values
from cpl.values import value_from_logit

__all__ = [
    "build_tiny_models",
    "build_tokenizer",
    "default_corpus",
    "make_value_model",
    "transformers_values",
    "value_from_logit",
]
