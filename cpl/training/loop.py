"""The training loop every job shares: seeded epoch shuffles, batches of micro-batches, progress, metrics."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor
from tqdm.auto import tqdm

from cpl.training.config import TrainConfig
from cpl.training.runtime import TrainEngine


class Job(Protocol):
    """What :func:`fit` needs from a job."""

    kind: str
    num_examples: int

    def normalizer(self, indices: Sequence[int]) -> float:
        """The denominator of a full batch's loss (examples, or target tokens for SFT)."""
        ...

    def micro_step(self, engine: TrainEngine, indices: Sequence[int], normalizer: float) -> tuple[Tensor, dict]:
        """Loss of a micro-batch, already divided by ``normalizer``, and additive statistics (sums)."""
        ...

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Readable metrics (means) from summed statistics; must include ``loss``."""
        ...

    def num_tokens(self, indices: Sequence[int]) -> int:
        """Tokens a plain implementation would process for these examples (for throughput figures)."""
        ...


def epoch_order(num_examples: int, epoch: int, *, seed: int, shuffle: bool) -> list[int]:
    order = list(range(num_examples))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def batches(config: TrainConfig, num_examples: int, epoch: int) -> list[list[int]]:
    order = epoch_order(num_examples, epoch, seed=config.seed, shuffle=config.shuffle)
    return [order[i : i + config.batch_size] for i in range(0, num_examples, config.batch_size)]


def fit(job: Job, engine: TrainEngine, config: TrainConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train; returns the per-step log and the final metrics."""
    total = config.total_steps(job.num_examples)
    history: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    tokens_seen = examples_seen = 0
    engine.train()
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"train {job.kind}", unit="step", disable=not config.progress, dynamic_ncols=True)
    step = 0
    try:
        for epoch in range(config.epochs):
            epoch_sums: dict[str, float] = defaultdict(float)
            for batch in batches(config, job.num_examples, epoch):
                norm = job.normalizer(batch)
                micro = [batch[i : i + config.micro] for i in range(0, len(batch), config.micro)]
                sums: dict[str, float] = defaultdict(float)
                for k, indices in enumerate(micro):
                    loss, stats = job.micro_step(engine, indices, norm)
                    engine.backward(loss, last=k == len(micro) - 1)
                    for key, value in stats.items():
                        sums[key] += value
                lr = engine.lr
                grad_norm = engine.step()
                step += 1
                tokens = job.num_tokens(batch)
                tokens_seen += tokens
                examples_seen += len(batch)
                for key, value in sums.items():
                    epoch_sums[key] += value
                record = {
                    "step": step,
                    "epoch": epoch + 1,
                    "examples": len(batch),
                    "tokens": tokens,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    **job.summarize(sums),
                    "elapsed_s": round(time.perf_counter() - start, 3),
                }
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
            epochs.append({"epoch": epoch + 1, **job.summarize(epoch_sums)})
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {
        "steps": step,
        "examples_seen": examples_seen,
        "tokens_seen": tokens_seen,
        "train_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens_seen / seconds, 1) if seconds > 0 else None,
        "first_step_loss": history[0]["loss"] if history else None,
        "final_step_loss": history[-1]["loss"] if history else None,
        "final_epoch": epochs[-1] if epochs else None,
        "epochs": epochs,
    }
    return history, metrics
