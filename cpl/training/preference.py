"""Step-APO (eq. 12) and its baselines Step-DPO and response-level DPO, on pairs of steps or responses."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cpl.losses import dpo_loss, step_apo_loss
from cpl.training.checkpoint import check_model_dir, check_out_dir, save_checkpoint
from cpl.training.common import TrainResult, build_manifest, require_examples
from cpl.training.config import PreferenceConfig
from cpl.training.data import (
    PairRow,
    StepPairRow,
    TokenizedPair,
    read_rows,
    tokenize_pairs,
)
from cpl.training.loaders import load_policy, load_tokenizer
from cpl.training.logps import pair_batch, pair_logps
from cpl.training.loop import fit
from cpl.training.resume import FitHooks, bind_hooks
from cpl.training.runtime import Forward, TrainableModel, resolve_runtime

log = logging.getLogger(__name__)


def _pair_forward(model: nn.Module, **batch: Tensor) -> tuple[Tensor, Tensor]:
    return pair_logps(model, batch)


class PreferenceJob:
    """Step-APO (eq. 12), or DPO's sigmoid loss (Step-DPO, response-level DPO), against precomputed references."""

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        config: PreferenceConfig,
        pad_id: int,
        device: torch.device,
        reference: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.kind = config.loss
        self.pairs = list(pairs)
        self.num_examples = len(self.pairs)
        self.config = config
        self.pad_id = pad_id
        self.device = device
        # gradient checkpointing drops the KV cache in training mode; the (eval-mode) reference pass can share
        self.prefix_sharing = config.prefix_sharing and not config.gradient_checkpointing
        self.reference_prefix_sharing = config.prefix_sharing
        self.values = torch.tensor([[p.chosen_value, p.rejected_value] for p in self.pairs], dtype=torch.float32)
        self.ref_chosen: Tensor | None = None
        self.ref_rejected: Tensor | None = None
        if reference is not None:
            self.ref_chosen, self.ref_rejected = reference

    def batch(self, indices: Sequence[int], *, prefix_sharing: bool | None = None) -> dict[str, Tensor]:
        ps = [self.pairs[i] for i in indices]
        return pair_batch(
            [p.prompt_ids for p in ps],
            [p.chosen_ids for p in ps],
            [p.rejected_ids for p in ps],
            self.pad_id,
            self.device,
            prefix_sharing=self.prefix_sharing if prefix_sharing is None else prefix_sharing,
        )

    @torch.no_grad()
    def compute_reference(self, engine: TrainableModel, batch_size: int) -> None:
        """Reference log-probs of every pair, once, with the starting model (pairs sorted by length)."""
        engine.eval()
        order = sorted(range(self.num_examples), key=lambda i: self.pairs[i].num_tokens)
        chosen = torch.zeros(self.num_examples)
        rejected = torch.zeros(self.num_examples)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            c, r = engine(**self.batch(idx, prefix_sharing=self.reference_prefix_sharing))
            chosen[idx] = c.float().cpu()
            rejected[idx] = r.float().cpu()
        self.ref_chosen, self.ref_rejected = chosen, rejected
        engine.train()

    def normalizer(self, indices: Sequence[int]) -> float:
        return float(len(indices))

    def micro_step(self, engine: TrainableModel, indices: Sequence[int], normalizer: float) -> tuple[Tensor, dict]:
        assert self.ref_chosen is not None and self.ref_rejected is not None, "compute_reference first"
        policy_c, policy_r = engine(**self.batch(indices))
        idx = torch.as_tensor(list(indices))
        ref_c = self.ref_chosen[idx].to(policy_c.device)
        ref_r = self.ref_rejected[idx].to(policy_c.device)
        if self.config.uses_values:
            values = self.values[idx].to(policy_c.device)
            losses = step_apo_loss(policy_c, policy_r, ref_c, ref_r, values[:, 0], values[:, 1], self.config.beta)
        else:
            losses = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=self.config.beta)
        margin = ((policy_c - ref_c) - (policy_r - ref_r)).detach()
        stats = {
            "loss_sum": float(losses.detach().sum()),
            "margin_sum": float(margin.sum()),
            "correct": float((margin > 0).sum()),
            "pairs": float(len(indices)),
        }
        return losses.sum() / normalizer, stats

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["pairs"], 1.0)
        return {"loss": sums["loss_sum"] / n, "margin": sums["margin_sum"] / n, "accuracy": sums["correct"] / n}

    def num_tokens(self, indices: Sequence[int]) -> int:
        return sum(self.pairs[i].num_tokens for i in indices)


@torch.no_grad()
def pair_log_probs(
    model: nn.Module, pairs: Sequence[TokenizedPair], pad_id: int, *, batch_size: int = 8, prefix_sharing: bool = True
) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed step log-probs of ``model`` on ``pairs`` (for evaluation and tests)."""
    model.eval()
    device = next(model.parameters()).device
    config = PreferenceConfig(prefix_sharing=prefix_sharing)
    job = PreferenceJob(pairs, config, pad_id, device)
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        c, r = _pair_forward(model, **job.batch(range(i, min(i + batch_size, len(pairs)))))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


@dataclass
class Fitted:
    """A trained model before it is saved (what :func:`fit_preference` returns)."""

    model: nn.Module
    manifest: dict[str, Any]
    history: list[dict[str, Any]]


def fit_preference(
    model_dir: Path, data: Sequence[Path], config: PreferenceConfig | None = None, hooks: FitHooks | None = None
) -> Fitted:
    """Step-APO / Step-DPO / DPO (``config.loss``) from the policy in ``model_dir`` (also the reference).

    Reads and tokenises the pairs, computes the reference log-probs once, trains; does not save.
    """
    config = config or PreferenceConfig()
    model_dir = check_model_dir(model_dir)
    rows, files = read_rows(data, StepPairRow if config.uses_values else PairRow)
    tokenizer = load_tokenizer(model_dir)
    pairs, dropped = tokenize_pairs(
        tokenizer,
        rows,
        config.max_length,
        append_eos=config.eos,
        solution_value_scale=config.solution_value_scale if config.uses_values else None,
    )
    require_examples(pairs, dropped, config)
    runtime = resolve_runtime(config)
    torch.manual_seed(config.seed)
    model = load_policy(model_dir, runtime, gradient_checkpointing=config.gradient_checkpointing)
    engine = TrainableModel(Forward(model, _pair_forward), config, runtime, config.total_steps(len(pairs)))
    job = PreferenceJob(pairs, config, tokenizer.pad_token_id, runtime.torch_device)
    start = time.perf_counter()
    job.compute_reference(engine, config.reference_batch_size or 2 * config.micro)
    reference_seconds = time.perf_counter() - start
    history, metrics = fit(job, engine, config, bind_hooks(hooks, config.loss, model_dir, files, config))
    metrics["reference_seconds"] = round(reference_seconds, 3)
    manifest = build_manifest(
        config.loss, "policy", model_dir, files, len(rows), len(pairs), dropped, config, runtime, engine
    )
    manifest["reference_model"] = str(Path(model_dir).resolve())
    manifest["metrics"] = metrics
    return Fitted(model, manifest, history)


def train_preference(
    model_dir: Path,
    data: Sequence[Path],
    out_dir: Path,
    config: PreferenceConfig | None = None,
    *,
    overwrite: bool = False,
    hooks: FitHooks | None = None,
) -> TrainResult:
    """:func:`fit_preference`, then save the policy checkpoint to ``out_dir``."""
    check_out_dir(out_dir, overwrite=overwrite)
    fitted = fit_preference(model_dir, data, config, hooks)
    manifest = save_checkpoint(
        fitted.model,
        out_dir,
        tokenizer_dir=Path(model_dir),
        manifest=fitted.manifest,
        history=fitted.history,
        overwrite=overwrite,
    )
    return TrainResult(Path(out_dir), manifest, fitted.history)
