"""Base of the async HTTP clients of the services: one pooled httpx connection pool, timeouts, bearer auth (an
API key for the calls, the admin token for :meth:`ServiceClient.admin`), retries with exponential backoff (and
jitter) on 502/503/504 and on connection errors, ``Retry-After`` honoured, and errors that name the service,
the URL and the cause.

Only requests that may be repeated are retried: GET/HEAD/PUT/DELETE/OPTIONS, and a POST its caller marks
``retry_safe`` (the policy's ``/v1/expand`` and the value's ``/v1/values`` sample or score and change nothing).
Any other POST (``/admin/checkpoint``: a hot-swap) is sent once; it is re-sent only when the connection could
not be opened, i.e. when the server cannot have seen it.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx

RETRY_STATUSES = frozenset({502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# The request never left this process: safe to send again whatever it does.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The connection broke before an answer came: the server may have acted on it, so only a request that may be
# repeated is sent again.
RETRY_ERRORS = (*NOT_SENT_ERRORS, httpx.ReadError, httpx.RemoteProtocolError)


class ServiceError(RuntimeError):
    """A call to a service failed for good; the message names the service, the URL and the cause."""

    def __init__(self, service: str, url: str, cause: str, status: int | None = None) -> None:
        super().__init__(f"{service} service at {url}: {cause}")
        self.service = service
        self.url = url
        self.cause = cause
        self.status = status


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:1000]
    return json.dumps(body)[:1000]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class ServiceClient:
    """Shared machinery; subclasses set :attr:`service` and add the service's calls."""

    service = "service"

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 256,
        retries: int = 6,
        backoff_s: float = 0.25,
        max_backoff_s: float = 10.0,
        api_key: str | None = None,
        admin_token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_token = admin_token
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)

    async def request_json(
        self, method: str, path: str, body: Any = None, *, retry_safe: bool = False, token: str | None = None
    ) -> Any:
        """Send ``body`` as JSON and decode the JSON answer, retrying what may be retried (module docstring).

        ``retry_safe`` marks a non-idempotent method (POST) as safe to repeat; ``token`` replaces the API key as
        the bearer token.
        """
        method = method.upper()
        repeatable = retry_safe or method in IDEMPOTENT_METHODS
        url = f"{self.base_url}{path}"
        content = None if body is None else json.dumps(body)
        headers = {"content-type": "application/json"} if content is not None else {}
        bearer = token if token is not None else self.api_key
        if bearer:
            headers["authorization"] = f"Bearer {bearer}"
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                response = await self._client.request(method, path, content=content, headers=headers)
            except RETRY_ERRORS as exc:
                cause = f"{method} {path}: connection failed ({exc.__class__.__name__}: {exc})"
                if not repeatable and not isinstance(exc, NOT_SENT_ERRORS):
                    cause += "; not retried, the server may have acted on it"
                    raise ServiceError(self.service, url, cause) from exc
            except httpx.TimeoutException as exc:
                raise ServiceError(
                    self.service, url, f"{method} {path}: no answer within {self.timeout_s:.0f}s ({exc!r})"
                ) from exc
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise ServiceError(
                            self.service, url, f"{method} {path}: answer is not JSON", response.status_code
                        ) from exc
                cause = f"{method} {path}: HTTP {response.status_code}: {_detail(response)}"
                if response.status_code not in RETRY_STATUSES or not repeatable:
                    raise ServiceError(self.service, url, cause, response.status_code)
                retry_after = _retry_after(response)
            attempt += 1
            if attempt > self.retries:
                raise ServiceError(self.service, url, f"{cause} (gave up after {attempt} attempts)")
            await asyncio.sleep(self._delay(attempt, retry_after))

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        """An admin call, authenticated with the admin token (a POST is sent once: see the module docstring)."""
        if not self.admin_token:
            raise ServiceError(self.service, f"{self.base_url}{path}", "no admin token given to the client")
        return await self.request_json(method, path, body, token=self.admin_token)

    async def ready(self) -> bool:
        try:
            response = await self._client.get("/ready")
        except httpx.HTTPError:
            return False
        return response.status_code == 200
