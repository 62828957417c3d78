"""The value gateway: ``POST /v1/values`` on vLLM's pooling runner.

Value checkpoints are ``*ForSequenceClassification`` with ``num_labels=1`` (:mod:`cpl.models.value_head`).
vLLM's ``classify`` task applies an activation by default (sigmoid for one label); the server is started with
``--pooler-config '{"seq_pooling_type": "LAST", "use_activation": false}'`` and every request also sends
``use_activation: false``, so vLLM returns the raw logit of the score head on the last token, and the gateway
returns V = tanh(logit) (:func:`cpl.values.value_from_logit`). The text scored is
:meth:`cpl.protocols.State.value_prompt`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import FastAPI, HTTPException, Response

from cpl.protocols import ValueResult
from cpl.values import value_from_logit
from services.common.request_errors import VERSION_HEADER_DOC, error_responses
from services.gateway.app import VERSION_HEADER, GateWait, create_gateway_app, gather_all, post_upstream
from services.gateway.vllm_gateway import VLLMCallError, VLLMGateway
from services.value.schemas import ValuesRequest, ValuesResponse
from services.value.settings import ValueSettings

POOLER_CONFIG = {"seq_pooling_type": "LAST", "use_activation": False}


def classify_payload(texts: list[str], model: str) -> dict[str, Any]:
    return {"model": model, "input": texts, "use_activation": False}


def logits_from_classification(response: dict[str, Any], expected: int) -> list[float]:
    data = sorted(response["data"], key=lambda d: d["index"])
    if len(data) != expected:
        raise VLLMCallError(502, f"vLLM /classify returned {len(data)} results for {expected} inputs", service="value")
    logits = []
    for item in data:
        if item.get("num_classes", len(item["probs"])) != 1:
            raise VLLMCallError(502, f"value model has {item.get('num_classes')} labels, expected 1", service="value")
        logit = float(item["probs"][0])
        if not math.isfinite(logit):
            raise VLLMCallError(502, f"the value model produced a non-finite logit ({logit})", service="value")
        logits.append(logit)
    return logits


PROBE_TEXT = "1 + 1 = 2"


async def probe_value(service: VLLMGateway) -> str | None:
    """One value through the served weights; the raw logit must be finite."""
    answer = await post_upstream(
        service, "/classify", classify_payload([PROBE_TEXT], service.settings.served_model_name)
    )
    try:
        logits_from_classification(answer, 1)
    except VLLMCallError as exc:
        return exc.cause
    return None


def register_value_routes(app: FastAPI, service: VLLMGateway) -> None:
    settings: ValueSettings = service.settings  # type: ignore[assignment]
    model_name = settings.served_model_name
    metrics = service.metrics

    @app.post(
        "/v1/values",
        response_model=ValuesResponse,
        responses={200: {"headers": VERSION_HEADER_DOC}, **error_responses(400, 413, 422, 502, 503, 504)},
    )
    async def values(batch: ValuesRequest, wait_s: GateWait) -> Response:
        """V(s) = tanh(score-head logit) for each state."""
        if len(batch.states) > settings.max_batch_states:
            raise HTTPException(413, f"at most {settings.max_batch_states} states per request")
        texts = [state.value_prompt() for state in batch.states]
        chunks = [texts[i : i + settings.chunk_size] for i in range(0, len(texts), settings.chunk_size)]
        async with service.gate.admit(wait_s):
            version = service.version
            metrics.in_flight.inc()
            try:
                answers = await gather_all(
                    [post_upstream(service, "/classify", classify_payload(chunk, model_name)) for chunk in chunks]
                )
            finally:
                metrics.in_flight.dec()
        logits = [
            x
            for chunk, answer in zip(chunks, answers, strict=True)
            for x in logits_from_classification(answer, len(chunk))
        ]
        metrics.states.labels("/v1/values").inc(len(texts))
        values = [ValueResult(value=value_from_logit(x), model_version=version) for x in logits]
        body = ValuesResponse.model_construct(values=values, model_version=version).model_dump_json()
        return Response(body, media_type="application/json", headers={VERSION_HEADER: version})


def create_value_app(settings: ValueSettings | None = None) -> FastAPI:
    settings = settings or ValueSettings()  # type: ignore[call-arg]
    service = VLLMGateway(
        settings,
        name="value",
        runner="pooling",
        extra_vllm_args=["--pooler-config", json.dumps(POOLER_CONFIG)],
        probe=probe_value,
    )
    return create_gateway_app(service, title="CPL value service", register=register_value_routes)
