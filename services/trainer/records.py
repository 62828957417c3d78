"""Training records in Redis: one schema (:class:`TrainingRecord`) for the API, the store and the train task.

Keys (all under the configured prefix): ``{prefix}training:{id}`` (the record, JSON), ``{prefix}trainings``
(sorted set of ids by creation time), ``{prefix}training-cancel:{id}`` (present when a cancel was asked; read by
the running job after every step).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from cpl.training.config import JobKind

TrainingStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


def now() -> str:
    return datetime.now(UTC).isoformat()


class TrainingRecord(BaseModel):
    id: str
    status: TrainingStatus = "queued"
    kind: JobKind
    model: str = Field(description="`base` or the published checkpoint the job starts from")
    data: list[str] = Field(description="dataset files (under the checkpoint root's upload area)")
    data_rows: int = 0
    name: str = Field(description="name the checkpoint is published under")
    overrides: dict[str, Any] = Field(default_factory=dict)
    deploy: bool = False
    step: int = 0
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    eta_s: float | None = None
    loss_curve: list[tuple[int, float]] = Field(default_factory=list, description="(step, loss), thinned")
    resumed_from_step: int | None = None
    metrics: dict[str, Any] | None = None
    checkpoint: str | None = Field(default=None, description="the published checkpoint's name once done")
    manifest: dict[str, Any] | None = None
    deployment_id: str | None = None
    error: str | None = None
    created_at: str = Field(default_factory=now)
    updated_at: str = Field(default_factory=now)
    attempts: int = 0

    @property
    def data_paths(self) -> list[Path]:
        return [Path(p) for p in self.data]


class TrainingStore:
    """Synchronous store (the train task runs in a worker thread); the API calls it through a thread too."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix

    def key(self, training_id: str) -> str:
        return f"{self.prefix}training:{training_id}"

    def cancel_key(self, training_id: str) -> str:
        return f"{self.prefix}training-cancel:{training_id}"

    @property
    def index(self) -> str:
        return f"{self.prefix}trainings"

    def create(self, record: TrainingRecord) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key(record.id), record.model_dump_json())
            pipe.zadd(self.index, {record.id: time.time()})
            pipe.execute()

    def save(self, record: TrainingRecord) -> None:
        record.updated_at = now()
        self.redis.set(self.key(record.id), record.model_dump_json())

    def get(self, training_id: str) -> TrainingRecord | None:
        raw = self.redis.get(self.key(training_id))
        return None if raw is None else TrainingRecord.model_validate_json(raw)

    def list(self, limit: int = 100) -> list[TrainingRecord]:
        ids = self.redis.zrevrange(self.index, 0, limit - 1)
        found = [self.get(i.decode() if isinstance(i, bytes) else i) for i in ids]
        return [r for r in found if r is not None]

    def request_cancel(self, training_id: str) -> None:
        self.redis.set(self.cancel_key(training_id), "1")

    def cancel_requested(self, training_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(training_id)))
