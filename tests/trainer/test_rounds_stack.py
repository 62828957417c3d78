"""Two CPL rounds run by the stack, end to end: real Redis, the policy and value services on the embedded planner
(hot-swap on, one vLLM engine each, started once for this module), the search API with the trainer routes
(``cpl serve search``) and ONE ``cpl worker --queues search,train`` command (a search worker and a train worker).
``cpl round --api`` submits the rounds (``POST /v1/rounds``) and follows them; the test watches the record:

- the two-round run finishes and the client exits 0;
- after round 1's deployment both services report the round-1 versions (before round 2 deploys anything);
- round 2's searches (and every node of their trees) were served by the round-1 versions;
- the round's record lists every stage of both rounds with its outputs (datasets, trainings, deployment, eval).

Sizes are the smallest that still give every training data: three toy problems the planner both solves and
fails, a few simulations, one epoch each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from cpl.cli import demo_problems
from cpl.toy import world
from services.common.ports import find_free_port
from tests.search.conftest import API_KEY, PLANNER, REDIS_URL, Proc, search_env, unlink_prefix
from tests.services.conftest import ADMIN_TOKEN, REPO

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(2700)]

OPERATOR = "rounds-stack-operator"
BASE_VERSION = "base-v1"


@dataclass
class RoundStack:
    api: Proc
    worker: Proc
    policy: Proc
    value: Proc
    env: dict[str, str]
    root: Path
    tmp: Path

    def get(self, path: str) -> dict:
        reply = httpx.get(f"{self.api.url}{path}", headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=30)
        reply.raise_for_status()
        return reply.json()

    def version(self, service: Proc) -> str:
        return httpx.get(f"{service.url}/v1/model", timeout=10).json()["version"]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(80)}" for p in (self.worker, self.api))


def _inference(name: str, root: Path, logs: Path) -> Proc:
    prefix = f"CPL_{name.upper()}_"
    port = find_free_port()
    env = {
        **os.environ,
        f"{prefix}PORT": str(port),
        f"{prefix}HOST": "127.0.0.1",
        f"{prefix}MODEL": str(root / "base" / name),
        f"{prefix}MODEL_VERSION": BASE_VERSION,
        f"{prefix}CHECKPOINT_ROOT": str(root),
        f"{prefix}ADMIN_TOKEN": ADMIN_TOKEN,
        f"{prefix}DTYPE": "float32",
        f"{prefix}MAX_MODEL_LEN": "2048",
        f"{prefix}KV_CACHE_MEMORY_BYTES": str(96 << 20),
        f"{prefix}ENFORCE_EAGER": "true",
    }
    return Proc(
        name, [sys.executable, "-m", f"services.{name}.main"], env, logs / f"{name}.log", url=f"http://127.0.0.1:{port}"
    )


@pytest.fixture(scope="module")
def round_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoundStack]:
    tmp = tmp_path_factory.mktemp("rounds_stack")
    root = tmp / "checkpoints"
    # the served models lie under the checkpoint root: a failed deployment's rollback swaps them back in
    for name in ("policy", "value"):
        shutil.copytree(PLANNER / name, root / "base" / name)
    search_prefix = f"cpltest:{uuid.uuid4().hex[:10]}"
    trainer_prefix = f"cpltest-rounds-{uuid.uuid4().hex[:8]}:"
    policy, value = _inference("policy", root, tmp), _inference("value", root, tmp)
    procs: list[Proc] = []
    try:
        for service in (policy, value):  # the two engines load at once
            service.start()
            procs.append(service)
        policy.wait_http("/ready")
        value.wait_http("/ready")
        env = search_env(search_prefix, str(policy.url), str(value.url))
        env.update(
            {
                "CPL_SEARCH_DEFAULT_MAX_STEP_TOKENS": "96",
                "CPL_SEARCH_WORKER_CONCURRENCY": "8",
                "CPL_TRAINER_CHECKPOINT_ROOT": str(root),
                "CPL_TRAINER_BASE_POLICY": str(root / "base" / "policy"),
                "CPL_TRAINER_BASE_VALUE": str(root / "base" / "value"),
                "CPL_TRAINER_ADMIN_TOKEN": ADMIN_TOKEN,
                "CPL_TRAINER_POLICY_REPLICAS": json.dumps([policy.url]),
                "CPL_TRAINER_VALUE_REPLICAS": json.dumps([value.url]),
                "CPL_TRAINER_REDIS_URL": REDIS_URL,
                "CPL_TRAINER_KEY_PREFIX": trainer_prefix,
                "CPL_TRAINER_OPERATOR_KEYS": json.dumps([OPERATOR]),
                "CPL_TRAINER_TORCH_THREADS": "1",
                "CPL_TRAINER_SAVE_EVERY_STEPS": "5",
                # a killed driver's round and training leases run out soon after the broker redelivers its task
                "CPL_TRAINER_TRAINING_LEASE_S": "30",
                "PYTHONPATH": str(REPO),
            }
        )
        port = find_free_port()
        cli = [sys.executable, "-m", "services.cli"]
        api = Proc(
            "search-api",
            [*cli, "serve", "search", "--host", "127.0.0.1", "--port", str(port)],
            env,
            tmp / "api.log",
            url=f"http://127.0.0.1:{port}",
        )
        worker = Proc("worker", [*cli, "worker", "--queues", "search,train"], env, tmp / "worker.log")
        for proc in (api, worker):
            proc.start()
            procs.append(proc)
        api.wait_http("/ready", timeout=120)
        yield RoundStack(api, worker, policy, value, env, root, tmp)
    finally:
        for proc in reversed(procs):
            proc.stop()
        client = redis.Redis.from_url(REDIS_URL)
        unlink_prefix(client, search_prefix)
        keys = list(client.scan_iter(match=f"{trainer_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_two_rounds_through_the_stack(round_stack: RoundStack) -> None:
    s = round_stack
    train = world.write_gsm8k_jsonl(demo_problems(), s.tmp / "train.jsonl")
    test = world.write_gsm8k_jsonl(world.generate("arith", 2, seed=5, split="test"), s.tmp / "test.jsonl")
    argv = [sys.executable, "-m", "services.cli", "round", "--api", str(s.api.url), "--rounds", "2"]
    argv += ["--input", str(train), "--eval-input", str(test), "--simulations", "24", "--eval-max-tokens", "96"]
    argv += ["--sft-epochs", "1", "--sft-lr", "1e-4", "--apo-epochs", "1", "--apo-lr", "1e-5"]
    argv += ["--value-epochs", "1", "--value-batch-size", "8", "--micro-batch-size", "4"]
    client_log = (s.tmp / "client.log").open("w")
    client = subprocess.Popen(
        argv, cwd=REPO, env={**s.env, "CPL_TRAINER_OPERATOR_KEY": OPERATOR}, stdout=client_log, stderr=subprocess.STDOUT
    )
    round_id = None
    after_round_1: dict[str, str] | None = None
    deadline = time.monotonic() + 2400
    while client.poll() is None:
        assert time.monotonic() < deadline, f"rounds not finished\n{s.logs()}"
        listed = s.get("/v1/rounds")
        if listed:
            round_id = listed[0]["id"]
            stages = {(e["round"], e["stage"]): e for e in listed[0]["stages"]}
            # between round 1's deployment and round 2's, the services serve round 1's models
            between = stages[1, "deploy"]["status"] == "done" and stages[2, "search"]["status"] != "done"
            if after_round_1 is None and between:
                after_round_1 = {"policy": s.version(s.policy), "value": s.version(s.value)}
        time.sleep(0.5)
    client_log.close()
    output = (s.tmp / "client.log").read_text()
    assert client.returncode == 0, f"{output[-3000:]}\n{s.logs()}"
    assert round_id is not None
    record = s.get(f"/v1/rounds/{round_id}")
    assert record["status"] == "succeeded", record
    assert f"round {round_id}: succeeded" in output

    stages = {(e["round"], e["stage"]): e for e in record["stages"]}
    expected = ("search", "export", "sft", "step_apo", "value", "deploy", "eval")
    assert list(stages) == [(r, stage) for r in (1, 2) for stage in expected]
    for key, entry in stages.items():
        # the planner both solves and fails these problems, so every stage has data: none is skipped
        assert entry["status"] == "done", (key, entry)
        assert entry["finished_at"] is not None and entry["outputs"], (key, entry)

    # round 1: plain prompt; round 2: XML prompt (paper §4.1); the batch's Table 1 statistics are kept
    search1, search2 = stages[1, "search"]["outputs"], stages[2, "search"]["outputs"]
    assert (search1["format"], search2["format"]) == ("plain", "xml")
    assert search1["simulations"] == search2["simulations"] == 24
    assert search1["stats"] is not None and search1["counts"]["succeeded"] == 3
    assert search1["model_versions"] == {"policy": [BASE_VERSION], "value": [BASE_VERSION]}
    for r in (1, 2):
        export = stages[r, "export"]["outputs"]
        assert set(export["rows"]) == {"sft", "plan_pairs", "solution_pairs", "value"}
        assert export["rows"]["value"] > 0
        for name, path in export["files"].items():
            assert len(Path(path).read_text().splitlines()) == export["rows"][name]
        for stage in ("sft", "step_apo", "value"):
            entry = stages[r, stage]
            training = s.get(f"/v1/trainings/{entry['outputs']['training_id']}")
            assert training["status"] == "succeeded" and training["checkpoint"] == entry["outputs"]["checkpoint"]
            assert (s.root / training["checkpoint"] / "manifest.json").is_file()
            assert training["loss_curve"], training
    # every round's policy is trained from the base again (Step-APO from that round's SFT model); the value model
    # continues from the one that searched
    for r in (1, 2):
        assert stages[r, "sft"]["outputs"]["started_from"] == "base"
        assert stages[r, "step_apo"]["outputs"]["started_from"] == stages[r, "sft"]["outputs"]["checkpoint"]
    assert stages[1, "value"]["outputs"]["started_from"] == "base"
    assert stages[2, "value"]["outputs"]["started_from"] == stages[1, "value"]["outputs"]["checkpoint"]

    # after round 1 both services reported the round-1 versions, and round 2 was searched by them
    versions1 = stages[1, "deploy"]["outputs"]["versions"]
    assert set(versions1) == {"policy", "value"} and BASE_VERSION not in versions1.values()
    assert after_round_1 == versions1, (after_round_1, versions1)
    assert search2["model_versions"] == {"policy": [versions1["policy"]], "value": [versions1["value"]]}
    searches = httpx.get(
        f"{s.api.url}/v1/searches",
        params={"batch_id": search2["batch_id"], "limit": 50},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    ).json()["searches"]
    assert len(searches) == 3
    for search in searches:
        tree = httpx.get(
            f"{s.api.url}/v1/searches/{search['id']}/tree", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
        ).json()
        produced = {n["model_version"] for n in tree["nodes"] if n.get("model_version")}
        assert produced == {versions1["policy"]}, produced
    # and after round 2 they serve round 2's
    versions2 = stages[2, "deploy"]["outputs"]["versions"]
    assert {"policy": s.version(s.policy), "value": s.version(s.value)} == versions2
    assert set(record["accuracy"]) == {"1", "2"}
    for r in (1, 2):
        assert stages[r, "eval"]["outputs"]["total"] == 2
        assert stages[r, "eval"]["outputs"]["policy_version"] == stages[r, "deploy"]["outputs"]["versions"]["policy"]


def test_a_killed_worker_resumes_the_round_at_the_stage_it_had_reached(round_stack: RoundStack) -> None:
    """SIGKILL the worker (both queues' processes) while a training stage runs; a new worker takes the round up
    once the broker redelivers its task: the stages already done are not run again (the same batch, the same
    records), the interrupted stage runs again under the same training id, and the round succeeds."""
    s = round_stack
    problems = [{"id": f"p{i}", "question": p.question, "answer": str(p.answer)} for i, p in enumerate(demo_problems())]
    body = {
        "problems": problems,
        "eval_problems": problems[:1],
        "eval_max_tokens": 64,
        "rounds": 1,
        "simulations": [24],
        "search_settings": {"max_step_tokens": 96},
        # small batches: the training stages last long enough for the kill to land inside one
        "training": {"sft": {"epochs": 2, "learning_rate": 1e-4, "micro_batch_size": 1, "batch_size": 1}},
    }
    reply = httpx.post(f"{s.api.url}/v1/rounds", json=body, headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=30)
    assert reply.status_code == 202, reply.text
    round_id = reply.json()["id"]
    deadline = time.monotonic() + 900
    while (record := s.get(f"/v1/rounds/{round_id}"))["stage"] not in ("sft", "step_apo"):
        assert record["status"] not in ("succeeded", "failed", "cancelled"), record
        assert time.monotonic() < deadline, f"the round never reached its trainings\n{s.logs()}"
        time.sleep(0.2)
    s.worker.kill()
    killed_in = record["stage"]
    before = {(e["round"], e["stage"]): e for e in s.get(f"/v1/rounds/{round_id}")["stages"]}
    assert before[1, killed_in]["status"] == "running"
    s.worker.start()
    deadline = time.monotonic() + 900
    while (record := s.get(f"/v1/rounds/{round_id}"))["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"the round did not finish after the restart\n{s.logs()}"
        time.sleep(1.0)
    assert record["status"] == "succeeded", (record, s.logs())
    assert record["attempts"] >= 2
    after = {(e["round"], e["stage"]): e for e in record["stages"]}
    for key, entry in before.items():
        if entry["status"] == "done":
            assert after[key] == entry, key  # done before the kill: not run again
    assert after[1, killed_in]["status"] == "done"
    assert after[1, killed_in]["outputs"]["training_id"] == f"{round_id}-r1-{killed_in.replace('_', '-')}"
    assert all(e["status"] == "done" for e in after.values()), after


def test_cancelling_a_running_round_stops_its_search_and_runs_nothing_further(round_stack: RoundStack) -> None:
    s = round_stack
    problems = [{"id": f"c{i}", "question": p.question, "answer": str(p.answer)} for i, p in enumerate(demo_problems())]
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    reply = httpx.post(
        f"{s.api.url}/v1/rounds", json={"problems": problems, "simulations": [400]}, headers=headers, timeout=30
    )
    assert reply.status_code == 202, reply.text
    round_id = reply.json()["id"]
    deadline = time.monotonic() + 600
    while "batch_id" not in (record := s.get(f"/v1/rounds/{round_id}"))["stages"][0]["outputs"]:
        assert time.monotonic() < deadline, f"the round's search never started\n{s.logs()}"
        time.sleep(0.2)
    cancel = httpx.post(f"{s.api.url}/v1/rounds/{round_id}/cancel", headers=headers, timeout=30)
    assert cancel.status_code == 202 and cancel.json()["cancel_requested"]
    deadline = time.monotonic() + 300
    while (record := s.get(f"/v1/rounds/{round_id}"))["status"] != "cancelled":
        assert record["status"] == "running", record
        assert time.monotonic() < deadline, f"the round was not cancelled\n{s.logs()}"
        time.sleep(0.5)
    assert record["stages"][0]["status"] == "cancelled"
    assert [e["status"] for e in record["stages"][1:]] == ["pending"] * (len(record["stages"]) - 1)
    # the round's batch is cancelled with it: its searches stop between simulations
    batch_id = record["stages"][0]["outputs"]["batch_id"]
    search_headers = {"Authorization": f"Bearer {API_KEY}"}
    while not (batch := httpx.get(f"{s.api.url}/v1/batches/{batch_id}", headers=search_headers, timeout=30).json())[
        "done"
    ]:
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
    assert batch["counts"]["cancelled"] == 3, batch
    assert httpx.post(f"{s.api.url}/v1/rounds/{round_id}/cancel", headers=headers, timeout=30).status_code == 409
