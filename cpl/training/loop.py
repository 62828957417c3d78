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
from cpl.training.resume import FitHooks, LoopState
from cpl.training.runtime import TrainableModel


class Job(Protocol):
    """What :func:`fit` needs from a job."""

    kind: str
    num_examples: int

    def normalizer(self, indices: Sequence[int]) -> float:
        """The denominator of a full batch's loss (examples, or target tokens for SFT)."""
        ...

    def micro_step(self, engine: TrainableModel, indices: Sequence[int], normalizer: float) -> tuple[Tensor, dict]:
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


def fit(
    job: Job, engine: TrainableModel, config: TrainConfig, hooks: FitHooks | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train; returns the per-step log and the final metrics.

    With ``hooks.state`` the run continues from the saved state (if any) and saves it every ``state.every``
    steps; the batches of a resumed run are those the uninterrupted run would have seen (seeded epoch order).
    """
    hooks = hooks or FitHooks()
    total = config.total_steps(job.num_examples)
    loop = (hooks.state.load(engine) if hooks.state is not None else None) or LoopState()
    resumed = loop.step
    engine.train()
    start = time.perf_counter() - loop.elapsed_s
    bar = tqdm(
        total=total,
        initial=resumed,
        desc=f"train {job.kind}",
        unit="step",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    step = 0
    try:
        for epoch in range(config.epochs):
            if step + config.steps_per_epoch(job.num_examples) <= resumed:
                step += config.steps_per_epoch(job.num_examples)  # a whole epoch done before the restart
                if len(loop.epochs) <= epoch:  # saved on the epoch's last step, before its summary was added
                    loop.epochs.append({"epoch": epoch + 1, **job.summarize(loop.epoch_sums)})
                continue
            epoch_sums: dict[str, float] = defaultdict(float)
            if step < resumed:
                epoch_sums.update(loop.epoch_sums)
            for batch in batches(config, job.num_examples, epoch):
                if step < resumed:
                    step += 1
                    continue
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
                loop.tokens_seen += tokens
                loop.examples_seen += len(batch)
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
                loop.history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
                if hooks.on_step is not None:
                    hooks.on_step(record, total)
                if hooks.state is not None and hooks.state.due(step, total):
                    loop.step = step
                    loop.epoch_sums = dict(epoch_sums)
                    loop.elapsed_s = time.perf_counter() - start
                    hooks.state.save(engine, loop)
            loop.epochs.append({"epoch": epoch + 1, **job.summarize(epoch_sums)})
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    history = loop.history
    metrics: dict[str, Any] = {
        "steps": step,
        "examples_seen": loop.examples_seen,
        "tokens_seen": loop.tokens_seen,
        "train_seconds": round(seconds, 3),
        "tokens_per_second": round(loop.tokens_seen / seconds, 1) if seconds > 0 else None,
        "first_step_loss": history[0]["loss"] if history else None,
        "final_step_loss": history[-1]["loss"] if history else None,
        "final_epoch": loop.epochs[-1] if loop.epochs else None,
        "epochs": loop.epochs,
    }
    if loop.resumed_from_step is not None:
        metrics["resumed_from_step"] = loop.resumed_from_step
    return history, metrics
