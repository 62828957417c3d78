"""What a deployment does to requests in flight: latency of ``/v1/expand`` while a checkpoint is swapped into two
policy replicas, against the same load with no deployment (measured in the same run).

Set-up: the tiny Llama of ``cpl.models.tiny`` as the base (``A``) and two checkpoints published by real SFT jobs
(``sft-1``, ``sft-2``) under one checkpoint root; two policy gateways (each with its vLLM child: float32,
``--enforce-eager``, 128 MiB KV cache, its OpenMP threads on a core of its own) on that root; Redis on
127.0.0.1:6379 (keys under a unique prefix, removed at the end). Load: ``--clients`` clients, each sending one
greedy ``/v1/expand`` state (``--max-tokens`` tokens) after the other, without pause, routed in one of two ways:

* ``pinned`` (the baseline): half of the clients on each replica, a client per URL, as a client of one replica
  sees a deployment;
* ``replicas``: every client holds both URLs (``PolicyClient("URL1,URL2")``): the least busy replica, a swapping
  one skipped (``Prefer: wait=0``, ``services/common/client.py``).

Each round runs both routings in turn: ``--window`` seconds of load alone (the baseline), then a deployment
(sft-1 and sft-2 alternate) under the same load. The clients run in a process of their own (wall-clock times),
so the deployment's transformers probe in this process cannot delay them. Per round: the baseline's median and
longest request, the longest request that overlapped the deployment (which includes the deployer computing the
transformers probe on the same two cores), the longest request that overlapped a replica's swap (the swap's own
effect), the extra waits (each minus the baseline median), each replica's swap time, and failed requests (must
be 0). Medians
over rounds at the end, per routing.

    .venv/bin/python bench/deploy_pause/run.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import redis
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cpl.protocols import ExpandRequest, State  # noqa: E402
from services.policy.client import PolicyClient  # noqa: E402
from services.trainer.deploy import Deployer, DeploymentRequest, DeploymentTarget  # noqa: E402
from services.trainer.jobs import TrainingSpec, run_training  # noqa: E402
from services.trainer.probe import PROBE_QUESTION  # noqa: E402
from services.trainer.settings import TrainerSettings  # noqa: E402
from tests.services.conftest import ADMIN_TOKEN, _start, _stop  # noqa: E402
from tests.training.helpers import sft_rows, write_jsonl  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"


def publish(settings: TrainerSettings, tmp: Path) -> None:
    for seed, name in [(1, "sft-1"), (2, "sft-2")]:
        data = write_jsonl(tmp / f"{name}.jsonl", sft_rows(6, seed=seed))
        overrides = {"learning_rate": 5e-3, "epochs": 2, "batch_size": 2, "seed": seed}
        run_training(
            TrainingSpec(id=f"bench-{name}", kind="sft", data=[data], name=name, overrides=overrides), settings
        )


async def load(urls: list[str], routing: str, clients: int, max_tokens: int) -> dict:
    """The load generator (``--load``, its own process): requests until stdin closes, then every request's
    wall-clock (start, end) and the failures, as JSON on stdout."""
    request = ExpandRequest(
        state=State(question=PROBE_QUESTION), n=1, temperature=0.0, max_tokens=max_tokens, few_shot=False
    )
    records: list[tuple[float, float]] = []
    failures: list[str] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(1) else None)
    targets = urls if routing == "pinned" else [",".join(urls)]
    pool = [PolicyClient(target, retries=0, max_connections=clients) for target in targets]

    async def client(i: int) -> None:
        policy = pool[i % len(pool)]
        while not stop.is_set():
            start = time.time()
            try:
                await policy.expand([request])
            except Exception as exc:  # counted and reported: a deployment must not fail requests
                failures.append(repr(exc))
                continue
            records.append((start, time.time()))

    await asyncio.gather(*(client(i) for i in range(clients)))
    for policy in pool:
        await policy.aclose()
    return {"records": records, "failures": failures}


async def deploy(settings: TrainerSettings, checkpoint: str):
    redis_client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return await Deployer(settings, redis_client).deploy(
            DeploymentRequest(targets=[DeploymentTarget(service="policy", checkpoint=checkpoint)])
        )
    finally:
        await redis_client.aclose()


def one_round(settings: TrainerSettings, urls: list[str], checkpoint: str, routing: str, args) -> dict:
    # The clients run in a process of their own: the deployment's transformers probe in this one must not
    # delay them (the GIL, torch's threads), or the figures would measure this process instead of the replicas.
    argv = [sys.executable, __file__, "--load", ",".join(urls), "--routing", routing]
    argv += ["--clients", str(args.clients), "--max-tokens", str(args.max_tokens)]
    loader = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    time.sleep(args.window)
    deploy_start = time.time()
    deployment = asyncio.run(deploy(settings, checkpoint))
    deploy_end = time.time()
    time.sleep(1.0)
    out, _ = loader.communicate(input="", timeout=300)
    result = json.loads(out)
    if deployment.status != "succeeded":
        raise RuntimeError(f"deployment failed: {deployment.error}")
    records = result["records"]
    baseline = [end - start for start, end in records if end < deploy_start]
    during = [end - start for start, end in records if end > deploy_start and start < deploy_end]
    swaps = [
        (t0, t0 + o.swap_seconds)
        for o in deployment.replicas
        for t0 in [datetime.fromisoformat(o.swap_started_at).timestamp()]
    ]
    # The swap's own effect: the requests that overlapped a replica's swap (drain, reload, probe in the gateway).
    during_swaps = [end - start for start, end in records if any(end > a and start < b for a, b in swaps)]
    median = statistics.median(baseline)
    return {
        "routing": routing,
        "checkpoint": checkpoint,
        "requests": len(records),
        "failed": len(result["failures"]),
        "baseline_median_s": round(median, 3),
        "baseline_max_s": round(max(baseline), 3),
        "during_max_s": round(max(during), 3),
        "extra_wait_s": round(max(during) - median, 3),
        "during_swaps_max_s": round(max(during_swaps, default=0.0), 3),
        "swap_extra_wait_s": round(max(during_swaps, default=median) - median, 3),
        "deployment_s": round(deploy_end - deploy_start, 3),
        "swap_s": [o.swap_seconds for o in deployment.replicas],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--window", type=float, default=5.0, help="seconds of load before each deployment")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--load", default=None, help=argparse.SUPPRESS)  # the load generator's process
    parser.add_argument("--routing", default="pinned", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(load(args.load.split(","), args.routing, args.clients, args.max_tokens))))
        return

    from cpl.models.tiny import build_tiny_models

    tmp = Path(tempfile.mkdtemp(prefix="cpl-deploy-bench-"))
    prefix = f"cpl-bench-deploy-{uuid.uuid4().hex[:8]}:"
    procs: list[subprocess.Popen] = []
    try:
        root = tmp / "root"
        policy_a, _ = build_tiny_models(root / "A", seed=0)
        settings = TrainerSettings(
            checkpoint_root=root,
            base_policy=policy_a,
            redis_url=REDIS_URL,
            key_prefix=prefix,
            admin_token=ADMIN_TOKEN,
        )
        publish(settings, tmp)
        env = {
            "CPL_POLICY_MODEL": str(policy_a),
            "CPL_POLICY_DTYPE": "float32",
            "CPL_POLICY_KV_CACHE_MEMORY_BYTES": str(128 << 20),
            "CPL_POLICY_ENFORCE_EAGER": "true",
        }
        services = []
        cpus = os.cpu_count() or 1
        for i in range(2):
            # One core each where there are two or more (vLLM's auto binding would put both engines on core 0):
            # replicas on separate machines, as deployed, as far as one machine allows.
            bind = {} if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") else {"VLLM_CPU_OMP_THREADS_BIND": str(i % cpus)}
            service = _start("services.policy.main", "CPL_POLICY_", env | bind, tmp / f"policy{i}.log", root)
            procs.append(service.proc)
            services.append(service)
        settings = settings.model_copy(update={"policy_replicas": [s.url for s in services]})
        results: dict[str, list[dict]] = {"pinned": [], "replicas": []}
        deployments = 0
        for _ in range(args.rounds):
            for routing, rounds in results.items():
                checkpoint = ["sft-1", "sft-2"][deployments % 2]
                deployments += 1
                result = one_round(settings, settings.policy_replicas, checkpoint, routing, args)
                print(json.dumps(result), flush=True)
                rounds.append(result)
        for routing, rounds in results.items():
            summary = {
                key: statistics.median(r[key] for r in rounds)
                for key in (
                    "baseline_median_s",
                    "baseline_max_s",
                    "during_max_s",
                    "extra_wait_s",
                    "during_swaps_max_s",
                    "swap_extra_wait_s",
                    "deployment_s",
                )
            }
            summary["failed_total"] = sum(r["failed"] for r in rounds)
            summary["requests_total"] = sum(r["requests"] for r in rounds)
            summary["swap_s_median"] = statistics.median(s for r in rounds for s in r["swap_s"])
            print(json.dumps({"routing": routing, "median_of_rounds": summary, "rounds": args.rounds}))
        print(json.dumps({"clients": args.clients, "load_average": os.getloadavg()}))
    finally:
        for proc in procs:
            _stop(proc)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
