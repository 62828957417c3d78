"""What every training job shares: its result, the dataset check and the checkpoint manifest."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cpl.training.checkpoint import lineage
from cpl.training.config import TrainConfig
from cpl.training.data import DataFile, TrainingInputError
from cpl.training.manifest import Manifest
from cpl.training.runtime import Runtime, TrainableModel

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a job returns: where the checkpoint is, its manifest and the per-step log."""

    out_dir: Path
    manifest: Manifest
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.metrics


def library_versions() -> dict[str, str]:
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


def require_examples(examples: Sequence[object], dropped: int, config: TrainConfig) -> None:
    if not examples:
        raise TrainingInputError(
            f"empty dataset: all {dropped} examples are longer than --max-length {config.max_length}"
        )
    if dropped:
        log.warning("dropped %d examples longer than max_length=%d", dropped, config.max_length)


def build_manifest(
    kind: str,
    model_type: str,
    model_dir: Path,
    files: Sequence[DataFile],
    rows: int,
    used: int,
    dropped: int,
    config: TrainConfig,
    runtime: Runtime,
    engine: TrainableModel,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "model_type": model_type,
        **lineage(model_dir),
        "data": [f.as_dict() for f in files],
        "dataset": {"rows": rows, "used": used, "dropped_too_long": dropped},
        "hyperparameters": config.model_dump(mode="json"),
        "runtime": {**runtime.as_dict(), "versions": library_versions(), "deepspeed_config": engine.ds_config},
    }
