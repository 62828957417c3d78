"""Training jobs: policy SFT, Step-APO (+ Step-DPO / DPO baselines) and the value model (docs/training.md).

The library part (``cpl/``) stays free of services; these jobs read the JSONL exports of :mod:`cpl.pairs` and
write HF checkpoints with a ``manifest.json`` that the serving side can load.
"""

from cpl.training.config import PreferenceConfig, SFTConfig, TrainConfig, ValueConfig, config_for
from cpl.training.data import TrainingInputError
from cpl.training.jobs import (
    TrainResult,
    pair_log_probs,
    predict_values,
    response_nll,
    train_preference,
    train_sft,
    train_value,
)
from cpl.training.response_pairs import ResponsePair, export_response_pairs, response_pairs

__all__ = [
    "PreferenceConfig",
    "ResponsePair",
    "SFTConfig",
    "TrainConfig",
    "TrainResult",
    "TrainingInputError",
    "ValueConfig",
    "config_for",
    "export_response_pairs",
    "pair_log_probs",
    "predict_values",
    "response_nll",
    "response_pairs",
    "train_preference",
    "train_sft",
    "train_value",
]
