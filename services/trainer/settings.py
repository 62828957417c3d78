"""Trainer settings: environment variables ``CPL_TRAINER_*`` (docs/trainer-service.md).

The inference services' admin token lives here and nowhere else on the trainer/search side: the search API's
clients never see it; only the deployment coordinator sends it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CPL_TRAINER_", extra="ignore", protected_namespaces=())

    # --- checkpoints -------------------------------------------------------------------------------------
    checkpoint_root: Path = Field(
        description="published checkpoints are the directories directly under it; the inference services must "
        "see the same directory as their *_CHECKPOINT_ROOT"
    )
    base_policy: Path | None = Field(default=None, description="model a policy job named `base` starts from")
    base_value: Path | None = Field(
        default=None, description="model a value job named `base` starts from (default: the base policy)"
    )
    save_every_steps: int = Field(
        default=50, ge=1, description="a training job saves its resumable state every N optimizer steps"
    )
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads of a training job")

    # --- deployments -------------------------------------------------------------------------------------
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis of the deployment locks/records")
    key_prefix: str = Field(default="cpl:", description="prefix of every Redis key the trainer writes")
    policy_replicas: list[str] = Field(
        default_factory=list, description="policy replica URLs (JSON list), or one dns+http://NAME:PORT entry"
    )
    value_replicas: list[str] = Field(
        default_factory=list, description="value replica URLs (JSON list), or one dns+http://NAME:PORT entry"
    )
    admin_token: SecretStr | None = Field(default=None, description="bearer token of the services' /admin routes")
    admin_token_file: Path | None = Field(default=None, description="file holding the admin token instead")
    swap_timeout_s: float = Field(default=900.0, gt=0, description="how long one replica's swap may take")
    replica_retries: int = Field(
        default=2, ge=0, description="retries of a replica call that may be repeated (never of a swap)"
    )
    deploy_lock_ttl_s: float = Field(
        default=3600.0, gt=0, description="a deployment lock expires after this long (a coordinator that died)"
    )
    probe_max_tokens: int = Field(default=16, ge=1, description="tokens of the greedy probe of a policy replica")
    probe_value_tolerance: float = Field(
        default=1e-3, gt=0, description="largest |V_replica - V_transformers| a value replica's probe may show"
    )

    # --- the training API --------------------------------------------------------------------------------
    operator_keys: list[SecretStr] = Field(
        default_factory=list, description="bearer keys allowed on the training and deployment routes (JSON list)"
    )
    operator_keys_file: Path | None = Field(default=None, description="file with one operator key per line")
    max_upload_bytes: int = Field(default=256 << 20, ge=1, description="largest JSONL a training request carries")
    training_lease_s: float = Field(
        default=900.0,
        gt=0,
        description="a running job renews its lease at every step; a second delivery waits while it is live "
        "(longer than the slowest step, model load or reference pass)",
    )
    visibility_timeout_s: int = Field(
        default=3600, ge=1, description="the broker gives an unacknowledged train task to another worker after this"
    )

    @field_validator(
        "checkpoint_root", "base_policy", "base_value", "admin_token_file", "operator_keys_file", mode="after"
    )
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    def resolved_operator_keys(self) -> list[str]:
        keys = [k.get_secret_value() for k in self.operator_keys if k.get_secret_value()]
        if self.operator_keys_file is not None:
            keys += [line.strip() for line in self.operator_keys_file.read_text().splitlines() if line.strip()]
        return keys

    def resolved_admin_token(self) -> str | None:
        if self.admin_token is not None and self.admin_token.get_secret_value():
            return self.admin_token.get_secret_value()
        if self.admin_token_file is not None:
            return self.admin_token_file.read_text().strip() or None
        return None
