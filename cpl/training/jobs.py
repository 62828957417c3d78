"""The training jobs by name (``cpl train <job>``, the trainer service): one module per algorithm.

- :mod:`cpl.training.sft`: policy SFT
- :mod:`cpl.training.preference`: Step-APO, Step-DPO, response-level DPO
- :mod:`cpl.training.value`: the value model
- :mod:`cpl.training.loaders` and :mod:`cpl.training.common`: model loading, results and manifests they share

Each job reads JSONL exports, trains with :class:`~cpl.training.runtime.TrainableModel` and writes an HF checkpoint
with a manifest (:mod:`cpl.training.checkpoint`, :class:`cpl.training.manifest.Manifest`).
"""

from __future__ import annotations

from cpl.training.common import TrainResult
from cpl.training.loaders import load_policy, load_tokenizer, load_value_model
from cpl.training.preference import (
    Fitted,
    PreferenceJob,
    _pair_forward,
    fit_preference,
    pair_log_probs,
    train_preference,
)
from cpl.training.sft import SFTJob, _sft_forward, response_nll, train_sft
from cpl.training.value import ValueJob, predict_values, train_value

__all__ = [
    "TRAINERS",
    "Fitted",
    "PreferenceJob",
    "SFTJob",
    "TrainResult",
    "ValueJob",
    "_pair_forward",
    "_sft_forward",
    "fit_preference",
    "load_policy",
    "load_tokenizer",
    "load_value_model",
    "pair_log_probs",
    "predict_values",
    "response_nll",
    "train_preference",
    "train_sft",
    "train_value",
]

TRAINERS = {
    "sft": train_sft,
    "step-apo": train_preference,
    "step-dpo": train_preference,
    "dpo": train_preference,
    "value": train_value,
}
