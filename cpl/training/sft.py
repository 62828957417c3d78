"""Policy SFT on correct full responses (``sft.jsonl``): loss on the response tokens only."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from cpl.training.checkpoint import check_model_dir, check_out_dir, save_checkpoint
from cpl.training.common import TrainResult, build_manifest, require_examples
from cpl.training.config import SFTConfig
from cpl.training.data import (
    SFTRow,
    TokenizedSFT,
    read_rows,
    tokenize_sft,
)
from cpl.training.loaders import load_policy, load_tokenizer
from cpl.training.logps import completion_logps, concat_batch
from cpl.training.loop import fit
from cpl.training.resume import FitHooks, bind_hooks
from cpl.training.runtime import Forward, TrainableModel, resolve_runtime

log = logging.getLogger(__name__)


def _sft_forward(model: nn.Module, **batch: Tensor) -> Tensor:
    return completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["target_mask"])


class SFTJob:
    """Next-token NLL on the response tokens (+ eos) only, averaged over the target tokens of the full batch."""

    kind = "sft"

    def __init__(self, examples: Sequence[TokenizedSFT], pad_id: int, device: torch.device) -> None:
        self.examples = list(examples)
        self.num_examples = len(self.examples)
        self.pad_id = pad_id
        self.device = device

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        ex = [self.examples[i] for i in indices]
        return concat_batch(
            [e.input_ids[: e.prompt_len] for e in ex],
            [e.input_ids[e.prompt_len :] for e in ex],
            self.pad_id,
            self.device,
        )

    def normalizer(self, indices: Sequence[int]) -> float:
        return float(sum(self.examples[i].num_target_tokens for i in indices))

    def micro_step(self, engine: TrainableModel, indices: Sequence[int], normalizer: float) -> tuple[Tensor, dict]:
        logps = engine(**self.batch(indices))
        nll = -logps.sum()
        tokens = sum(self.examples[i].num_target_tokens for i in indices)
        return nll / normalizer, {"nll": float(nll.detach()), "target_tokens": tokens}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["nll"] / max(sums["target_tokens"], 1.0)}

    def num_tokens(self, indices: Sequence[int]) -> int:
        return sum(len(self.examples[i].input_ids) for i in indices)


@torch.no_grad()
def response_nll(model: nn.Module, examples: Sequence[TokenizedSFT], pad_id: int, batch_size: int = 8) -> float:
    """Mean NLL per response token (the SFT loss) of ``model`` on ``examples``."""
    model.eval()
    device = next(model.parameters()).device
    job = SFTJob(examples, pad_id, device)
    nll = tokens = 0.0
    for i in range(0, len(examples), batch_size):
        idx = list(range(i, min(i + batch_size, len(examples))))
        nll += float(-_sft_forward(model, **job.batch(idx)).sum())
        tokens += job.normalizer(idx)
    return nll / tokens


def train_sft(
    model_dir: Path,
    data: Sequence[Path],
    out_dir: Path,
    config: SFTConfig | None = None,
    *,
    overwrite: bool = False,
    hooks: FitHooks | None = None,
) -> TrainResult:
    """SFT of the causal LM in ``model_dir`` on ``sft.jsonl`` rows; writes a policy checkpoint to ``out_dir``.

    ``hooks``: resume from / save a training state, report each step (:class:`cpl.training.resume.FitHooks`)."""
    config = config or SFTConfig()
    model_dir = check_model_dir(model_dir)
    check_out_dir(out_dir, overwrite=overwrite)
    rows, files = read_rows(data, SFTRow)
    tokenizer = load_tokenizer(model_dir)
    examples, dropped = tokenize_sft(tokenizer, rows, config.max_length)
    require_examples(examples, dropped, config)
    runtime = resolve_runtime(config)
    torch.manual_seed(config.seed)
    model = load_policy(model_dir, runtime, gradient_checkpointing=config.gradient_checkpointing)
    engine = TrainableModel(Forward(model, _sft_forward), config, runtime, config.total_steps(len(examples)))
    job = SFTJob(examples, tokenizer.pad_token_id, runtime.torch_device)
    history, metrics = fit(job, engine, config, bind_hooks(hooks, "sft", model_dir, files, config))
    manifest = build_manifest(
        "sft", "policy", model_dir, files, len(rows), len(examples), dropped, config, runtime, engine
    )
    manifest["metrics"] = metrics
    manifest = save_checkpoint(
        model, out_dir, tokenizer_dir=model_dir, manifest=manifest, history=history, overwrite=overwrite
    )
    return TrainResult(Path(out_dir), manifest, history)
