"""Client mistakes get a 4xx with a message (never a 500), are counted in the metrics, and the OpenAPI schema
lists every status the gateways answer. Against the in-memory vLLM stand-in of test_gateway (no engine)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from services.policy.settings import PolicySettings
from services.value.settings import ValueSettings
from tests.services.conftest import REPO
from tests.services.test_gateway import ADMIN, _gateway, _run, running

JSON = {"content-type": "application/json"}
BAD_LABELS = ["v✓", "x\ny", "a b", "", "tab\there", "x" * 65, "é"]


@pytest.mark.parametrize("label", BAD_LABELS)
def test_a_bad_version_label_is_refused_by_the_swap_api(tmp_path, label):
    service, fake, app, _ = _gateway(tmp_path)

    async def scenario():
        async with running(service, fake, app) as client:
            swap = await client.post("/admin/checkpoint", json={"path": "v2", "version": label}, headers=ADMIN)
            expand = await client.post("/v1/expand", json={"requests": [{"state": {"question": "q"}, "n": 1}]})
            return swap, expand

    swap, expand = _run(scenario())
    assert swap.status_code == 422, swap.text
    assert "version" in swap.text and "X-Model-Version" in swap.text
    assert "/collective_rpc" not in fake.paths()
    assert expand.status_code == 200 and expand.headers["x-model-version"] == "1"


def test_good_version_labels_pass(tmp_path):
    service, fake, app, _ = _gateway(tmp_path)

    async def scenario():
        async with running(service, fake, app) as client:
            swap = await client.post(
                "/admin/checkpoint", json={"path": "v2", "version": "round-3/step_1200+fix@2026:a.b"}, headers=ADMIN
            )
            expand = await client.post("/v1/expand", json={"requests": [{"state": {"question": "q"}, "n": 1}]})
            return swap, expand

    swap, expand = _run(scenario())
    assert swap.status_code == 200, swap.text
    assert expand.headers["x-model-version"] == "round-3/step_1200+fix@2026:a.b"


@pytest.mark.parametrize("label", BAD_LABELS)
def test_a_bad_version_label_is_refused_by_the_settings(label):
    for cls in (PolicySettings, ValueSettings):
        with pytest.raises(ValidationError, match="version label"):
            cls(model="/m", model_version=label)


def test_a_bad_version_label_stops_the_service_at_start_up():
    env = {**os.environ, "CPL_VALUE_MODEL": "/nonexistent", "CPL_VALUE_MODEL_VERSION": "x\ny", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "services.value.main"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "CPL_VALUE_MODEL_VERSION" in proc.stderr and "version label" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_literals_are_422_not_500(tmp_path, literal):
    for value in (False, True):
        service, fake, app, _ = _gateway(tmp_path / str(value), value=value)
        if value:
            bodies = [
                (b'{"states": [{"question": %s}]}' % literal, "/v1/values"),
                (b'{"states": %s}' % literal, "/v1/values"),
            ]
        else:
            bodies = [
                (b'{"requests": [{"state": {"question": "q"}, "n": 1, "temperature": %s}]}' % literal, "/v1/expand"),
                (b'{"requests": [{"state": {"question": "q"}, "n": %s}]}' % literal, "/v1/expand"),
            ]

        async def scenario(bodies=bodies, service=service, fake=fake, app=app):
            async with running(service, fake, app) as client:
                answers = [await client.post(path, content=body, headers=JSON) for body, path in bodies]
                return answers, (await client.get("/metrics")).text

        answers, metrics = _run(scenario())
        for response in answers:
            assert response.status_code == 422, response.text
            assert "NaN and Infinity are not valid JSON numbers" in response.text
        path = bodies[0][1]
        assert f'requests_total{{endpoint="{path}",status="422"}} 2.0' in metrics
        assert "/v1/completions" not in fake.paths() and "/classify" not in fake.paths()


def test_completions_pass_through_refuses_bad_json_with_400(tmp_path):
    service, fake, app, _ = _gateway(tmp_path)
    deep = b"[" * 200_000 + b"]" * 200_000
    bodies = [
        b'{"model": "policy", "prompt": "hi", "temperature": NaN}',
        b'{"model": "policy", "prompt": "hi", "max_tokens": Infinity}',
        b'{"model": "policy", "prompt": ' + deep + b"}",
        deep,
        b"[1, 2]",
        b"{not json",
        b"\xff\xfe",
    ]

    async def scenario():
        async with running(service, fake, app) as client:
            answers = [await client.post("/v1/completions", content=body, headers=JSON) for body in bodies]
            return answers, (await client.get("/metrics")).text

    answers, metrics = _run(scenario())
    assert [r.status_code for r in answers] == [400] * len(bodies), [r.text[:200] for r in answers]
    assert "NaN is not a valid JSON number" in answers[0].json()["detail"]
    assert "nested too deeply" in answers[2].json()["detail"]
    assert f'requests_total{{endpoint="/v1/completions",status="400"}} {float(len(bodies))}' in metrics
    assert fake.raw_bodies == [] and service.gate.in_flight == 0


def test_deeply_nested_bodies_are_4xx_on_every_endpoint(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    for value, path in ((False, "/v1/expand"), (True, "/v1/values")):
        service, fake, app, _ = _gateway(tmp_path / path.strip("/").replace("/", "_"), value=value)

        async def scenario(service=service, fake=fake, app=app, path=path):
            async with running(service, fake, app) as client:
                return [
                    await client.post(path, content=deep, headers=JSON),
                    await client.post("/admin/checkpoint", content=deep, headers={**JSON, **ADMIN}),
                ]

        for response in _run(scenario()):
            assert 400 <= response.status_code < 500, response.text


@pytest.mark.parametrize("path", ["a" * 5000, "a" * 300, "/" + "b/" * 3000, "v2/" + "c" * 256 + "/x"])
def test_a_checkpoint_path_too_long_for_the_os_is_400_and_counted(tmp_path, path):
    service, fake, app, _ = _gateway(tmp_path)

    async def scenario():
        async with running(service, fake, app) as client:
            response = await client.post("/admin/checkpoint", json={"path": path}, headers=ADMIN)
            return response, (await client.get("/metrics")).text

    response, metrics = _run(scenario())
    assert response.status_code == 400, response.text
    assert "cannot be opened" in response.json()["detail"] or "outside the checkpoint root" in response.json()["detail"]
    assert len(response.json()["detail"]) < 600
    assert 'swaps_total{outcome="refused"} 1.0' in metrics
    assert "/collective_rpc" not in fake.paths()


@pytest.mark.parametrize("value", [False, True])
def test_openapi_documents_every_error_status_with_its_body(tmp_path, value):
    _, _, app, _ = _gateway(tmp_path, value=value)
    schema = app.openapi()
    paths = schema["paths"]
    work = "/v1/values" if value else "/v1/expand"
    expected = {
        work: {"200", "400", "413", "422", "502", "503", "504"},
        "/admin/checkpoint": {"200", "400", "401", "403", "404", "409", "422", "500", "503"},
        "/ready": {"200", "503"},
        "/health": {"200", "503"},
    }
    if not value:
        expected["/v1/completions"] = {"200", "400", "404", "422", "502", "503", "504"}
    for path, codes in expected.items():
        op = next(iter(paths[path].values()))
        assert set(op["responses"]) == codes, (path, sorted(op["responses"]))
        for code in codes - {"200"}:
            body = op["responses"][code]["content"]["application/json"]["schema"]
            assert body, (path, code)
        if path != "/health":
            assert "Retry-After" in op["responses"]["503"].get("headers", {}), path
    error = schema["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["detail"]
    version = schema["components"]["schemas"]["SwapRequest"]["properties"]["version"]
    assert any(opt.get("pattern") for opt in version["anyOf"])
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
