"""Search settings: documented defaults, the delivery invariants checked at start-up, and the CLI's exit code 2
on bad settings. No stack needed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from services.search.celery_app import create_celery
from services.search.settings import SearchSettings
from tests.services.conftest import REPO


def test_defaults_are_consistent():
    s = SearchSettings()
    assert s.visibility_timeout_s > 2 * s.slice_seconds and s.lease_ms < s.visibility_timeout_s * 1000
    app = create_celery(s)
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1 and app.conf.task_ignore_result
    # One visibility timeout, given to the broker transport.
    assert app.conf.broker_transport_options["visibility_timeout"] == s.visibility_timeout_s
    assert app.conf.broker_transport_options["global_keyprefix"] == "cpl:search:celery:"


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"slice_seconds": 400, "visibility_timeout_s": 600}, "more than twice"),
        ({"lease_ms": 700_000, "visibility_timeout_s": 600}, "lease_ms"),
        ({"max_simulations": 0}, "max_simulations"),
    ],
)
def test_inconsistent_settings_are_refused(fields, words):
    with pytest.raises(ValidationError, match=words):
        SearchSettings(**fields)


def test_api_keys_from_env_and_file(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("k-file-1\n\nk-file-2\n")
    monkeypatch.setenv("CPL_SEARCH_API_KEYS", '["k-env"]')
    monkeypatch.setenv("CPL_SEARCH_API_KEYS_FILE", str(keys))
    assert SearchSettings().resolved_api_keys() == {"k-env", "k-file-1", "k-file-2"}


def test_cli_exits_2_on_bad_settings():
    env = {**os.environ, "CPL_SEARCH_SLICE_SECONDS": "500", "CPL_SEARCH_VISIBILITY_TIMEOUT_S": "600"}
    for args in (["worker"], ["serve", "search"]):
        argv = [sys.executable, "-m", "services.cli", *args]
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "invalid search settings" in result.stderr and "slice_seconds" in result.stderr


def test_a_stall_timeout_past_the_visibility_timeout_is_refused():
    with pytest.raises(ValidationError, match="stall_timeout_s"):
        SearchSettings(stall_timeout_s=700, visibility_timeout_s=600)


def test_the_stall_timeout_defaults_to_half_the_visibility_timeout():
    assert SearchSettings(visibility_timeout_s=30, slice_seconds=10).stall_after_s == 15
    assert SearchSettings(visibility_timeout_s=600, stall_timeout_s=90).stall_after_s == 90
