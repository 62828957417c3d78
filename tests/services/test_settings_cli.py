"""Settings from the environment, the vLLM command line, the `serve` argparse wiring, JSON logs."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from services.cli import add_serve_parser, overrides_from_args
from services.common.logging import JsonFormatter
from services.gateway.vllm_process import vllm_command
from services.policy.settings import PolicySettings
from services.value.settings import ValueSettings


def test_settings_come_from_prefixed_environment(monkeypatch, tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("CPL_POLICY_MODEL", "/models/p")
    monkeypatch.setenv("CPL_POLICY_PORT", "9001")
    monkeypatch.setenv("CPL_POLICY_VLLM_EXTRA_ARGS", '["--max-num-batched-tokens", "8192"]')
    monkeypatch.setenv("CPL_POLICY_ADMIN_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("CPL_VALUE_MODEL", "/models/v")
    policy = PolicySettings()
    assert policy.model == Path("/models/p") and policy.port == 9001
    assert policy.vllm_extra_args == ["--max-num-batched-tokens", "8192"]
    assert policy.resolved_admin_token() == "from-file"
    assert policy.served_model_name == "policy" and policy.logprobs_mode == "raw_logprobs"
    value = ValueSettings()
    assert value.model == Path("/models/v") and value.port == 8002 and value.resolved_admin_token() is None
    monkeypatch.setenv("CPL_POLICY_ADMIN_TOKEN", "direct")
    assert PolicySettings().resolved_admin_token() == "direct"


def test_model_is_required(monkeypatch):
    monkeypatch.delenv("CPL_VALUE_MODEL", raising=False)
    with pytest.raises(ValueError, match="model"):
        ValueSettings()


def test_vllm_command_line():
    settings = PolicySettings(model=Path("/m"), kv_cache_memory_bytes=1 << 30, enforce_eager=True, dtype="float32")
    cmd = vllm_command(
        settings, runner="generate", model=Path("/m"), port=1234, extra=["--logprobs-mode", "raw_logprobs"]
    )
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in (
        "--model /m",
        "--served-model-name policy",
        "--host 127.0.0.1 --port 1234",
        "--max-model-len 4096",
        "--gpu-memory-utilization 0.9",
        "--enable-prefix-caching",
        "--generation-config vllm",
        "--kv-cache-memory-bytes 1073741824",
        "--enforce-eager",
        "--logprobs-mode raw_logprobs",
        "--dtype float32",
    ):
        assert part in joined
    assert "--runner" not in cmd
    pooling = vllm_command(
        ValueSettings(model=Path("/v"), enable_prefix_caching=False), runner="pooling", model=Path("/v"), port=1
    )
    assert "--runner pooling" in " ".join(pooling) and "--no-enable-prefix-caching" in pooling


def test_serve_parser_maps_flags_to_settings():
    parser = argparse.ArgumentParser(prog="cpl")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["serve", "value", "--model", "/v", "--port", "9100", "--checkpoint-root", "/ck", "--no-prefix-caching"]
    )
    assert args.service == "value" and callable(args.func)
    assert overrides_from_args(args) == {
        "model": Path("/v"),
        "port": 9100,
        "checkpoint_root": Path("/ck"),
        "enable_prefix_caching": False,
    }
    args = parser.parse_args(["serve", "policy"])
    assert overrides_from_args(args) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "other"])


def test_json_log_lines():
    record = logging.LogRecord("svc", logging.WARNING, __file__, 1, "swap %s", ("refused",), None)
    record.path = "../x"
    line = json.loads(JsonFormatter("policy").format(record))
    assert line["msg"] == "swap refused" and line["level"] == "WARNING" and line["service"] == "policy"
    assert line["path"] == "../x" and "ts" in line
