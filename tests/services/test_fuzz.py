"""Schema-driven fuzzing of both gateways (schemathesis) against the real services of the session (real vLLM on
tiny models): every generated request, valid or not, must get an answer the OpenAPI schema documents (status,
content type, headers, body schema), and never a 5xx.

Examples are bounded (``MAX_EXAMPLES`` per operation). Generated requests that are valid are kept cheap before
they are sent: at most ``CAP_N`` samples of at most ``CAP_TOKENS`` tokens each, so a boundary value such as
``n=64, max_tokens=4000`` does not occupy the shared 2-core engine for minutes. Everything else (types, missing
fields, NaN-free but otherwise arbitrary values, bad labels, paths, tokens) goes out as generated. The admin
token is sent, so the swap endpoint's validation is fuzzed too; generated paths never name a real checkpoint.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.services.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.vllm

MAX_EXAMPLES = 25
CAP_N = 2
CAP_TOKENS = 8
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def policy_schema(policy_service):
    return schemathesis.openapi.from_url(f"{policy_service.url}/openapi.json")


@pytest.fixture(scope="module")
def value_schema(value_service):
    return schemathesis.openapi.from_url(f"{value_service.url}/openapi.json")


def _cap(item: Any) -> None:
    """Bound the work of one generation request in place (only where the generated value is large)."""
    if not isinstance(item, dict):
        return
    n = item.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > CAP_N:
        item["n"] = CAP_N
    for key in ("max_tokens", "best_of"):
        value = item.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > CAP_TOKENS:
            item[key] = CAP_TOKENS


def _bound(case: schemathesis.Case) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    if case.path == "/v1/completions":
        _cap(body)
    if case.path == "/v1/expand" and isinstance(body.get("requests"), list):
        for request in body["requests"]:
            _cap(request)


def _run_case(case: schemathesis.Case) -> None:
    _bound(case)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if case.path.startswith("/admin/") else None
    case.call_and_validate(headers=headers, checks=CHECKS, timeout=120)


_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example is a real request to a real engine
    suppress_health_check=list(HealthCheck),
)


def _fuzz(schema: Any, mode: GenerationMode) -> list[str]:
    """Run every operation of ``schema`` with generated ``mode`` data; the failures, one line each."""
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        has_input = bool(operation.body.items) or any(True for _ in operation.iter_parameters())
        if mode == GenerationMode.NEGATIVE and not has_input:
            continue  # nothing to make invalid (GET /health, /ready, /metrics, ...)

        @given(case=operation.as_strategy(generation_mode=mode))
        @_SETTINGS
        def run(case: schemathesis.Case) -> None:
            _run_case(case)

        try:
            run()
        except Exception as exc:  # every operation is fuzzed even if one fails; all failures are reported
            failures.append(f"{operation.method.upper()} {operation.path} ({mode}): {exc}")
    return failures


@pytest.mark.timeout(1800)  # may start the shared policy service
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_policy_gateway_answers_as_documented(policy_schema, mode) -> None:
    failures = _fuzz(policy_schema, mode)
    assert not failures, "\n\n".join(failures)


@pytest.mark.timeout(1800)  # may start the shared value service
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_value_gateway_answers_as_documented(value_schema, mode) -> None:
    failures = _fuzz(value_schema, mode)
    assert not failures, "\n\n".join(failures)
