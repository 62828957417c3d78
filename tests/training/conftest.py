"""Fixtures of the trainer tests (the tiny models come from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two OpenMP threads stall at
    every barrier whenever the other core is busy (measured: 20x slower training steps under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def policy_dir(tiny_models) -> Path:
    return tiny_models[0]


@pytest.fixture(scope="session")
def value_dir(tiny_models) -> Path:
    return tiny_models[1]
