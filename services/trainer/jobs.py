"""One training job as the stack runs it: resumable, published into the checkpoint root only when complete.

:func:`run_training` is what the ``train`` queue's task calls (and ``python -m services.trainer.run`` on the
command line). Run again with the same training id after a kill, it continues from the last saved step; run
again after it had already published, it returns the published checkpoint's manifest without training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError

from cpl.training.checkpoint import MANIFEST
from cpl.training.config import JobKind, config_for
from cpl.training.data import TrainingInputError
from cpl.training.jobs import TRAINERS
from cpl.training.manifest import Manifest
from cpl.training.resume import FitHooks, TrainState
from services.trainer.checkpoints import NAME_RE, CheckpointNameError, CheckpointStore, check_name
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

StepCallback = Callable[[dict[str, Any], int], None]


class TrainingSpec(BaseModel):
    """What to train: the job kind, the model to start from, the data, the output name, the overrides."""

    id: str = Field(pattern=NAME_RE.pattern, description="training id; a restart with the same id resumes")
    kind: JobKind
    model: str = Field(default="base", description="`base`, or the name of a published checkpoint")
    data: list[Path] = Field(min_length=1, description="JSONL files in the format of docs/data-formats.md")
    name: str = Field(pattern=NAME_RE.pattern, description="name the checkpoint is published under")
    overrides: dict[str, Any] = Field(default_factory=dict, description="hyperparameters over the job's defaults")


def starting_model(spec: TrainingSpec, settings: TrainerSettings, store: CheckpointStore) -> Path:
    if spec.model != "base":
        return store.published(spec.model)
    base = (settings.base_value or settings.base_policy) if spec.kind == "value" else settings.base_policy
    if base is None:
        raise TrainingInputError("no base model configured (CPL_TRAINER_BASE_POLICY)")
    return base


def build_config(spec: TrainingSpec):
    try:
        return config_for(spec.kind, **{**spec.overrides, "progress": False})
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise TrainingInputError(f"invalid hyperparameters: {where}") from exc


def run_training(spec: TrainingSpec, settings: TrainerSettings, on_step: StepCallback | None = None) -> Manifest:
    """Train (or resume) and publish ``ROOT/<spec.name>``; returns the published manifest."""
    store = CheckpointStore(settings.checkpoint_root)
    check_name(spec.name)
    if store.exists(spec.name):
        manifest = store.manifest(spec.name)
        if (manifest.model_extra or {}).get("training_id") == spec.id:
            log.info("training already published", extra={"training_id": spec.id, "checkpoint": spec.name})
            return manifest
        raise CheckpointNameError(409, f"a checkpoint named {spec.name!r} exists already")
    model_dir = starting_model(spec, settings, store)
    config = build_config(spec)
    staging = store.staging(spec.id)
    out_dir = staging / "model"
    if not (out_dir / MANIFEST).is_file():  # else: trained and saved, killed before publishing
        staging.mkdir(parents=True, exist_ok=True)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        state = TrainState(store.resume_dir(spec.id), every=settings.save_every_steps)
        if state.saved_step is not None:
            log.info("resuming training", extra={"training_id": spec.id, "step": state.saved_step})
        TRAINERS[spec.kind](model_dir, spec.data, out_dir, config, overwrite=True, hooks=FitHooks(state, on_step))
    manifest = store.publish(
        out_dir, spec.name, {"training_id": spec.id, "name": spec.name, "started_from": spec.model}
    )
    store.discard(spec.id)
    log.info("checkpoint published", extra={"training_id": spec.id, "checkpoint": spec.name})
    return manifest
