"""Checkpoints: HF format (weights as safetensors + config + tokenizer) and a ``manifest.json``.

A checkpoint is written to a temporary sibling directory and renamed into place at the end, so a reader (a
hot-swap) never sees a half-written directory. The manifest records the job kind, the base model (the first
model of the lineage, followed through the parents' manifests), the parent checkpoint, the data files with
their sha256, the hyperparameters, the runtime, the final metrics and the creation time.
"""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch import nn

from cpl.models.hf import copy_tokenizer, quiet_transformers
from cpl.training.data import TrainingInputError
from cpl.training.manifest import MANIFEST, MANIFEST_VERSION, Manifest, read_lineage_entry

TRAIN_LOG = "train_log.jsonl"


def lineage(model_dir: Path) -> dict[str, Any]:
    """``base_model`` and ``parent_checkpoint`` entries for a job starting from ``model_dir``."""
    model_dir = Path(model_dir).resolve()
    parent = read_lineage_entry(model_dir)
    parent_entry = {
        "path": str(model_dir),
        "checkpoint_id": parent.get("checkpoint_id") if parent else None,
        "kind": parent.get("kind") if parent else None,
    }
    base = parent.get("base_model") if parent else None
    return {"base_model": base or str(model_dir), "parent_checkpoint": parent_entry}


def check_model_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise TrainingInputError(f"--model {model_dir}: not a model directory (no config.json)")
    return model_dir


def check_out_dir(out_dir: Path, *, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise TrainingInputError(f"--out {out_dir}: exists and is not empty (pass --overwrite to replace it)")
    return out_dir


def save_checkpoint(
    model: nn.Module,
    out_dir: Path,
    *,
    tokenizer_dir: Path,
    manifest: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write ``model`` (a transformers model) + tokenizer + manifest to ``out_dir`` atomically.

    Returns the manifest as written (with ``checkpoint_id`` and ``created_at`` added)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        _clean_config(tmp / "config.json")
        copy_tokenizer(tokenizer_dir, tmp)
        full = {
            "manifest_version": MANIFEST_VERSION,
            "checkpoint_id": uuid.uuid4().hex,
            "created_at": datetime.now(UTC).isoformat(),
            **manifest,
        }
        # the contract between trainer and servers holds before anything is written
        typed = Manifest.model_validate(full)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, default=str) + "\n")
        if history is not None:
            with (tmp / TRAIN_LOG).open("w") as f:
                for row in history:
                    f.write(json.dumps(row) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return typed


def _clean_config(path: Path) -> None:
    """A checkpoint trained with FlashAttention-2 must still load where flash_attn is missing (CPU, vLLM)."""
    config = json.loads(path.read_text())
    changed = False
    for key in ("_attn_implementation", "attn_implementation", "_attn_implementation_internal"):
        if key in config:
            del config[key]
            changed = True
    if changed:
        path.write_text(json.dumps(config, indent=2) + "\n")
