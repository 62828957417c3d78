"""Training jobs over the API: the trainer routes served over real HTTP (uvicorn), a real Celery worker process
consuming the ``train`` queue with concurrency 1, real Redis (a unique key prefix), real training on the tiny
model. Keys, bad input (nothing queued), progress, cancel, and a SIGKILLed worker whose job resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI

from services.common.ports import find_free_port
from services.trainer.api import create_trainer_router
from services.trainer.settings import TrainerSettings
from services.trainer.tasks import enqueue_training
from services.trainer.worker import create_train_celery
from tests.training.helpers import pair_rows, sft_rows

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/0"
OPERATOR = "operator-key-for-tests"
SEARCH_KEY = "search-only-key"


@dataclass
class Api:
    url: str
    root: Path
    settings: TrainerSettings
    env: dict[str, str]
    workers: list[subprocess.Popen]
    log_dir: Path

    def headers(self, key: str = OPERATOR) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def post(self, path: str, body: dict, key: str = OPERATOR) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers=self.headers(key), timeout=60)

    def get(self, path: str, key: str = OPERATOR) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=self.headers(key), timeout=60)

    def start_worker(self) -> subprocess.Popen:
        log = (self.log_dir / f"worker{len(self.workers)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "services.trainer.worker:app", "worker", "--queues", "train",
             "--concurrency", "1", "--pool", "solo", "--loglevel", "info", "--without-mingle", "--without-gossip"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.workers.append(proc)
        return proc

    def wait(self, training_id: str, predicate, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            record = self.get(f"/v1/trainings/{training_id}").json()
            if predicate(record):
                return record
            assert time.monotonic() < deadline, record
            time.sleep(0.1)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def api(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer_api")
    root = tmp / "root"
    root.mkdir()
    prefix = f"cpl-test-trainer-api-{uuid.uuid4().hex[:8]}:"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CPL_TRAINER_CHECKPOINT_ROOT": str(root),
        "CPL_TRAINER_BASE_POLICY": str(tiny_models[0]),
        "CPL_TRAINER_REDIS_URL": REDIS_URL,
        "CPL_TRAINER_KEY_PREFIX": prefix,
        "CPL_TRAINER_SAVE_EVERY_STEPS": "5",
        "CPL_TRAINER_TORCH_THREADS": "1",
        "CPL_TRAINER_TRAINING_LEASE_S": "3",
        "CPL_TRAINER_VISIBILITY_TIMEOUT_S": "4",
        "CPL_TRAINER_OPERATOR_KEYS": json.dumps([OPERATOR]),
    }
    settings = TrainerSettings(
        checkpoint_root=root,
        base_policy=tiny_models[0],
        redis_url=REDIS_URL,
        key_prefix=prefix,
        operator_keys=[OPERATOR],
        visibility_timeout_s=4,
    )
    celery = create_train_celery(settings)
    app = FastAPI()
    app.include_router(create_trainer_router(settings, lambda training_id: enqueue_training(celery, training_id)))
    port = find_free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    state = Api(f"http://127.0.0.1:{port}", root, settings, env, [], tmp)
    state.start_worker()
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        for proc in state.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def _sft(epochs: int, name: str | None = None, **extra) -> dict:
    body = {
        "kind": "sft",
        "data_jsonl": _jsonl(sft_rows(6, seed=11)),
        "overrides": {"learning_rate": 1e-3, "epochs": epochs, "batch_size": 1, "micro_batch_size": 1},
        **extra,
    }
    if name:
        body["name"] = name
    return body


def test_a_training_runs_on_the_train_queue_and_publishes(api):
    response = api.post("/v1/trainings", _sft(3, "api-sft-1"))
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["status"] == "queued" and created["data_rows"] == 6
    record = api.wait(created["id"], lambda r: r["status"] in ("succeeded", "failed", "cancelled"))
    assert record["status"] == "succeeded", record["error"]
    assert record["step"] == record["total_steps"] == 18
    assert record["epoch"] == 3 and record["loss"] is not None and record["learning_rate"] is not None
    assert record["loss_curve"] and record["loss_curve"][-1][0] == 18
    assert record["checkpoint"] == "api-sft-1"
    assert record["manifest"]["kind"] == "sft" and record["manifest"]["training_id"] == created["id"]
    assert record["metrics"]["steps"] == 18
    assert (api.root / "api-sft-1" / "model.safetensors").is_file()
    listed = api.get("/v1/trainings").json()
    assert created["id"] in [r["id"] for r in listed]


def test_operator_key_required(api):
    for method, path, body in [
        ("POST", "/v1/trainings", _sft(1)),
        ("GET", "/v1/trainings", None),
        ("GET", "/v1/trainings/abc", None),
        ("POST", "/v1/trainings/abc/cancel", {}),
        ("POST", "/v1/deployments", {"targets": [{"service": "policy", "checkpoint": "x"}]}),
        ("GET", "/v1/deployments", None),
    ]:
        wrong = httpx.request(method, f"{api.url}{path}", json=body, headers=api.headers(SEARCH_KEY), timeout=30)
        assert wrong.status_code == 403, (path, wrong.text)
        assert "operator key" in wrong.json()["detail"]
        missing = httpx.request(method, f"{api.url}{path}", json=body, timeout=30)
        assert missing.status_code == 401, (path, missing.text)


def test_bad_input_is_a_4xx_and_queues_nothing(api):
    before = len(api.get("/v1/trainings").json())
    pairs = _jsonl(pair_rows(3, seed=1, chosen_value=0.5, rejected_value=-0.5))
    cases = [
        ({**_sft(1), "data_jsonl": pairs}, 422, "does not fit a sft training"),
        ({**_sft(1), "data_jsonl": "{not json\n"}, 422, "data_jsonl:1: not valid JSON"),
        ({**_sft(1), "kind": "step-apo"}, 422, "does not fit a step-apo training"),
        (_sft(1, "../escape"), 422, "invalid checkpoint name"),
        (_sft(1, "a..b"), 422, "invalid checkpoint name"),
        (_sft(1, model="no-such-checkpoint"), 404, "no published checkpoint"),
        ({**_sft(1), "overrides": {"learning_rate": -1}}, 422, "learning_rate"),
        ({**_sft(1), "overrides": {"no_such_setting": 1}}, 422, "no_such_setting"),
        ({**_sft(1), "kind": "ppo"}, 422, "kind"),
    ]
    if (api.root / "api-sft-1").exists():
        cases.append((_sft(1, "api-sft-1"), 409, "exists already"))
    for body, status, words in cases:
        response = api.post("/v1/trainings", body)
        assert response.status_code == status, (body.get("name"), response.text)
        assert words in json.dumps(response.json()["detail"]), response.text
    records = api.get("/v1/trainings").json()
    assert len(records) == before
    # an upload is kept only for a training that was queued
    uploads = sorted(p.stem for p in (api.root / ".uploads").glob("*.jsonl"))
    assert uploads == sorted(r["id"] for r in records)
    assert api.get("/v1/trainings/nope").status_code == 404


def test_cancel_stops_a_running_job_and_publishes_nothing(api):
    created = api.post("/v1/trainings", _sft(400, "api-cancelled")).json()
    api.wait(created["id"], lambda r: r["status"] == "running" and r["step"] > 0)
    response = api.post(f"/v1/trainings/{created['id']}/cancel", {})
    assert response.status_code == 202 and response.json()["cancel_requested"]
    record = api.wait(created["id"], lambda r: r["status"] not in ("queued", "running"), timeout=60)
    assert record["status"] == "cancelled"
    assert record["step"] < record["total_steps"]
    assert not (api.root / "api-cancelled").exists()
    assert not (api.root / ".staging" / created["id"]).exists()
    assert api.post(f"/v1/trainings/{created['id']}/cancel", {}).status_code == 409


def test_a_killed_train_worker_resumes_the_job_from_its_saved_step(api):
    created = api.post("/v1/trainings", _sft(60, "api-resumed")).json()  # 360 steps
    progress = api.root / ".resume" / created["id"] / "progress.json"
    deadline = time.monotonic() + 300
    while not (progress.is_file() and json.loads(progress.read_text())["step"] >= 20):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    worker = api.workers[-1]
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    saved = json.loads(progress.read_text())["step"]
    assert 20 <= saved < 360
    assert not (api.root / "api-resumed").exists()
    assert api.get(f"/v1/trainings/{created['id']}").json()["status"] == "running"

    api.start_worker()
    record = api.wait(created["id"], lambda r: r["status"] in ("succeeded", "failed", "cancelled"), timeout=600)
    assert record["status"] == "succeeded", record["error"]
    assert record["attempts"] == 2
    assert record["resumed_from_step"] == saved == record["metrics"]["resumed_from_step"]
    assert record["step"] == 360
    assert (api.root / "api-resumed" / "manifest.json").is_file()
