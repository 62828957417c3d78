"""The training jobs: policy SFT, Step-APO (+ Step-DPO and response-level DPO baselines), value MSE.

Each job reads JSONL exports, trains with :class:`~cpl.training.runtime.TrainEngine` and writes an HF
checkpoint with a manifest (:mod:`cpl.training.checkpoint`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cpl.losses import dpo_loss, step_apo_loss, value_mse_loss
from cpl.training.checkpoint import check_model_dir, check_out_dir, lineage, save_checkpoint
from cpl.training.config import PreferenceConfig, SFTConfig, TrainConfig, ValueConfig
from cpl.training.data import (
    DataFile,
    PairRow,
    SFTRow,
    StepPairRow,
    TokenizedPair,
    TokenizedSFT,
    TokenizedValue,
    TrainingInputError,
    ValueRow,
    read_rows,
    tokenize_pairs,
    tokenize_sft,
    tokenize_values,
)
from cpl.training.logps import completion_logps, concat_batch, pad, pair_batch, pair_logps
from cpl.training.loop import fit
from cpl.training.resume import FitHooks, bind_hooks
from cpl.training.runtime import Forward, Runtime, TrainEngine, resolve_runtime
from cpl.values import value_from_logit

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a job returns: where the checkpoint is, its manifest and the per-step log."""

    out_dir: Path
    manifest: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest["metrics"]


# --- model loading ---------------------------------------------------------------------------------------


def _architecture(model_dir: Path) -> str:
    from transformers import AutoConfig

    archs = AutoConfig.from_pretrained(model_dir).architectures or []
    return archs[0] if archs else ""


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None:
        raise TrainingInputError(f"{model_dir}: the tokenizer has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(model_dir: Path, runtime: Runtime, *, gradient_checkpointing: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from cpl.models.tiny import quiet_transformers

    if _architecture(model_dir).endswith("ForSequenceClassification"):
        raise TrainingInputError(f"--model {model_dir}: a value model; policy jobs need a causal LM")
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=runtime.load_dtype, attn_implementation=runtime.attn_implementation
        )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_value_model(model_dir: Path, runtime: Runtime, *, seed: int = 0, gradient_checkpointing: bool = False):
    """A value checkpoint as is, or a causal LM turned into one (fresh score head, :func:`make_value_model`)."""
    from transformers import AutoModelForSequenceClassification

    from cpl.models.tiny import quiet_transformers
    from cpl.models.value_head import make_value_model

    arch = _architecture(model_dir)
    with tempfile.TemporaryDirectory(prefix="cpl-value-init-") as tmp:
        if arch.endswith("ForCausalLM"):
            source = make_value_model(model_dir, Path(tmp) / "value", seed=seed)
        elif arch.endswith("ForSequenceClassification"):
            source = model_dir
        else:
            raise TrainingInputError(f"--model {model_dir}: unknown architecture {arch!r}")
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                source, dtype=runtime.load_dtype, attn_implementation=runtime.attn_implementation
            )
    if model.config.num_labels != 1:
        raise TrainingInputError(f"--model {model_dir}: a classifier with {model.config.num_labels} labels, not 1")
    if model.config.pad_token_id is None:
        raise TrainingInputError(f"--model {model_dir}: value model config has no pad_token_id")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        out["cpl"] = importlib.metadata.version("cpl")
    except importlib.metadata.PackageNotFoundError:
        out["cpl"] = "unknown"
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return out


# --- SFT -------------------------------------------------------------------------------------------------


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

    def micro_step(self, engine: TrainEngine, indices: Sequence[int], normalizer: float) -> tuple[Tensor, dict]:
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
    _require_examples(examples, dropped, config)
    runtime = resolve_runtime(config)
    torch.manual_seed(config.seed)
    model = load_policy(model_dir, runtime, gradient_checkpointing=config.gradient_checkpointing)
    engine = TrainEngine(Forward(model, _sft_forward), config, runtime, config.total_steps(len(examples)))
    job = SFTJob(examples, tokenizer.pad_token_id, runtime.torch_device)
    history, metrics = fit(job, engine, config, bind_hooks(hooks, "sft", model_dir, files, config))
    manifest = _manifest("sft", "policy", model_dir, files, len(rows), len(examples), dropped, config, runtime, engine)
    manifest["metrics"] = metrics
    manifest = save_checkpoint(
        model, out_dir, tokenizer_dir=model_dir, manifest=manifest, history=history, overwrite=overwrite
    )
    return TrainResult(Path(out_dir), manifest, history)


# --- preference jobs -------------------------------------------------------------------------------------


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
    def compute_reference(self, engine: TrainEngine, batch_size: int) -> None:
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

    def micro_step(self, engine: TrainEngine, indices: Sequence[int], normalizer: float) -> tuple[Tensor, dict]:
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
    _require_examples(pairs, dropped, config)
    runtime = resolve_runtime(config)
    torch.manual_seed(config.seed)
    model = load_policy(model_dir, runtime, gradient_checkpointing=config.gradient_checkpointing)
    engine = TrainEngine(Forward(model, _pair_forward), config, runtime, config.total_steps(len(pairs)))
    job = PreferenceJob(pairs, config, tokenizer.pad_token_id, runtime.torch_device)
    start = time.perf_counter()
    job.compute_reference(engine, config.reference_batch_size or 2 * config.micro)
    reference_seconds = time.perf_counter() - start
    history, metrics = fit(job, engine, config, bind_hooks(hooks, config.loss, model_dir, files, config))
    metrics["reference_seconds"] = round(reference_seconds, 3)
    manifest = _manifest(
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


# --- value -----------------------------------------------------------------------------------------------


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

    def micro_step(self, engine: TrainEngine, indices: Sequence[int], normalizer: float) -> tuple[Tensor, dict]:
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
    _require_examples(examples, dropped, config)
    runtime = resolve_runtime(config)
    torch.manual_seed(config.seed)
    model = load_value_model(model_dir, runtime, seed=config.seed, gradient_checkpointing=config.gradient_checkpointing)
    groups = None
    if config.head_learning_rate is not None:
        head = [p for n, p in model.named_parameters() if n.startswith("score.")]
        body = [p for n, p in model.named_parameters() if not n.startswith("score.")]
        groups = [{"params": body}, {"params": head, "lr": config.head_learning_rate}]
    engine = TrainEngine(
        Forward(model, _value_forward), config, runtime, config.total_steps(len(examples)), param_groups=groups
    )
    job = ValueJob(examples, model.config.pad_token_id, runtime.torch_device)
    history, metrics = fit(job, engine, config, bind_hooks(hooks, "value", model_dir, files, config))
    manifest = _manifest("value", "value", model_dir, files, len(rows), len(examples), dropped, config, runtime, engine)
    manifest["metrics"] = metrics
    manifest = save_checkpoint(
        model, out_dir, tokenizer_dir=model_dir, manifest=manifest, history=history, overwrite=overwrite
    )
    return TrainResult(Path(out_dir), manifest, history)


# --- shared ----------------------------------------------------------------------------------------------


def _require_examples(examples: Sequence[object], dropped: int, config: TrainConfig) -> None:
    if not examples:
        raise TrainingInputError(
            f"empty dataset: all {dropped} examples are longer than --max-length {config.max_length}"
        )
    if dropped:
        log.warning("dropped %d examples longer than max_length=%d", dropped, config.max_length)


def _manifest(
    kind: str,
    model_type: str,
    model_dir: Path,
    files: Sequence[DataFile],
    rows: int,
    used: int,
    dropped: int,
    config: TrainConfig,
    runtime: Runtime,
    engine: TrainEngine,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "model_type": model_type,
        **lineage(model_dir),
        "data": [f.as_dict() for f in files],
        "dataset": {"rows": rows, "used": used, "dropped_too_long": dropped},
        "hyperparameters": config.model_dump(mode="json"),
        "runtime": {**runtime.as_dict(), "versions": _versions(), "deepspeed_config": engine.ds_config},
    }


TRAINERS = {
    "sft": train_sft,
    "step-apo": train_preference,
    "step-dpo": train_preference,
    "dpo": train_preference,
    "value": train_value,
}
