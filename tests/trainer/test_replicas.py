"""Replica discovery: plain URLs, and every address behind one DNS name (a Kubernetes headless Service)."""

from __future__ import annotations

import asyncio

import pytest

from services.trainer.replicas import resolve_replicas


def test_replicas_behind_one_dns_name():
    urls = asyncio.run(resolve_replicas(["dns+http://localhost:8001", "http://10.0.0.9:8001/"]))
    assert "http://127.0.0.1:8001" in urls and urls[-1] == "http://10.0.0.9:8001"
    with pytest.raises(ValueError, match="does not resolve"):
        asyncio.run(resolve_replicas(["dns+http://no-such-host.invalid:8001"]))
    with pytest.raises(ValueError, match="NAME:PORT"):
        asyncio.run(resolve_replicas(["dns+http://localhost"]))
