"""Typed training configurations with the paper's Table 6 defaults (appendix A.2).

Batch sizes count *examples* per optimizer step (SFT responses, preference pairs, value states). A step is
computed as ``ceil(batch_size / micro_batch_size)`` forward/backward passes of at most ``micro_batch_size``
examples each, so the paper's batch sizes work on small memory; the gradient is the exact mean over the batch,
also for the last, partial batch of an epoch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

from cpl.losses import SOLUTION_VALUE_SCALE, STEP_APO_BETA

JobKind = Literal["sft", "step-apo", "step-dpo", "dpo", "value"]
PreferenceLoss = Literal["step-apo", "step-dpo", "dpo"]


LEARNING_RATE = "peak learning rate (AdamW)"
EPOCHS = "passes over the dataset"
BATCH_SIZE = "examples per optimizer step"


def learning_rate(default: float = PydanticUndefined) -> Any:
    return Field(default=default, gt=0, description=LEARNING_RATE)


def epochs(default: int = PydanticUndefined) -> Any:
    return Field(default=default, ge=1, description=EPOCHS)


def batch_size(default: int = PydanticUndefined) -> Any:
    return Field(default=default, ge=1, description=BATCH_SIZE)


class TrainConfig(BaseModel):
    """What every job shares. Subclasses set the defaults of their job."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = learning_rate()
    epochs: int = epochs()
    batch_size: int = batch_size()
    micro_batch_size: int = Field(default=4, ge=1, description="examples per forward/backward pass")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="learning-rate schedule after the warmup"
    )
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0, description="warmup fraction of the steps")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay")
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="AdamW beta1")
    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0, description="AdamW beta2")
    adam_epsilon: float = Field(default=1e-8, gt=0.0, description="AdamW epsilon")
    max_grad_norm: float | None = Field(
        default=1.0, gt=0.0, description="gradient clipping norm; None (0 on the command line): no clipping"
    )
    max_length: int = Field(default=2048, ge=2, description="longer examples are dropped (and counted)")
    seed: int = Field(default=0, description="seed of the data order and fresh weights")
    shuffle: bool = Field(default=True, description="shuffle the examples every epoch")
    device: str = Field(default="auto", description="auto (cuda if available), cpu, cuda, cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 on GPU, fp32 on CPU; bf16 keeps fp32 master weights"
    )
    deepspeed: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto: DeepSpeed when on GPU and importable"
    )
    zero_stage: Literal[0, 1, 2] = Field(default=2, description="DeepSpeed ZeRO stage")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        default="auto", description="auto: flash_attention_2 on GPU when flash_attn is importable, else sdpa"
    )
    gradient_checkpointing: bool = Field(default=False, description="recompute activations to save memory")
    progress: bool = Field(default=True, description="tqdm progress bar (loss, lr, ETA)")

    @property
    def micro(self) -> int:
        return min(self.micro_batch_size, self.batch_size)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per full optimizer step."""
        return math.ceil(self.batch_size / self.micro)

    def steps_per_epoch(self, num_examples: int) -> int:
        return math.ceil(num_examples / self.batch_size)

    def total_steps(self, num_examples: int) -> int:
        return self.epochs * self.steps_per_epoch(num_examples)


class SFTConfig(TrainConfig):
    """Policy SFT on correct full responses: lr 1e-5, batch 512, 5 epochs in round 1, 3 later (Table 6)."""

    learning_rate: float = learning_rate(1e-5)
    epochs: int = epochs(5)
    batch_size: int = batch_size(512)

    @classmethod
    def round_preset(cls, round_number: int, **overrides: object) -> SFTConfig:
        if round_number < 1:
            raise ValueError(f"round numbers start at 1, got {round_number}")
        return cls.model_validate({"epochs": 5 if round_number == 1 else 3} | overrides)


class PreferenceConfig(TrainConfig):
    """Step-APO and its baselines: lr 1e-6, batch 64 pairs, 2 epochs, beta 0.3 (Table 6).

    ``loss``: ``step-apo`` (eq. 12, values from the pairs, solution-pair values scaled by
    ``solution_value_scale``), ``step-dpo`` (the same step pairs, values ignored: DPO's sigmoid loss) or
    ``dpo`` (response-level pairs, DPO's sigmoid loss). The reference model is the starting model; its
    log-probs are computed once, before training.
    """

    loss: PreferenceLoss = Field(default="step-apo", description="step-apo, step-dpo or dpo (the job's name)")
    learning_rate: float = learning_rate(1e-6)
    epochs: int = epochs(2)
    batch_size: int = batch_size(64)
    beta: float = Field(default=STEP_APO_BETA, gt=0, description="beta of the (Step-A)PO loss")
    solution_value_scale: float = Field(
        default=SOLUTION_VALUE_SCALE, ge=0, description="scale of the solution pairs' values (step-apo)"
    )
    append_eos: bool | None = Field(
        default=None,
        description="append </s> to chosen/rejected; None: only for response-level dpo (steps end on a marker)",
    )
    prefix_sharing: bool = Field(
        default=True,
        description="run each pair's prompt once and both continuations on its KV cache (same log-probs, less work)",
    )
    reference_batch_size: int | None = Field(
        default=None, ge=1, description="pairs per reference forward pass; None: 2 x micro_batch_size"
    )

    @property
    def eos(self) -> bool:
        return self.loss == "dpo" if self.append_eos is None else self.append_eos

    @property
    def uses_values(self) -> bool:
        return self.loss == "step-apo"


class ValueConfig(TrainConfig):
    """Value model: MSE of tanh(score logit) against MCTS values.

    The paper gives no value hyperparameters. Defaults: lr 1e-5 (as policy SFT, a full fine-tune of the same
    base model), batch 512 states, 2 epochs (≈200k states per round -> ≈800 steps), cosine, warmup 0.1.
    ``head_learning_rate`` optionally gives the fresh score head its own rate.
    """

    learning_rate: float = learning_rate(1e-5)
    epochs: int = epochs(2)
    batch_size: int = batch_size(512)
    head_learning_rate: float | None = Field(
        default=None, gt=0, description="learning rate of the score head; None: the learning rate"
    )


CONFIG_CLASSES: dict[str, type[TrainConfig]] = {
    "sft": SFTConfig,
    "step-apo": PreferenceConfig,
    "step-dpo": PreferenceConfig,
    "dpo": PreferenceConfig,
    "value": ValueConfig,
}


def config_for(kind: JobKind, **overrides: object) -> TrainConfig:
    """The default config of a job kind with ``overrides`` (``None`` values are ignored)."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if kind in ("step-apo", "step-dpo", "dpo"):
        values["loss"] = kind
    return CONFIG_CLASSES[kind].model_validate(values)
