"""The value model: MSE of V = tanh(score logit) against the MCTS values (``value.jsonl``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from cpl.losses import value_mse_loss
from cpl.training.checkpoint import check_model_dir, check_out_dir, save_checkpoint
from cpl.training.common import TrainResult, build_manifest, require_examples
from cpl.training.config import ValueConfig
from cpl.training.data import (
    TokenizedValue,
    ValueRow,
    read_rows,
    tokenize_values,
)
from cpl.training.loaders import load_tokenizer, load_value_model
from cpl.training.logps import pad
from cpl.training.loop import fit
from cpl.training.resume import FitHooks, bind_hooks
from cpl.training.runtime import Forward, TrainableModel, resolve_runtime
from cpl.values import value_from_logit

log = logging.getLogger(__name__)


def _value_forward(model: nn.Module, **batch: Tensor) -> Tensor:
    """V = tanh(score logit on the last non-pad token), float32, ``[B]``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return value_from_logit(logits[:, 0].float())


class ValueJob:
    kind = "value"

    def __init__(self, examples: Sequence[TokenizedValue], pad_id: int, device: torch.device) -> None:
        self.examples = list(examples)
        self.num_examples = len(self.examples)
        self.pad_id = pad_id
        self.device = device
        self.targets = torch.tensor([e.value for e in self.examples], dtype=torch.float32)

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        ids, mask = pad([self.examples[i].input_ids for i in indices], self.pad_id, self.device)
        return {"input_ids": ids, "attention_mask": mask}

    def normalizer(self, indices: Sequence[int]) -> float:
        return float(len(indices))

    def micro_step(self, engine: TrainableModel, indices: Sequence[int], normalizer: float) -> tuple[Tensor, dict]:
        predicted = engine(**self.batch(indices))
        target = self.targets[torch.as_tensor(list(indices))].to(predicted.device)
        mse = value_mse_loss(predicted, target)
        sse = mse * len(indices)
        return sse / normalizer, {"sse": float(sse.detach()), "states": float(len(indices))}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["sse"] / max(sums["states"], 1.0)}

    def num_tokens(self, indices: Sequence[int]) -> int:
        return sum(len(self.examples[i].input_ids) for i in indices)


@torch.no_grad()
def predict_values(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 16) -> list[float]:
    """V = tanh(logit) of a value model on ``texts``, batched (right padding)."""
    model.eval()
    device = next(model.parameters()).device
    ids = [list(x) for x in tokenizer(list(texts)).input_ids]
    out: list[float] = []
    for i in range(0, len(ids), batch_size):
        input_ids, mask = pad(ids[i : i + batch_size], model.config.pad_token_id, device)
        out += _value_forward(model, input_ids=input_ids, attention_mask=mask).tolist()
    return out


def train_value(
    model_dir: Path,
    data: Sequence[Path],
    out_dir: Path,
    config: ValueConfig | None = None,
    *,
    overwrite: bool = False,
    hooks: FitHooks | None = None,
) -> TrainResult:
    """MSE of the value model's tanh(logit) against MCTS values (``value.jsonl`` rows).

    ``model_dir`` is a value checkpoint (``*ForSequenceClassification``, ``num_labels=1``) or a causal LM, which
    gets a fresh score head first. The output has the layout of :func:`cpl.models.value_head.make_value_model`.
    """
    config = config or ValueConfig()
    model_dir = check_model_dir(model_dir)
    check_out_dir(out_dir, overwrite=overwrite)
    rows, files = read_rows(data, ValueRow)
    tokenizer = load_tokenizer(model_dir)
    examples, dropped = tokenize_values(tokenizer, rows, config.max_length)
    require_examples(examples, dropped, config)
    runtime = resolve_runtime(config)
    torch.manual_seed(config.seed)
    model = load_value_model(model_dir, runtime, seed=config.seed, gradient_checkpointing=config.gradient_checkpointing)
    groups = None
    if config.head_learning_rate is not None:
        head = [p for n, p in model.named_parameters() if n.startswith("score.")]
        body = [p for n, p in model.named_parameters() if not n.startswith("score.")]
        groups = [{"params": body}, {"params": head, "lr": config.head_learning_rate}]
    engine = TrainableModel(
        Forward(model, _value_forward), config, runtime, config.total_steps(len(examples)), param_groups=groups
    )
    job = ValueJob(examples, model.config.pad_token_id, runtime.torch_device)
    history, metrics = fit(job, engine, config, bind_hooks(hooks, "value", model_dir, files, config))
    manifest = build_manifest(
        "value", "value", model_dir, files, len(rows), len(examples), dropped, config, runtime, engine
    )
    manifest["metrics"] = metrics
    manifest = save_checkpoint(
        model, out_dir, tokenizer_dir=model_dir, manifest=manifest, history=history, overwrite=overwrite
    )
    return TrainResult(Path(out_dir), manifest, history)
