"""The search service's API bodies and stored records (one schema per thing: the API answers the records the
store holds; trees are :class:`cpl.tree.Tree`, export rows are :mod:`cpl.schemas`)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from cpl.config import SEED_MAX, PriorMode
from cpl.formats import PromptFormat
from cpl.search_stats import SearchStats


class SearchStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({SearchStatus.SUCCEEDED, SearchStatus.FAILED, SearchStatus.CANCELLED})


class SearchOverrides(BaseModel):
    """Search settings a request may set (the others are the service's); bounds are settings of the service."""

    model_config = ConfigDict(extra="forbid")

    c_puct: float | None = Field(default=None, gt=0, le=100, description="PUCT exploration constant (eq. 1)")
    root_children: int | None = Field(default=None, ge=1, description="candidates sampled at the root")
    children: int | None = Field(default=None, ge=1, description="candidates sampled at other nodes")
    draw_budget: float | None = Field(
        default=None,
        ge=1.0,
        le=8.0,
        description="samples an expansion may draw for distinct steps, as a multiple of its count (1: one round)",
    )
    temperature: float | None = Field(default=None, ge=0.0, le=5.0, description="sampling temperature")
    max_depth: int | None = Field(default=None, ge=1, description="a node at max_depth - 1 may only solve")
    max_step_tokens: int | None = Field(default=None, ge=1, description="token limit of one step")
    prior: PriorMode | None = Field(default=None, description="how pi(a|s) is computed")
    few_shot: bool | None = Field(default=None, description="prepend the demonstrations to prompts")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description="search seed: the same seed and settings give the same tree (unset: unseeded sampling)",
    )


class SearchCreate(BaseModel):
    """``POST /v1/searches``: one problem."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, description="the problem (at most CPL_SEARCH_MAX_QUESTION_CHARS)")
    answer: str | None = Field(
        default=None,
        min_length=1,
        description="ground-truth answer; without it the search runs in inference mode (no rewards)",
    )
    format: PromptFormat | None = Field(default=None, description="prompt format: plain or xml")
    simulations: int | None = Field(default=None, ge=1, description="simulations (at most CPL_SEARCH_MAX_SIMULATIONS)")
    settings: SearchOverrides | None = Field(default=None, description="other search settings")
    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="idempotency key: the same id returns the same search, nothing is queued twice",
    )


class Progress(BaseModel):
    simulations_done: int = 0
    simulations_total: int
    nodes: int = 1


class BestAnswer(BaseModel):
    """The highest-value solution of the tree (visits break ties)."""

    answer: str | None
    value: float
    correct: bool | None = Field(description="None in inference mode")
    node_id: int
    plan: list[str] = Field(description="the step texts from the root to the solution")


class ErrorInfo(BaseModel):
    code: str
    message: str


class ModelVersions(BaseModel):
    policy: list[str] = Field(default_factory=list)
    value: list[str] = Field(default_factory=list)


class SearchRecord(BaseModel):
    """``GET /v1/searches/{id}``: the search as the store holds it."""

    id: str
    status: SearchStatus
    question: str
    answer: str | None = None
    config: dict = Field(description="the search settings (cpl.config.SearchConfig)")
    progress: Progress
    best: BestAnswer | None = None
    root_value: float | None = None
    model_versions: ModelVersions = Field(default_factory=ModelVersions)
    error: ErrorInfo | None = None
    batch_id: str | None = None
    problem_id: str | None = Field(default=None, description="the problem's id in its batch (its file's `id`)")
    request_id: str | None = None
    tree_stats: SearchStats | None = Field(default=None, description="Table 1 of the finished tree")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    snapshot_bytes: int = Field(default=0, description="size of the stored (compressed) tree snapshot")
    attempts: int = Field(default=0, description="deliveries of this search's tasks to a worker")


class SearchPage(BaseModel):
    searches: list[SearchRecord]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class ProblemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1)
    answer: str | None = Field(default=None, min_length=1)
    id: str | None = Field(default=None, min_length=1, max_length=200, description="the problem's own id")


class BatchCreate(BaseModel):
    """``POST /v1/batches`` (JSON): many problems, one search each, the same settings for all."""

    model_config = ConfigDict(extra="forbid")

    problems: list[ProblemIn] = Field(min_length=1, description="at most CPL_SEARCH_MAX_BATCH_PROBLEMS")
    format: PromptFormat | None = None
    simulations: int | None = Field(default=None, ge=1)
    settings: SearchOverrides | None = None
    request_id: str | None = Field(default=None, min_length=1, max_length=200)


class BatchRecord(BaseModel):
    id: str
    total: int
    counts: dict[SearchStatus, int]
    done: bool = Field(description="every search of the batch is final")
    accuracy: float | None = Field(description="share of finished searches with a known answer whose best is correct")
    graded: int = Field(description="finished searches with a known answer")
    stats: SearchStats = Field(description="the paper's Table 1 over the finished trees (as cpl search reports it)")
    config: dict
    request_id: str | None = None
    created_at: datetime


class CancelResult(BaseModel):
    id: str
    status: SearchStatus


class BatchCancelResult(BaseModel):
    id: str
    cancelled: int = Field(description="searches asked to stop (already final ones are left alone)")
