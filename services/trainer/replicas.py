"""The replicas of one inference service, and the calls the deployment coordinator makes to each.

Replicas are given as URLs, or as one ``dns+http://NAME:PORT`` entry whose name resolves to every replica's
address (what a Kubernetes headless Service gives: one A/AAAA record per ready pod).

The calls go through :class:`services.gateway.client.GatewayClient`: those that change nothing (``GET
/v1/model``, ``/ready``, the probes) are retried; the swap (``POST /admin/checkpoint``) is sent once, since a
repeated swap could land after a rollback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from services.common.client import ServiceError
from services.gateway.client import GatewayClient

DNS_SCHEME = "dns+"

__all__ = ["ReplicaClient", "ServiceError", "resolve_replicas"]


async def resolve_replicas(entries: list[str]) -> list[str]:
    """Replica base URLs: plain URLs as given, ``dns+SCHEME://NAME:PORT`` expanded to one URL per address."""
    urls: list[str] = []
    for entry in entries:
        if not entry.startswith(DNS_SCHEME):
            urls.append(entry.rstrip("/"))
            continue
        parts = urlsplit(entry[len(DNS_SCHEME) :])
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(f"replica entry {entry!r}: expected dns+http://NAME:PORT")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"replica entry {entry!r}: {parts.hostname} does not resolve ({exc})") from exc
        addresses = sorted({info[4][0] for info in infos}, key=lambda a: (ipaddress.ip_address(a).version, a))
        for address in addresses:
            host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
            urls.append(f"{parts.scheme}://{host}:{parts.port}")
    if len(set(urls)) != len(urls):
        raise ValueError(f"replica list names a replica twice: {urls}")
    return urls


class ReplicaClient(GatewayClient):
    """One replica of the policy or value gateway, with the admin token for its hot-swap route."""

    def __init__(self, url: str, service: str = "inference", **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.service = service

    async def check_ready(self) -> None:
        """Raise :class:`ServiceError` unless ``/ready`` answers 200 (swapping or restarting is not ready)."""
        await self.request_json("GET", "/ready")

    async def greedy_tokens(self, model: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (exactly ``max_tokens`` tokens: end-of-text is not a stop)."""
        body = {
            "model": model,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        answer = await self.request_json("POST", "/v1/completions", body, retry_safe=True)
        return list(answer["choices"][0]["token_ids"])

    async def values(self, states: list[dict[str, Any]]) -> list[float]:
        answer = await self.request_json("POST", "/v1/values", {"states": states}, retry_safe=True)
        return [float(v["value"]) for v in answer["values"]]
