"""Bad input answers 4xx with a message saying what is wrong, and nothing is queued or stored."""

from __future__ import annotations

import json

import pytest

from tests.search.conftest import Stack

GOOD = {"question": "What is 2 plus 2?"}


def _stored(stack: Stack) -> tuple[int, int]:
    r = stack.redis()
    try:
        return r.zcard(f"{stack.prefix}:index"), r.zcard(f"{stack.prefix}:batches")
    finally:
        r.close()


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"question": ""}, 422, "question"),
        ({"question": "   "}, 422, "question is empty"),
        ({"question": "x" * (1 << 20)}, 422, "at most 4000"),
        ({**GOOD, "simulations": 0}, 422, "simulations"),
        ({**GOOD, "simulations": 10**9}, 422, "simulations must be between 1 and 500"),
        ({**GOOD, "format": "yaml"}, 422, "format"),
        ({**GOOD, "temperature": 0.5}, 422, "temperature"),
        ({**GOOD, "settings": {"beam_width": 3}}, 422, "beam_width"),
        ({**GOOD, "settings": {"children": 1000}}, 422, "settings.children must be at most 16"),
        ({**GOOD, "settings": {"max_depth": 99}}, 422, "settings.max_depth must be at most 16"),
        ({**GOOD, "settings": {"temperature": -1}}, 422, "temperature"),
        ({**GOOD, "settings": {"seed": -1}}, 422, "seed"),
        ({**GOOD, "settings": {"seed": 2**63}}, 422, "seed"),
        ({**GOOD, "answer": "y" * 5000}, 422, "answer"),
        ({**GOOD, "request_id": ""}, 422, "request_id"),
        ({"answer": "4"}, 422, "question"),
    ],
)
def test_bad_search_requests(stack: Stack, body: dict, status: int, words: str):
    before = _stored(stack)
    with stack.client() as client:
        response = client.post("/v1/searches", json=body)
    assert response.status_code == status, response.text
    assert words in json.dumps(response.json()["detail"])
    assert _stored(stack) == before


def test_not_json(stack: Stack):
    with stack.client() as client:
        response = client.post("/v1/searches", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "json" in response.text.lower()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "no problems"),
        (b"\n\n", "no problems"),
        (b"{not json}\n", "upload.jsonl:1: not JSON"),
        (b'{"question": "ok", "answer": "#### 3"}\n[1, 2]\n', "upload.jsonl:2: expected a JSON object"),
        (b'{"text": "no question here"}\n', "upload.jsonl:1: no 'question' (GSM8K) or 'problem' (MATH) field"),
        (b'{"question": "' + b"q" * 5000 + b'", "answer": "#### 1"}\n', "longer than 4000"),
        (b"\xff\xfe\x00garbage", "UTF-8"),
    ],
)
def test_bad_uploads(stack: Stack, content: bytes, words: str):
    before = _stored(stack)
    with stack.client() as client:
        response = client.post("/v1/batches/upload", files={"file": ("upload.jsonl", content)})
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]
    assert _stored(stack) == before


def test_batch_limits(stack: Stack):
    before = _stored(stack)
    with stack.client() as client:
        too_many = client.post("/v1/batches", json={"problems": [{"question": f"q{i}"} for i in range(51)]})
        assert too_many.status_code == 413 and "at most 50" in too_many.json()["detail"]
        empty = client.post("/v1/batches", json={"problems": []})
        assert empty.status_code == 422
        one_bad = client.post("/v1/batches", json={"problems": [{"question": "fine"}, {"question": " "}]})
        assert one_bad.status_code == 422 and "problems[1]" in one_bad.json()["detail"]
        rows = b"".join(b'{"question": "q%d", "answer": "#### 1"}\n' % i for i in range(51))
        upload = client.post("/v1/batches/upload", files={"file": ("big.jsonl", rows)})
        assert upload.status_code == 413 and "at most 50" in upload.json()["detail"]
        huge = client.post("/v1/batches/upload", files={"file": ("huge.jsonl", b"x" * (300 << 10))})
        assert huge.status_code == 413 and "bytes" in huge.json()["detail"]
        bad_settings = client.post(
            "/v1/batches/upload",
            files={"file": ("ok.jsonl", b'{"question": "q", "answer": "#### 1"}\n')},
            data={"settings": '{"nope": 1}'},
        )
        assert bad_settings.status_code == 422 and "nope" in bad_settings.json()["detail"]
    assert _stored(stack) == before


def test_unknown_ids(stack: Stack):
    with stack.client() as client:
        for path in (
            "/v1/searches/nope",
            "/v1/searches/nope/tree",
            "/v1/searches/nope/events",
            "/v1/batches/nope",
            "/v1/batches/nope/exports/sft",
        ):
            response = client.get(path)
            assert response.status_code == 404 and "nope" in response.json()["detail"], path
        for path in ("/v1/searches/nope/cancel", "/v1/batches/nope/cancel"):
            response = client.post(path)
            assert response.status_code == 404, path
        assert client.get("/v1/batches/nope/exports/weights").status_code == 422
        assert client.get("/v1/searches", params={"cursor": "abc"}).status_code == 422
        assert client.get("/v1/searches", params={"status": "sleeping"}).status_code == 422
        assert client.get("/v1/searches", params={"limit": 10_000}).status_code == 422


def test_api_keys(stack: Stack):
    before = _stored(stack)
    for key, status in ((None, 401), ("wrong", 403)):
        with stack.client(key) as client:
            for method, path in (
                ("POST", "/v1/searches"),
                ("GET", "/v1/searches"),
                ("GET", "/v1/searches/x"),
                ("POST", "/v1/batches"),
                ("GET", "/v1/batches/x/exports/sft"),
            ):
                response = client.request(method, path, json=GOOD if method == "POST" else None)
                assert response.status_code == status, (key, path, response.text)
                assert "token" in response.json()["detail"]
    with stack.client(None) as client:
        malformed = client.get("/v1/searches", headers={"Authorization": "Basic abc"})
        assert malformed.status_code == 401 and "malformed" in malformed.json()["detail"]
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
    with stack.client("second-key") as client:
        assert client.get("/v1/searches").status_code == 200
    assert _stored(stack) == before
