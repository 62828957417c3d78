"""Resumable training: the training state saved every N optimizer steps, and loaded when a job restarts.

A killed job (SIGKILL, a lost machine) restarts from its last saved step instead of from the start. The state is
one file, ``state.pt`` (model weights, optimizer, LR schedule, RNG states, the loop's counters and per-step log),
written to a temporary name and moved into place with :func:`os.replace`, so a kill while saving leaves the
previous state intact. Under DeepSpeed the engine's own ``save_checkpoint`` / ``load_checkpoint`` hold the model
and optimizer (one tag per saved step) and ``state.pt`` the rest.

The state is tied to its job by a fingerprint (job kind, starting model, data sha256s, hyperparameters): a state
left by another job is refused rather than silently continued. The state is not a checkpoint: a serving engine
cannot load it (no ``config.json``, not safetensors); only a finished job publishes a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cpl.training.config import TrainConfig
from cpl.training.data import DataFile, TrainingInputError
from cpl.training.runtime import TrainableModel

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"
# Settings that do not change what is computed: a job restarted with another value continues the same run.
_RUN_ONLY_FIELDS = frozenset({"progress"})


def fingerprint(kind: str, model_dir: Path, files: Sequence[DataFile], config: TrainConfig) -> str:
    """What makes two runs the same run: kind, starting model, data contents, hyperparameters."""
    hyper = {k: v for k, v in config.model_dump(mode="json").items() if k not in _RUN_ONLY_FIELDS}
    key = {
        "kind": kind,
        "model": str(Path(model_dir).resolve()),
        "data": [f.sha256 for f in files],
        "hyperparameters": hyper,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass
class LoopState:
    """The training loop's counters, restored with the weights so a resumed run's log and metrics are whole."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    epoch_sums: dict[str, float] = field(default_factory=dict)
    tokens_seen: int = 0
    examples_seen: int = 0
    elapsed_s: float = 0.0
    resumed_from_step: int | None = None


class TrainState:
    """The saved training state of one job in ``directory``; saved every ``every`` optimizer steps."""

    def __init__(self, directory: Path, every: int) -> None:
        if every < 1:
            raise TrainingInputError(f"save_every must be a positive number of steps, got {every}")
        self.directory = Path(directory)
        self.every = every
        self.fingerprint: str | None = None

    def bind(self, fingerprint: str) -> None:
        """Tie the state to one run (called by the job once its data and config are known)."""
        self.fingerprint = fingerprint

    @property
    def saved_step(self) -> int | None:
        """The step of the saved state, from its progress file (None: nothing saved)."""
        path = self.directory / PROGRESS_FILE
        if not path.is_file():
            return None
        return int(json.loads(path.read_text())["step"])

    def due(self, step: int, total: int) -> bool:
        """Save after this step? (Never after the last one: the finished job publishes its checkpoint instead.)"""
        return step < total and step % self.every == 0

    # --- save / load ---------------------------------------------------------------------------------------

    def save(self, engine: TrainableModel, loop: LoopState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "loop": loop.__dict__,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate(),
            },
        }
        ds = engine._engine
        if ds is not None:
            tag = f"step{loop.step}"
            ds.save_checkpoint(str(self.directory / "deepspeed"), tag=tag)
            payload["deepspeed_tag"] = tag
        else:
            payload["model"] = engine.model.state_dict()
            payload["optimizer"] = engine.optimizer.state_dict()
        payload["scheduler"] = engine.scheduler.state_dict()
        tmp = self.directory / f".{STATE_FILE}.tmp"
        with tmp.open("wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.directory / STATE_FILE)
        progress = self.directory / f".{PROGRESS_FILE}.tmp"
        progress.write_text(json.dumps({"step": loop.step, "fingerprint": self.fingerprint}))
        os.replace(progress, self.directory / PROGRESS_FILE)
        if ds is not None:
            self._drop_old_deepspeed_tags(keep=payload["deepspeed_tag"])

    def load(self, engine: TrainableModel) -> LoopState | None:
        """Restore the engine from the saved state; None when there is none."""
        path = self.directory / STATE_FILE
        if not path.is_file():
            return None
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if payload.get("fingerprint") != self.fingerprint:
            raise TrainingInputError(
                f"the training state in {self.directory} belongs to another run (other model, data or "
                "hyperparameters); remove it to start over"
            )
        ds = engine._engine
        if ds is not None:
            ds.load_checkpoint(str(self.directory / "deepspeed"), tag=payload["deepspeed_tag"])
        else:
            engine.model.load_state_dict(payload["model"])
            engine.optimizer.load_state_dict(payload["optimizer"])
        engine.scheduler.load_state_dict(payload["scheduler"])
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        loop = LoopState(**payload["loop"])
        loop.resumed_from_step = loop.step
        return loop

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _drop_old_deepspeed_tags(self, keep: str) -> None:
        root = self.directory / "deepspeed"
        for child in root.iterdir():
            if child.is_dir() and child.name != keep:
                shutil.rmtree(child, ignore_errors=True)


@dataclass
class FitHooks:
    """Optional extras of a job run: a resumable state, and a callback after every optimizer step.

    ``on_step(record, total_steps)`` gets the step's log record (step, epoch, loss, lr, ...); a service uses it
    to report progress.
    """

    state: TrainState | None = None
    on_step: Callable[[dict[str, Any], int], None] | None = None


def bind_hooks(
    hooks: FitHooks | None, kind: str, model_dir: Path, files: Sequence[DataFile], config: TrainConfig
) -> FitHooks | None:
    """Tie ``hooks.state`` (if any) to this run; returns ``hooks`` for :func:`cpl.training.loop.fit`."""
    if hooks is not None and hooks.state is not None:
        hooks.state.bind(fingerprint(kind, model_dir, files, config))
    return hooks
