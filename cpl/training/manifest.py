"""The typed schema of a checkpoint's ``manifest.json`` (written by :func:`cpl.training.checkpoint.save_checkpoint`).

One schema for every reader: the trainer service validates a manifest before publishing it, the API returns it,
a deployment reads the lineage from it. Unknown fields are kept (a publisher adds its own, e.g. the training id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class ParentCheckpoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str = Field(description="the starting model's directory")
    checkpoint_id: str | None = Field(default=None, description="its manifest's checkpoint_id (None: a base model)")
    kind: str | None = Field(default=None, description="the job that produced it (None: a base model)")


class DataFileEntry(BaseModel):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rows: int = Field(ge=0)


class DatasetStats(BaseModel):
    rows: int = Field(ge=0)
    used: int = Field(ge=0)
    dropped_too_long: int = Field(ge=0)


class Manifest(BaseModel):
    """What a published checkpoint records about how it was made."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    manifest_version: int
    checkpoint_id: str
    created_at: str
    kind: str = Field(description="sft, step-apo, step-dpo, dpo or value")
    model_type: str = Field(description="policy or value")
    base_model: str = Field(description="first model of the lineage")
    parent_checkpoint: ParentCheckpoint
    data: list[DataFileEntry] = Field(min_length=1)
    dataset: DatasetStats
    hyperparameters: dict[str, Any]
    runtime: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def read(cls, model_dir: Path) -> Manifest:
        return cls.model_validate(json.loads((Path(model_dir) / MANIFEST).read_text()))


def read_lineage_entry(model_dir: Path) -> dict[str, Any] | None:
    """The raw ``manifest.json`` of a starting model, or None for a base model (no manifest).

    Read leniently: only its ``checkpoint_id``, ``kind`` and ``base_model`` feed the next checkpoint's lineage,
    and a checkpoint written by an older trainer must still be a valid starting point.
    """
    path = Path(model_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
