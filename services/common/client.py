"""Base of the async HTTP clients of the services: one pooled httpx connection pool, timeouts, bearer auth (an
API key for the calls, the admin token for :meth:`ServiceClient.admin`), retries with exponential backoff (and
jitter) on 502/503/504 and on connection errors, ``Retry-After`` honoured, and errors that name the service,
the URL and the cause.

Only requests that may be repeated are retried: GET/HEAD/PUT/DELETE/OPTIONS, and a POST its caller marks
``retry_safe`` (the policy's ``/v1/expand`` and the value's ``/v1/values`` sample or score and change nothing).
Any other POST (``/admin/checkpoint``: a hot-swap) is sent once; it is re-sent only when the connection could
not be opened, i.e. when the server cannot have seen it.

Replicas: ``base_url`` may list several base URLs separated by commas. Each request goes to the replica with the
fewest of this client's requests in flight. While another replica is free, a request asks not to wait at a
swapping gateway's gate (``Prefer: wait=0``, RFC 7240). A replica that answers 502/503/504 or cannot be reached
is set aside for its ``Retry-After`` (or the backoff delay), and the request goes at once to another replica. So
a rolling deployment, one replica at a time, does not pause the client's requests. Only when every replica is set
aside does the client back off and wait, as it does with a single URL.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from dataclasses import dataclass
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


@dataclass
class Replica:
    """One base URL of the service, with this client's view of it."""

    url: str
    in_flight: int = 0
    failures: int = 0  # in a row: each one sets the replica aside for longer (the backoff delay)
    set_aside_until: float = 0.0  # time.monotonic(): not chosen before then while another replica is free


def parse_replicas(base_url: str) -> list[Replica]:
    """``"http://a:8001, http://b:8001"`` -> one :class:`Replica` per URL; ValueError when there is none."""
    urls = [url.strip().rstrip("/") for url in base_url.split(",") if url.strip()]
    if not urls:
        raise ValueError(f"no service URL in {base_url!r}")
    if len(set(urls)) != len(urls):
        raise ValueError(f"a replica URL is listed twice in {base_url!r}")
    return [Replica(url) for url in urls]


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
        self.replicas = parse_replicas(base_url)
        self.base_url = ",".join(r.url for r in self.replicas)
        self._turn = itertools.count()
        self.api_key = api_key
        self.admin_token = admin_token
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            base_url=self.replicas[0].url,
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

    def _choose(self) -> tuple[Replica, bool]:
        """The replica for the next request, and whether another one is free (not set aside) besides it."""
        now = time.monotonic()
        free = [r for r in self.replicas if r.set_aside_until <= now]
        if not free:  # all set aside: the one back soonest
            return min(self.replicas, key=lambda r: r.set_aside_until), False
        turn = next(self._turn)
        # Fewest in flight first; ties in turn, so an idle client spreads its requests over the replicas.
        chosen = min(free, key=lambda r: (r.in_flight, (self.replicas.index(r) - turn) % len(self.replicas)))
        return chosen, len(free) > 1

    async def request_json(
        self, method: str, path: str, body: Any = None, *, retry_safe: bool = False, token: str | None = None
    ) -> Any:
        """Send ``body`` as JSON and decode the JSON answer, retrying what may be retried (module docstring).

        ``retry_safe`` marks a non-idempotent method (POST) as safe to repeat; ``token`` replaces the API key as
        the bearer token.
        """
        method = method.upper()
        repeatable = retry_safe or method in IDEMPOTENT_METHODS
        content = None if body is None else json.dumps(body)
        headers = {"content-type": "application/json"} if content is not None else {}
        bearer = token if token is not None else self.api_key
        if bearer:
            headers["authorization"] = f"Bearer {bearer}"
        attempt = 0
        while True:
            retry_after: float | None = None
            replica, alternative = self._choose() if repeatable else (self.replicas[0], False)
            url = f"{replica.url}{path}"
            # Another replica is free: better a 503 at once than a wait behind a swap (module docstring).
            sent_headers = {**headers, "prefer": "wait=0"} if alternative else headers
            replica.in_flight += 1
            try:
                response = await self._client.request(method, url, content=content, headers=sent_headers)
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
                if response.status_code not in RETRY_STATUSES:
                    replica.failures = 0
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
            finally:
                replica.in_flight -= 1
            if len(self.replicas) > 1:
                replica.failures += 1
                replica.set_aside_until = time.monotonic() + self._delay(replica.failures, retry_after)
                if alternative:
                    continue  # straight to another replica: not an attempt, that one is set aside now
            attempt += 1
            if attempt > self.retries:
                raise ServiceError(self.service, url, f"{cause} (gave up after {attempt} attempts)")
            await asyncio.sleep(self._delay(attempt, retry_after))

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        """An admin call, authenticated with the admin token (a POST is sent once: see the module docstring)."""
        if not self.admin_token:
            raise ServiceError(self.service, f"{self.base_url}{path}", "no admin token given to the client")
        if len(self.replicas) > 1:
            raise ServiceError(self.service, self.base_url, "an admin call goes to one replica, not to a list")
        return await self.request_json(method, path, body, token=self.admin_token)

    async def ready(self) -> bool:
        """Whether a request would be served: some replica answers ``/ready`` with 200."""
        for replica in self.replicas:
            try:
                response = await self._client.get(f"{replica.url}/ready")
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                return True
        return False
