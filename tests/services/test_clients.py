"""The async clients: protocol conformance, retries with backoff on 503 and connection errors, clear errors."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cpl.protocols import ExpandRequest, ExpandResult, PolicyModel, State, ValueModel
from services.common.client import ServiceError
from services.policy.client import PolicyClient
from services.value.client import ValueClient

URL = "http://policy.test:8001"


def _expand_answer(version: str = "7") -> dict:
    result = ExpandResult(candidates=[], model_version=version).model_dump(mode="json")
    return {"results": [result], "model_version": version}


def _policy(handler, **kwargs) -> PolicyClient:
    return PolicyClient(URL, transport=httpx.MockTransport(handler), backoff_s=0.001, **kwargs)


REQUESTS = [ExpandRequest(state=State(question="q"), n=2)]


def test_clients_implement_the_protocols():
    assert isinstance(PolicyClient(URL), PolicyModel)
    assert isinstance(ValueClient(URL), ValueModel)


def test_retries_503_then_succeeds_and_honours_retry_after():
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        if len(attempts) < 3:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "policy service: swapping"})
        return httpx.Response(200, json=_expand_answer())

    async def run():
        async with _policy(handler) as client:
            return await client.expand(REQUESTS)

    results = asyncio.run(run())
    assert len(attempts) == 3 and results[0].model_version == "7"


def test_retries_connection_errors():
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        if len(attempts) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=_expand_answer())

    async def run():
        async with _policy(handler) as client:
            return await client.expand(REQUESTS)

    assert asyncio.run(run())[0].model_version == "7" and len(attempts) == 2


def test_gives_up_with_an_error_naming_service_and_cause():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "policy service: engine swapping; retry later"})

    async def run():
        async with _policy(handler, retries=2) as client:
            await client.expand(REQUESTS)

    with pytest.raises(ServiceError) as info:
        asyncio.run(run())
    message = str(info.value)
    assert message.startswith(f"policy service at {URL}/v1/expand")
    assert "HTTP 503" in message and "engine swapping" in message and "gave up after 3 attempts" in message


def test_client_errors_are_not_retried():
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        return httpx.Response(400, json={"detail": "policy service: max_tokens too large"})

    async def run():
        async with _policy(handler) as client:
            await client.expand(REQUESTS)

    with pytest.raises(ServiceError) as info:
        asyncio.run(run())
    assert len(attempts) == 1 and info.value.status == 400 and "max_tokens too large" in str(info.value)


def test_unreachable_service_error():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def run():
        async with ValueClient(
            "http://value.test", transport=httpx.MockTransport(handler), retries=1, backoff_s=0.001
        ) as client:
            await client.evaluate([State(question="q")])

    with pytest.raises(ServiceError) as info:
        asyncio.run(run())
    assert str(info.value).startswith("value service at http://value.test/v1/values")
    assert "connection failed" in str(info.value)


def test_value_client_round_trip():
    def handler(request: httpx.Request) -> httpx.Response:
        import json

        states = json.loads(request.content)["states"]
        values = [{"value": 0.25 * i, "model_version": "3"} for i in range(len(states))]
        return httpx.Response(200, json={"values": values, "model_version": "3"})

    async def run():
        async with ValueClient("http://value.test", transport=httpx.MockTransport(handler)) as client:
            return await client.evaluate([State(question="a"), State(question="b")])

    assert [v.value for v in asyncio.run(run())] == [0.0, 0.25]


def test_empty_batches_make_no_call():
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    async def run():
        async with _policy(handler) as client:
            return await client.expand([])

    assert asyncio.run(run()) == []


@pytest.mark.parametrize(
    "answer",
    [
        lambda request: httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "policy service: busy"}),
        lambda request: (_ for _ in ()).throw(httpx.ReadError("connection reset", request=request)),
    ],
    ids=["503", "connection-broke"],
)
def test_a_hot_swap_is_never_sent_twice(answer):
    """``POST /admin/checkpoint`` changes the served weights: a retry could swap twice, so none happens."""
    swaps = []

    def handler(request: httpx.Request) -> httpx.Response:
        swaps.append(request)
        return answer(request)

    async def run():
        async with _policy(handler, admin_token="secret") as client:
            await client.swap_checkpoint("B/policy")

    with pytest.raises(ServiceError):
        asyncio.run(run())
    assert len(swaps) == 1
    assert swaps[0].headers["authorization"] == "Bearer secret" and swaps[0].url.path == "/admin/checkpoint"


def test_a_hot_swap_that_could_not_connect_is_sent_again():
    """A refused connection means the server never saw the request: sending it again cannot swap twice."""
    swaps = []

    def handler(request: httpx.Request) -> httpx.Response:
        swaps.append(request)
        if len(swaps) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"version": "2"})

    async def run():
        async with _policy(handler, admin_token="secret") as client:
            return await client.swap_checkpoint("B/policy")

    assert asyncio.run(run()) == {"version": "2"} and len(swaps) == 2


def test_admin_call_without_a_token_is_refused_locally():
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    async def run():
        async with _policy(handler) as client:
            await client.swap_checkpoint("B/policy")

    with pytest.raises(ServiceError, match="no admin token"):
        asyncio.run(run())


def test_api_key_is_sent_as_bearer_token():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json=_expand_answer())

    async def run():
        async with _policy(handler, api_key="k1") as client:
            await client.expand(REQUESTS)

    asyncio.run(run())
    assert seen == ["Bearer k1"]
