"""Shared fixtures: tiny models built once per session, and in-process vLLM engines started once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# This process's environment before any test ran: an engine started in-process must leave it as it was
# (cpl.engines.vllm_offline.environ_kept).
ENVIRON_AT_START = dict(os.environ)

# Stop markers of both formats get a logit bias in the test policy, so that sampled steps from a random-weight
# model actually end on a marker often (unbiased, a 943-token vocabulary almost never hits one). vLLM's raw
# log-probs are computed before the bias, so the recorded log-probs stay the model's own.
STOP_MARKER_BIAS = 3.0


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(policy_dir, value_dir) of a random-weight tiny Llama and its untrained value model."""
    from cpl.models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="module")
def vllm_engines(tiny_models: tuple[Path, Path]):
    """(VLLMPolicy, VLLMValue) on the tiny models, both in this process, float32, started once per module."""
    from cpl.engines import VLLMPolicy, VLLMValue
    from cpl.engines.vllm_offline import stop_marker_bias

    policy_dir, value_dir = tiny_models
    bias = stop_marker_bias(policy_dir, STOP_MARKER_BIAS)
    policy = VLLMPolicy(
        policy_dir,
        dtype="float32",
        max_model_len=4096,
        kv_cache_memory_bytes=128 << 20,
        extra_sampling={"logit_bias": bias},
        model_version="tiny-policy",
    )
    try:
        value = VLLMValue(value_dir, dtype="float32", max_model_len=4096, kv_cache_memory_bytes=64 << 20)
    except BaseException:
        policy.close()
        raise
    yield policy, value
    value.close()
    policy.close()
