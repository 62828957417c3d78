"""Client mistakes answered as 4xx with a message, and the error answers documented in the OpenAPI schema.

* A JSON body may hold ``NaN`` / ``Infinity`` literals (Python's parser accepts them). FastAPI's default
  validation-error handler echoes the offending input and then fails to serialise the non-finite float, so the
  client got a 500. :func:`validation_error_handler` answers 422 with the input rendered as text instead.
* :func:`parse_json_object` is the strict parser of raw bodies (the ``/v1/completions`` pass-through): non-finite
  literals and nesting deeper than the parser's recursion limit (``RecursionError``) are 400, not 500.
* :func:`error_responses` documents every error status a route can answer, with its body ``{"detail": ...}``
  (:class:`ErrorBody`) and, for 503, the ``Retry-After`` header, so generated clients and schema-driven testers
  accept them.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import APIError


class ValidationIssue(BaseModel):
    """One entry of a 422 answer (FastAPI's shape)."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(description="where in the request the problem is")
    msg: str = Field(description="what is wrong")
    type: str = Field(description="error type")


class ErrorBody(BaseModel):
    """Every error answer: ``detail`` is a message, or for a malformed body the list of problems."""

    detail: str | list[ValidationIssue]


class OpenAIErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str | None = None
    param: str | None = None
    code: int | str | None = None


class OpenAIErrorBody(BaseModel):
    """An error answered by vLLM's OpenAI server and passed through unchanged (``/v1/completions``)."""

    error: OpenAIErrorDetail


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "bad request: malformed body, or a request the model server refuses (e.g. prompt too long)",
    401: "missing or malformed bearer token",
    403: "wrong token, or the admin endpoint is disabled (no token configured)",
    404: "not found (checkpoint directory, or a model name the server does not serve)",
    409: "conflict: another swap is in progress, or hot-swap is disabled",
    413: "too many states in one request",
    422: "request body fails validation, or the checkpoint cannot be loaded into the served model",
    500: "the engine failed while loading a checkpoint; the message says what was restored",
    502: "the model server answered an error or an invalid answer",
    503: "the engine is starting, swapping, restarting or unreachable; retry after Retry-After seconds",
    504: "the model server did not answer in time",
}

VERSION_HEADER_DOC = {
    "X-Model-Version": {"description": "the model version that produced the answer", "schema": {"type": "string"}}
}
RETRY_AFTER_DOC = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*codes: int, passed_through: tuple[int, ...] = ()) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each code with its description, body schema and headers.

    ``passed_through``: codes that a pass-through route may also answer with vLLM's own OpenAI error body.
    """
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        model: Any = ErrorBody | OpenAIErrorBody if code in passed_through else ErrorBody
        entry: dict[str, Any] = {"model": model, "description": ERROR_DESCRIPTIONS[code]}
        if code == 503:
            entry["headers"] = RETRY_AFTER_DOC
        responses[code] = entry
    return responses


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 listing the problems; inputs holding NaN/Infinity are echoed as text (JSON has no such numbers)."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        error = dict(error)
        if _has_non_finite(error.get("input")):
            error["msg"] = f"{error.get('msg', 'invalid value')} (NaN and Infinity are not valid JSON numbers)"
        errors.append(_finite(jsonable_encoder(error)))
    return JSONResponse({"detail": errors}, status_code=422)


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or HTTP 400 saying why not (not JSON, NaN/Infinity, nested too deeply)."""
    try:
        parsed = json.loads(body, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise APIError(400, "request body is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and the NaN/Infinity refusal
        raise APIError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise APIError(400, "request body must be a JSON object")
    return parsed
