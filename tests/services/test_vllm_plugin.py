"""The vLLM general plugin that sets how long vLLM's processes spin (services/gateway/vllm_plugin.py), loaded the
way vLLM loads it: through the entry point, by ``vllm.plugins.load_general_plugins`` in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.gateway.vllm_plugin import ENV, busy_loop_from_env

PROBE = """
import zmq
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
from vllm.plugins import load_general_plugins

load_general_plugins()
reader = SpinCondition(is_reader=True, context=zmq.Context(), notify_address="ipc:///tmp/cpl-plugin-probe")
print("busy_loop_s", reader.busy_loop_s)
"""


def _probe(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if value is not None:
        env[ENV] = value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.vllm
@pytest.mark.parametrize(("value", "expected"), [(None, "1"), ("0.002", "0.002")])
def test_the_plugin_sets_the_readers_busy_loop(value, expected):
    result = _probe(value)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"busy_loop_s {expected}\n" in result.stdout


@pytest.mark.vllm
def test_a_bad_value_stops_vllm_with_a_message():
    result = _probe("-1")
    assert result.returncode != 0
    assert f"{ENV} must be a number of seconds > 0, got '-1'" in result.stderr


@pytest.mark.parametrize(("value", "expected"), [("0.02", 0.02), (" 0.5 ", 0.5), ("", None)])
def test_the_window_is_read_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(ENV, value)
    assert busy_loop_from_env() == expected


@pytest.mark.parametrize("value", ["0", "-0.1", "fast", "nan", "inf"])
def test_a_bad_window_is_an_error(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=ENV):
        busy_loop_from_env()
