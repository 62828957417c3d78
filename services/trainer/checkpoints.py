"""The checkpoint root as the trainer sees it: published checkpoints, and the hidden work areas of jobs.

Layout (one filesystem, so publishing is one ``rename``)::

    ROOT/<name>/                  published checkpoints (HF layout + manifest.json), never modified afterwards
    ROOT/.staging/<training id>/  a job's output while it is written (hidden: servers refuse dot-paths)
    ROOT/.resume/<training id>/   a job's resumable training state (not a model directory)

A checkpoint appears under its name only when it is complete; a job killed at any point leaves only hidden
directories, which its restart reuses or removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cpl.training.checkpoint import MANIFEST
from cpl.training.manifest import Manifest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STAGING = ".staging"
RESUME = ".resume"


class CheckpointNameError(ValueError):
    """A checkpoint name that is malformed (400), unknown (404) or already taken (409)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_name(name: str) -> str:
    """A checkpoint name: one path component of letters, digits, ``._-``, not starting with a dot, no ``..``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise CheckpointNameError(
            400,
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit, without '..' or '/'",
        )
    return name


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / MANIFEST).is_file()

    def published(self, name: str) -> Path:
        """The directory of the published checkpoint ``name`` (404 when there is none)."""
        path = self.path(name)
        if not (path / MANIFEST).is_file():
            raise CheckpointNameError(404, f"no published checkpoint named {name!r} under {self.root}")
        return path

    def manifest(self, name: str) -> Manifest:
        return Manifest.read(self.published(name))

    def names(self) -> list[str]:
        """Published checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime)]

    def staging(self, training_id: str) -> Path:
        return self.root / STAGING / check_name(training_id)

    def resume_dir(self, training_id: str) -> Path:
        return self.root / RESUME / check_name(training_id)

    def publish(self, staged: Path, name: str, extra: dict[str, Any]) -> Manifest:
        """Add ``extra`` to the staged manifest, check it, and rename the directory to ``ROOT/<name>``."""
        target = self.path(name)
        manifest_path = Path(staged) / MANIFEST
        data = json.loads(manifest_path.read_text())
        data.update(extra)
        try:
            manifest = Manifest.model_validate(data)
        except ValidationError as exc:
            raise RuntimeError(f"the staged checkpoint's manifest is invalid: {exc}") from exc
        tmp = manifest_path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, manifest_path)
        if target.exists():
            raise CheckpointNameError(409, f"a checkpoint named {name!r} exists already; published ones are kept")
        # rename(2) is atomic; onto an existing empty directory it would succeed, so that case is refused above
        os.rename(staged, target)
        return manifest

    def discard(self, training_id: str) -> None:
        shutil.rmtree(self.staging(training_id), ignore_errors=True)
        shutil.rmtree(self.resume_dir(training_id), ignore_errors=True)
