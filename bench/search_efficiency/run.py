"""Search efficiency of the stack: a batch through the whole stack vs the same generation work in one offline batch.

    .venv/bin/python bench/search_efficiency/run.py --concurrency 4,16 --problems 8 --simulations 16

The stack of ``cpl up`` is started once (private Redis when none answers at ``CPL_REDIS_URL``; policy and value
services on the embedded planner; the search API), with a recording proxy between the worker and the policy
service that writes down every ``POST /v1/expand`` body. For each worker concurrency, the worker is started
with that many Celery threads and a batch of held-out toy problems runs to the end (stack time: submit to the
last search final). The stack is stopped, then each batch's recorded generation requests are replayed through
vLLM's offline ``LLM.generate`` in one call, on the same machine, with the policy service's engine settings and
the exact prompts and sampling settings the service sent to its vLLM server
(``services.policy.app.completion_payload``).

efficiency = replay time / stack time. 1.0 would mean the stack adds nothing to pure generation (value calls,
tree bookkeeping, Redis, HTTP, and the batches vLLM gets being smaller than one offline batch all count against
it). Sampling is random, so the replay's token counts differ a little from the stack's: both are reported.
``cores`` says where the machine went during the batch: each stack process's CPU seconds per wall second, by
service and process (a vLLM server is a gateway, an API server, an engine core and a compute worker).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cpl.protocols import ExpandRequest
from services.common.ports import find_free_port
from services.policy.app import completion_payload
from services.stack.client import SearchAPIClient, Target
from services.stack.demo import demo_problems
from services.stack.up import REPO_ASSETS, Stack

MAX_MODEL_LEN = 2048  # the policy service's under cpl up (services/stack/up.py)


class RecordingProxy:
    """Forwards every request to the policy service and keeps the bodies of ``POST /v1/expand``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.expands: list[dict[str, Any]] = []
        self.port = find_free_port()
        self.client = httpx.AsyncClient(base_url=upstream, timeout=600)
        app = Starlette(routes=[Route("/{path:path}", self.forward, methods=["GET", "POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        if request.method == "POST" and request.url.path == "/v1/expand":
            self.expands.append(json.loads(body))
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        r = await self.client.request(request.method, request.url.path, content=body, headers=headers)
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class RecordedStack(Stack):
    proxy: RecordingProxy | None = None

    def search_env(self, policy_url: str, value_url: str) -> dict[str, str]:
        self.proxy = RecordingProxy(policy_url)
        self.proxy.start()
        return super().search_env(self.proxy.url, value_url)


def restart_worker(stack: Stack, concurrency: int) -> None:
    """The stack's worker, stopped and started again with ``concurrency`` Celery threads."""
    worker = next(c for c in stack.children if c.name == "worker")
    worker.stop(timeout_s=60)
    worker.env = {**worker.env, "CPL_SEARCH_WORKER_CONCURRENCY": str(concurrency)}
    worker.start()
    stack._wait_worker(worker.env)


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process of the stack, by child and process name (a vLLM
    server is a gateway, an API server, an engine core and a compute worker), and by this process (the proxy)."""
    used = {"bench (proxy)": sum(psutil.Process().cpu_times()[:2])}
    for child in stack.children:
        for proc in child.tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                name = proc.name()
                if name.startswith("python"):
                    cmd = " ".join(proc.cmdline())
                    name = "vllm api server" if "vllm.entrypoints" in cmd else "python"
                key = f"{child.name}: {name}"
                used[key] = used.get(key, 0.0) + sum(proc.cpu_times()[:2])
    return used


def run_batches(args: argparse.Namespace, concurrencies: list[int]) -> dict[int, tuple[float, list, int, dict]]:
    """One stack; for each concurrency a fresh worker and one batch: (stack seconds, recorded expands, sims, cores
    used by each process)."""
    stack = RecordedStack(run_dir=args.run_dir, port=find_free_port())
    runs: dict[int, tuple[float, list, int, dict]] = {}
    try:
        stack.start()
        assert stack.proxy is not None
        with SearchAPIClient(Target(stack.url, stack.api_key), timeout_s=120) as client:
            for c in concurrencies:
                restart_worker(stack, c)
                stack.proxy.expands.clear()
                cpu0 = cpu_seconds(stack)
                t0 = time.monotonic()
                batch = client.submit_problems(demo_problems(args.problems), args.simulations)
                batch = client.follow(batch["id"], interval_s=0.5, show_bar=False)
                stack_s = time.monotonic() - t0
                cpu1 = cpu_seconds(stack)
                # Where the cores went: each process's CPU seconds over the batch's wall seconds.
                cores = {name: round((cpu1[name] - cpu0.get(name, 0.0)) / stack_s, 2) for name in cpu1}
                sims = sum(s["progress"]["simulations_done"] for s in client.batch_searches(batch["id"]))
                runs[c] = (stack_s, list(stack.proxy.expands), sims, cores)
                print(
                    json.dumps({"concurrency": c, "stack_s": stack_s, "simulations": sims, "cores": cores}), flush=True
                )
    finally:
        if stack.proxy is not None:
            stack.proxy.stop()
        stack.stop()
    return runs


def open_llm() -> Any:
    """The offline engine with the policy service's settings under cpl up (services/stack/up.py)."""
    from vllm import LLM

    return LLM(
        model=str(REPO_ASSETS / "policy"),
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=256 << 20,
        enforce_eager=True,
    )


def replay(llm: Any, expands: list[dict[str, Any]]) -> tuple[float, int, int]:
    """Every recorded state's completion, in one ``LLM.generate`` call; answers (seconds, prompts, tokens)."""
    from vllm import SamplingParams

    prompts, params = [], []
    for body in expands:
        for raw in body["requests"]:
            payload = completion_payload(ExpandRequest.model_validate(raw), "policy", MAX_MODEL_LEN)
            prompts.append(payload["prompt"])
            params.append(
                SamplingParams(
                    n=payload["n"],
                    temperature=payload["temperature"],
                    max_tokens=payload["max_tokens"],
                    stop=payload["stop"],
                    logprobs=0,
                )
            )
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up, outside the timing
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return seconds, len(prompts), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="4,16", help="worker concurrencies to compare (comma-separated)")
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--simulations", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--run-dir", type=Path, default=Path("runs/bench_search_efficiency"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    results = []
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    for r in range(args.rounds):
        # Problems differ between rounds only through sampling; the stack is fresh each round.
        runs = run_batches(args, concurrencies)
        llm = open_llm()
        for c, (stack_s, expands, sims, cores) in runs.items():
            replay_s, prompts, tokens = replay(llm, expands)
            res = {
                "round": r,
                "concurrency": c,
                "stack_s": stack_s,
                "simulations": sims,
                "expand_requests": len(expands),
                "states": prompts,
                "replay_s": replay_s,
                "replay_tokens": tokens,
                "efficiency": replay_s / stack_s,
                "load1": os.getloadavg()[0],
                "cores": cores,
            }
            results.append(res)
            print(json.dumps(res), flush=True)
        del llm
    for c in sorted({x["concurrency"] for x in results}):
        eff = statistics.median(x["efficiency"] for x in results if x["concurrency"] == c)
        print(f"concurrency {c}: efficiency {eff:.2f} (median of {args.rounds})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
