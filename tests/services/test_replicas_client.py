"""A client over several replicas (``base_url`` with commas): least-busy choice, ``Prefer: wait=0`` only while
another replica is free, failover on a 503 at once and without using up an attempt, backoff when all are set
aside. And the gateway's side: a closed swap gate answers ``Prefer: wait=0`` at once."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from cpl.protocols import ExpandRequest, ExpandResult, State
from services.common.client import ServiceError, parse_replicas
from services.gateway.gate import EngineUnavailable, SwapGate, preferred_wait
from services.policy.client import PolicyClient

A, B = "http://policy-a.test:8001", "http://policy-b.test:8001"
REQUESTS = [ExpandRequest(state=State(question="q"), n=2)]


def _answer(version: str) -> httpx.Response:
    result = ExpandResult(candidates=[], model_version=version).model_dump(mode="json")
    return httpx.Response(200, json={"results": [result], "model_version": version})


def _host(request: httpx.Request) -> str:
    return f"http://{request.url.host}:{request.url.port}"


def _client(handler, urls: str = f"{A}, {B}/", **kwargs) -> PolicyClient:
    return PolicyClient(urls, transport=httpx.MockTransport(handler), backoff_s=0.001, **kwargs)


def test_parse_replicas_strips_and_refuses_empty_or_repeated_lists():
    assert [r.url for r in parse_replicas(f" {A}/ ,{B}")] == [A, B]
    with pytest.raises(ValueError, match="no service URL"):
        parse_replicas(" , ")
    with pytest.raises(ValueError, match="twice"):
        parse_replicas(f"{A},{A}/")


def test_idle_requests_alternate_and_ask_not_to_wait_while_another_replica_is_free():
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((_host(request), request.headers.get("prefer")))
        return _answer(_host(request))

    async def run() -> None:
        async with _client(handler) as client:
            for _ in range(4):
                await client.expand(REQUESTS)

    asyncio.run(run())
    assert [host for host, _ in seen] == [A, B, A, B]
    assert all(prefer == "wait=0" for _, prefer in seen)


def test_one_url_never_sends_prefer():
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("prefer"))
        return _answer("1")

    async def run() -> None:
        async with _client(handler, urls=A) as client:
            await client.expand(REQUESTS)

    asyncio.run(run())
    assert seen == [None]


def test_the_least_busy_replica_gets_the_next_request():
    release = asyncio.Event()
    hosts: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(_host(request))
        if len(hosts) == 1:
            await release.wait()  # the first request stays in flight on its replica
        return _answer(_host(request))

    async def run() -> None:
        async with _client(handler) as client:
            first = asyncio.create_task(client.expand(REQUESTS))
            await asyncio.sleep(0.05)
            for _ in range(3):  # one after the other: each time the other replica has nothing in flight
                await client.expand(REQUESTS)
            release.set()
            await first

    asyncio.run(run())
    busy = hosts[0]
    assert busy not in hosts[1:], hosts


def test_a_swapping_replica_is_skipped_at_once_without_using_an_attempt():
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(_host(request))
        if _host(request) == A:
            assert request.headers.get("prefer") == "wait=0"  # it would otherwise wait at A's gate
            return httpx.Response(503, headers={"Retry-After": "30"}, json={"detail": "policy service: swapping"})
        return _answer("b")

    async def run() -> list[str]:
        # retries=0: a failover to a free replica is not a retry, so even this client is served.
        async with _client(handler, retries=0) as client:
            return [(await client.expand(REQUESTS))[0].model_version for _ in range(4)]

    start = time.monotonic()
    versions = asyncio.run(run())
    assert versions == ["b"] * 4
    assert seen.count(A) == 1, seen  # set aside for its Retry-After after the first 503
    assert time.monotonic() - start < 5, "no backoff sleep while another replica was free"


def test_when_every_replica_is_set_aside_the_client_backs_off_and_gives_up_after_its_retries():
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(_host(request))
        raise httpx.ConnectError("connection refused", request=request)

    async def run() -> None:
        async with _client(handler, retries=2) as client:
            await client.expand(REQUESTS)

    with pytest.raises(ServiceError) as info:
        asyncio.run(run())
    assert "gave up after 3 attempts" in str(info.value) and "connection failed" in str(info.value)
    assert set(seen) == {A, B}
    assert len(seen) <= 2 * 3, seen  # bounded: each counted attempt follows at most one failover


def test_ready_when_any_replica_is_ready():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if _host(request) == B else 503, json={})

    async def run() -> bool:
        async with _client(handler) as client:
            return await client.ready()

    assert asyncio.run(run())


def test_admin_calls_refuse_a_replica_list():
    async def run() -> None:
        async with PolicyClient(f"{A},{B}", admin_token="t") as client:
            await client.swap_checkpoint("/ckpt")

    with pytest.raises(ServiceError, match="one replica"):
        asyncio.run(run())


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("wait=0", 0.0), ("respond-async, wait=2.5", 2.5), ('wait="3"', 3.0), ("wait=x", None)],
)
def test_prefer_wait_is_read_as_rfc_7240_says(header, expected):
    assert preferred_wait(header) == expected


def test_a_closed_gate_answers_wait_0_at_once_and_holds_the_others():
    async def run() -> None:
        gate = SwapGate(service="policy", wait_s=30, retry_after_s=2)
        gate.close("swapping")
        start = time.monotonic()
        with pytest.raises(EngineUnavailable) as info:
            await gate.acquire(0.0)
        assert time.monotonic() - start < 1 and "swapping" in info.value.reason
        waiting = asyncio.create_task(gate.acquire())  # no preference: waits for the swap to end
        await asyncio.sleep(0.1)
        assert not waiting.done()
        gate.open()
        await asyncio.wait_for(waiting, 5)
        assert gate.in_flight == 1

    asyncio.run(run())
