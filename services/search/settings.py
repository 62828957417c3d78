"""Search service settings: environment variables ``CPL_SEARCH_*`` (docs/search-service.md), shared by the API
(``cpl serve search``) and the workers (``cpl worker``)."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import AdminTokenSettings, ApiKeySettings, ServerSettings


class SearchSettings(ServerSettings, ApiKeySettings, AdminTokenSettings):
    model_config = SettingsConfigDict(env_prefix="CPL_SEARCH_", extra="ignore", protected_namespaces=())

    port: int = Field(default=8003, ge=0, le=65535, description="port the search API listens on")

    # --- where things are --------------------------------------------------------------------------------
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis: store and Celery broker")
    key_prefix: str = Field(
        default="cpl:search", min_length=1, description="prefix of every Redis key (store and Celery queues)"
    )
    policy_url: str = Field(
        default="http://127.0.0.1:8001",
        description="the policy service: one URL, or its replicas' URLs separated by commas (least busy first)",
    )
    value_url: str = Field(
        default="http://127.0.0.1:8002",
        description="the value service: one URL, or its replicas' URLs separated by commas (least busy first)",
    )
    inference_api_key: SecretStr | None = Field(
        default=None, description="bearer token sent to the policy and value services (if they require one)"
    )

    # --- limits of a request -----------------------------------------------------------------------------
    max_question_chars: int = Field(default=4000, ge=1, description="longest question accepted")
    max_answer_chars: int = Field(default=1000, ge=1, description="longest ground-truth answer accepted")
    max_simulations: int = Field(default=1000, ge=1, description="most simulations one search may ask for")
    max_children: int = Field(default=16, ge=1, description="most candidates per expansion (root or not)")
    max_depth: int = Field(default=16, ge=1, description="deepest tree a search may ask for")
    max_step_tokens: int = Field(default=1024, ge=1, description="largest token limit of one step")
    max_batch_problems: int = Field(default=1000, ge=1, description="most problems in one batch")
    max_upload_bytes: int = Field(default=16 << 20, ge=1, description="largest JSONL upload")
    page_size_max: int = Field(default=200, ge=1, description="most searches in one page of GET /v1/searches")

    # --- search defaults (a request may override them) -----------------------------------------------------
    default_simulations: int = Field(default=200, ge=1, description="simulations of a search that names none")
    default_max_step_tokens: int | None = Field(
        default=None, ge=1, description="token limit of one step when a request names none (unset: 512)"
    )
    few_shot: bool | None = Field(
        default=None,
        description=(
            "prepend the demonstrations to prompts; unset: the served policy's own card decides "
            "(GET /v1/model `prompt.few_shot`), else the search default"
        ),
    )

    # --- the workers -------------------------------------------------------------------------------------
    worker_concurrency: int = Field(
        default=64, ge=1, description="trees one worker process searches at once (Celery threads)"
    )
    slice_seconds: float = Field(
        default=60.0, gt=0, description="a task searches this long, snapshots, and re-enqueues the rest"
    )
    visibility_timeout_s: int = Field(
        default=600,
        ge=1,
        description="an unacknowledged task is redelivered after this long (broker); must exceed a slice",
    )
    max_redeliveries: int = Field(
        default=3, ge=0, description="redeliveries of one slice (worker lost) before the search fails"
    )
    lease_ms: int = Field(default=15_000, ge=100, description="a worker's lease on a search, renewed while alive")
    snapshot_interval_s: float = Field(
        default=1.0, gt=0, description="most seconds between two snapshots of a running tree (live tree)"
    )
    stall_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "a slice in which no simulation completes for this long is abandoned (where its search waits is logged) "
            "and the search resumes from its last snapshot in a new delivery; unset: half the visibility timeout"
        ),
    )
    events_max: int = Field(default=1000, ge=10, description="events kept per search (stream trimmed, ~)")
    retention_days: float = Field(
        default=30.0, gt=0, description="finished searches and batches expire after this long"
    )
    client_timeout_s: float = Field(default=600.0, gt=0, description="worker -> inference request timeout")
    client_retries: int = Field(default=6, ge=0, description="retries of a failed inference request")
    client_max_backoff_s: float = Field(default=10.0, gt=0, description="longest wait between two retries")

    @property
    def stall_after_s(self) -> float:
        """The stall timeout in force (``stall_timeout_s``, else half the visibility timeout)."""
        return self.stall_timeout_s if self.stall_timeout_s is not None else self.visibility_timeout_s / 2

    @model_validator(mode="after")
    def _slices_fit_the_visibility_timeout(self) -> SearchSettings:
        # A slice that outlives the visibility timeout would be redelivered while it still runs.
        if self.visibility_timeout_s <= 2 * self.slice_seconds:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must be more than twice "
                f"slice_seconds ({self.slice_seconds})"
            )
        # A dead worker's lease must be free by the time its task is redelivered.
        if self.lease_ms >= self.visibility_timeout_s * 1000:
            raise ValueError(f"lease_ms ({self.lease_ms}) must be shorter than visibility_timeout_s")
        # A stalled slice keeps renewing its lease: it must give up before the broker redelivers its task.
        if self.stall_timeout_s is not None and self.stall_timeout_s >= self.visibility_timeout_s:
            raise ValueError(
                f"stall_timeout_s ({self.stall_timeout_s}) must be shorter than visibility_timeout_s "
                f"({self.visibility_timeout_s})"
            )
        return self

    @property
    def retention_s(self) -> int:
        return int(self.retention_days * 86400)

    def inference_token(self) -> str | None:
        return self.inference_api_key.get_secret_value() if self.inference_api_key else None
