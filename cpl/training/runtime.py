"""Where and how a job runs: device, precision, attention kernel, DeepSpeed ZeRO-2 or plain PyTorch.

GPU: bf16 with fp32 master weights, FlashAttention-2 when ``flash_attn`` is importable (else SDPA), DeepSpeed
ZeRO-2 when ``deepspeed`` is importable (else plain PyTorch with bf16 autocast over fp32 weights). CPU: fp32,
SDPA, plain PyTorch. Single process: a launch with ``WORLD_SIZE > 1`` is refused (data-parallel sharding is
not implemented).

Gradient accumulation is done here, not by DeepSpeed's counter, so a short last batch works: the job scales
each micro-batch's loss by the size of its *full* batch, :meth:`TrainableModel.backward` is told which micro-batch
is the last of the step, and :meth:`TrainableModel.step` applies the update.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from cpl.training.config import TrainConfig
from cpl.training.data import TrainingInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: str
    precision: str
    attn_implementation: str
    deepspeed: bool
    zero_stage: int | None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def load_dtype(self) -> torch.dtype:
        """DeepSpeed's bf16 mode trains a bf16 module (fp32 master weights in the optimizer); plain bf16 uses
        autocast over fp32 weights (a 1e-6 update would vanish in bf16 weights)."""
        return torch.bfloat16 if (self.deepspeed and self.precision == "bf16") else torch.float32

    @property
    def autocast(self) -> bool:
        return self.precision == "bf16" and not self.deepspeed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def flash_attn_available() -> bool:
    """FlashAttention-2 usable by transformers (package importable, recent enough, CUDA present)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def resolve_runtime(config: TrainConfig) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise TrainingInputError(f"WORLD_SIZE={world}: the trainer runs in one process on one device")
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise TrainingInputError(f"device {device!r} requested but CUDA is not available")
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    attn = config.attn_implementation
    if attn == "auto":
        attn = "flash_attention_2" if cuda and precision == "bf16" and flash_attn_available() else "sdpa"
    if attn == "flash_attention_2" and not (cuda and flash_attn_available()):
        raise TrainingInputError("flash_attention_2 needs CUDA and the flash_attn package")
    use_ds = config.deepspeed == "on" or (config.deepspeed == "auto" and cuda and deepspeed_available())
    if use_ds and not cuda:
        raise TrainingInputError("DeepSpeed is used on GPU only; pass --deepspeed off (or auto) on CPU")
    if use_ds and not deepspeed_available():
        raise TrainingInputError("--deepspeed on, but the deepspeed package is not installed")
    return Runtime(
        device=device,
        precision=precision,
        attn_implementation=attn,
        deepspeed=use_ds,
        zero_stage=config.zero_stage if use_ds else None,
    )


def deepspeed_config(config: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO stage 2 (default), bf16, clipping; accumulation boundaries are set by hand."""
    return {
        "train_micro_batch_size_per_gpu": config.micro,
        "gradient_accumulation_steps": config.accumulation_steps,
        "train_batch_size": config.micro * config.accumulation_steps,
        "gradient_clipping": config.max_grad_norm or 0.0,
        "bf16": {"enabled": runtime.precision == "bf16"},
        "zero_optimization": {
            "stage": config.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_scatter": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        # torch's AdamW: DeepSpeed's FusedAdam would JIT-compile CUDA ops on first use
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _ensure_single_process_env() -> None:
    """DeepSpeed initialises torch.distributed; outside a launcher it needs a one-process rendezvous."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = math.ceil(config.warmup_ratio * total_steps)  # as transformers' Trainer
    if config.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if config.lr_scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


class Forward(nn.Module):
    """Wraps a model and a function ``fn(model, **batch)`` so DeepSpeed's engine runs the whole computation."""

    def __init__(self, model: nn.Module, fn) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, **batch: Any) -> Any:
        return self.fn(self.model, **batch)


class TrainableModel:
    """The model being trained with its optimizer: AdamW + warmup/cosine schedule + clipping, on DeepSpeed or
    plain PyTorch, with manual accumulation."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        runtime: Runtime,
        total_steps: int,
        param_groups: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.model = model
        groups = list(param_groups) if param_groups is not None else [{"params": list(model.parameters())}]
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        if not runtime.deepspeed:
            model.to(runtime.torch_device)  # before the optimizer: fused AdamW checks the parameters' device
        optimizer = torch.optim.AdamW(
            groups,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
            # one kernel per step, no per-parameter temporaries (transformers' default optimizer too)
            fused=not runtime.deepspeed,
        )
        scheduler = lr_schedule(optimizer, config, total_steps)
        self.ds_config: dict[str, Any] | None = None
        self._engine: Any = None
        if runtime.deepspeed:
            import deepspeed

            _ensure_single_process_env()
            if runtime.torch_device.index is not None:
                torch.cuda.set_device(runtime.torch_device)
            self.ds_config = deepspeed_config(config, runtime)
            self._engine, optimizer, _, scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
            )
        self.optimizer = optimizer
        self.scheduler = scheduler

    # -- forward / backward / step ------------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """What to call for a forward pass (the DeepSpeed engine, or the model itself)."""
        return self._engine if self._engine is not None else self.model

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.runtime.autocast:
            with torch.autocast(self.runtime.torch_device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def __call__(self, **batch: Any) -> Any:
        with self.autocast():
            return self.module(**batch)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Accumulate the gradient of ``loss`` (already scaled to the full batch); ``last`` ends the step."""
        if self._engine is not None:
            self._engine.set_gradient_accumulation_boundary(last)
            self._engine.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    def step(self) -> float | None:
        """Clip, update, advance the schedule; returns the gradient norm before clipping (when known)."""
        if self._engine is not None:
            self._engine.step()
            norm = self._engine.get_global_grad_norm()
            return None if norm is None else float(norm)
        norm = None
        if self.config.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()
