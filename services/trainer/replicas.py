"""The replicas of one inference service, and the calls the deployment coordinator makes to each.

Replicas are given as URLs, or as one ``dns+http://NAME:PORT`` entry whose name resolves to every replica's
address (what a Kubernetes headless Service gives: one A/AAAA record per ready pod).

Calls that change nothing (``GET /v1/model``, ``/ready``, the probes) are retried on connection errors; the
swap (``POST /admin/checkpoint``) is sent exactly once: a repeated swap could land after a rollback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx

DNS_SCHEME = "dns+"


class ReplicaError(RuntimeError):
    """A call to one replica failed; the message names the replica and the cause."""

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"replica {url}: {cause}")
        self.url = url
        self.cause = cause


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


class ReplicaClient:
    """One replica of the policy or value gateway, with the admin token for its hot-swap route."""

    def __init__(
        self,
        url: str,
        *,
        admin_token: str | None,
        timeout_s: float = 30.0,
        swap_timeout_s: float = 900.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._token = admin_token
        self._swap_timeout_s = swap_timeout_s
        self._retries = retries
        self._client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=5.0), transport=transport
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> ReplicaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _json(self, response: httpx.Response, what: str) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ReplicaError(self.url, f"{what}: HTTP {response.status_code}: {str(detail)[:800]}")
        try:
            return response.json()
        except ValueError as exc:
            raise ReplicaError(self.url, f"{what}: answer is not JSON") from exc

    async def _idempotent(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._client.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.RemoteProtocolError) as exc:
                attempt += 1
                if attempt > self._retries:
                    raise ReplicaError(self.url, f"{method} {path}: unreachable ({exc.__class__.__name__})") from exc
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            except httpx.HTTPError as exc:
                raise ReplicaError(self.url, f"{method} {path}: {exc.__class__.__name__}: {exc}") from exc
            return await self._json(response, f"{method} {path}")

    async def model_info(self) -> dict[str, Any]:
        return await self._idempotent("GET", "/v1/model")

    async def ready(self) -> None:
        """Raise unless ``/ready`` answers 200 (a replica that is swapping or restarting is not ready)."""
        await self._idempotent("GET", "/ready")

    async def swap(self, path: str, version: str) -> dict[str, Any]:
        """``POST /admin/checkpoint`` once (never retried)."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            response = await self._client.post(
                "/admin/checkpoint",
                json={"path": path, "version": version},
                headers=headers,
                timeout=httpx.Timeout(self._swap_timeout_s, connect=5.0),
            )
        except httpx.HTTPError as exc:
            raise ReplicaError(self.url, f"swap to {path}: {exc.__class__.__name__}: {exc}") from exc
        return await self._json(response, f"swap to {path}")

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
        answer = await self._idempotent("POST", "/v1/completions", json=body)
        return list(answer["choices"][0]["token_ids"])

    async def values(self, states: list[dict[str, Any]]) -> list[float]:
        answer = await self._idempotent("POST", "/v1/values", json={"states": states})
        return [float(v["value"]) for v in answer["values"]]
