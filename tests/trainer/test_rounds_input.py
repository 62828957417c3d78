"""``POST /v1/rounds`` on the search app (create_search_app mounts the trainer routes when the trainer is
configured), with real Redis: bad input is a 4xx with a message and queues nothing; the search key gets 403; a
good request is queued on the train queue once and answered 202 with every stage of every round; cancel."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from services.search.api import create_search_app
from services.search.settings import SearchSettings
from services.trainer.tasks import TRAIN_QUEUE
from tests.search.conftest import REDIS_URL, unlink_prefix

OPERATOR = "rounds-operator-key"
SEARCH_KEY = "rounds-search-key"
PROBLEMS = [{"question": "Ann has 3 apples and buys 4 more. How many apples?", "answer": "7"}]


class Env:
    def __init__(self, client: TestClient, search_prefix: str, trainer_prefix: str) -> None:
        self.client = client
        self.search_prefix = search_prefix
        self.trainer_prefix = trainer_prefix
        self.redis = redis.Redis.from_url(REDIS_URL)

    def post(self, body: dict, key: str = OPERATOR):
        return self.client.post("/v1/rounds", json=body, headers={"Authorization": f"Bearer {key}"})

    def queued(self) -> int:
        """Messages on the train queue (the broker's list under the search app's Celery key prefix)."""
        return int(self.redis.llen(f"{self.search_prefix}:celery:{TRAIN_QUEUE}"))

    def rounds(self) -> int:
        return int(self.redis.zcard(f"{self.trainer_prefix}rounds"))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("rounds_root")
    search_prefix = f"cpltest:{uuid.uuid4().hex[:10]}"
    trainer_prefix = f"cpltest-rounds-{uuid.uuid4().hex[:8]}:"
    mp = pytest.MonkeyPatch()
    for name, value in {
        "CHECKPOINT_ROOT": str(root),
        "BASE_POLICY": str(root / "base"),
        "REDIS_URL": REDIS_URL,
        "KEY_PREFIX": trainer_prefix,
        "OPERATOR_KEYS": json.dumps([OPERATOR]),
        "POLICY_REPLICAS": json.dumps(["http://127.0.0.1:1"]),
        "VALUE_REPLICAS": json.dumps(["http://127.0.0.1:2"]),
    }.items():
        mp.setenv(f"CPL_TRAINER_{name}", value)
    settings = SearchSettings(
        redis_url=REDIS_URL,
        key_prefix=search_prefix,
        api_keys=[SEARCH_KEY],
        max_batch_problems=3,
        max_simulations=50,
    )
    try:
        with TestClient(create_search_app(settings)) as client:
            yield Env(client, search_prefix, trainer_prefix)
    finally:
        mp.undo()
        r = redis.Redis.from_url(REDIS_URL)
        unlink_prefix(r, search_prefix)
        keys = list(r.scan_iter(match=f"{trainer_prefix}*"))
        if keys:
            r.delete(*keys)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"problems": []}, 422, "problems"),
        ({"problems": [{"question": "no answer"}]}, 422, "answer"),
        ({"problems": PROBLEMS * 4}, 413, "at most 3"),
        ({"problems": PROBLEMS, "simulations": [0]}, 422, "simulations"),
        ({"problems": PROBLEMS, "simulations": [51]}, 422, "simulations"),
        ({"problems": PROBLEMS, "rounds": 0}, 422, "rounds"),
        ({"problems": PROBLEMS, "search_settings": {"bogus": 1}}, 422, "bogus"),
        ({"problems": PROBLEMS, "training": {"sft": {"epochs": -1}}}, 422, "training.sft"),
        ({"problems": PROBLEMS, "training": {"ppo": {}}}, 422, "ppo"),
        ({"problems": PROBLEMS, "unknown_field": 1}, 422, "unknown_field"),
    ],
)
def test_bad_input_is_a_4xx_and_queues_nothing(env: Env, body: dict, status: int, message: str) -> None:
    before = (env.queued(), env.rounds())
    response = env.post(body)
    assert response.status_code == status, response.text
    assert message in json.dumps(response.json()["detail"])
    assert (env.queued(), env.rounds()) == before


def test_the_search_key_is_refused(env: Env) -> None:
    before = (env.queued(), env.rounds())
    assert env.post({"problems": PROBLEMS}, key=SEARCH_KEY).status_code == 403
    assert env.client.post("/v1/rounds", json={"problems": PROBLEMS}).status_code == 401
    assert env.client.get("/v1/rounds", headers={"Authorization": f"Bearer {SEARCH_KEY}"}).status_code == 403
    assert (env.queued(), env.rounds()) == before


def test_a_round_is_queued_once_listed_and_cancelled(env: Env) -> None:
    before = env.queued()
    response = env.post({"problems": PROBLEMS, "rounds": 2, "simulations": [4, 3], "baselines": True})
    assert response.status_code == 202, response.text
    record = response.json()
    assert record["status"] == "queued"
    assert [(s["round"], s["stage"]) for s in record["stages"]] == [
        (r, stage)
        for r in (1, 2)
        for stage in ("search", "export", "sft", "step_apo", "step_dpo", "value", "deploy", "eval")
    ]
    assert env.queued() == before + 1
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    listed = env.client.get("/v1/rounds", headers=headers).json()
    assert record["id"] in [r["id"] for r in listed]
    cancelled = env.client.post(f"/v1/rounds/{record['id']}/cancel", headers=headers)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    again = env.client.post(f"/v1/rounds/{record['id']}/cancel", headers=headers)
    assert again.status_code == 409
    assert env.client.get("/v1/rounds/nope..", headers=headers).status_code == 404
    assert env.client.get("/v1/rounds/unknown", headers=headers).status_code == 404


def test_cpl_round_api_flags_become_the_request(tmp_path) -> None:
    from cpl.cli import build_parser
    from cpl.toy import world
    from services.trainer.round_cli import add_round_api, round_body

    train = world.write_gsm8k_jsonl(world.generate("arith", 3, seed=1, split="train"), tmp_path / "train.jsonl")
    parser = build_parser([add_round_api])
    argv = ["round", "--api", "http://x", "--input", str(train), "--rounds", "2", "--simulations", "12"]
    argv += ["--sft-epochs", "1", "--apo-lr", "1e-5", "--micro-batch-size", "4", "--no-few-shot", "--limit", "2"]
    args = parser.parse_args(argv)
    body = round_body(args)
    assert body["rounds"] == 2 and body["simulations"] == [12] and len(body["problems"]) == 2
    assert all(p["answer"] for p in body["problems"])
    assert body["search_settings"] == {"few_shot": False}
    assert body["training"] == {
        "sft": {"epochs": 1, "micro_batch_size": 4},
        "step-apo": {"learning_rate": 1e-5, "micro_batch_size": 4},
        "step-dpo": {"learning_rate": 1e-5, "micro_batch_size": 4},
        "value": {"micro_batch_size": 4},
    }
    # without --api it is the library's round, which needs --base and --run-dir
    library = parser.parse_args(["round", "--input", str(train)])
    assert library.func(library) == 2
