"""Search efficiency of the stack: a batch through the whole stack vs the same generation work in one offline batch.

    .venv/bin/python bench/search_efficiency/run.py --concurrency 4,16 --problems 8 --simulations 16

For each worker concurrency: the stack of ``cpl up`` is started (private Redis when none answers at
``CPL_REDIS_URL``; policy and value services on the embedded planner; the search API; one worker with that many
Celery threads), with a recording proxy between the worker and the policy service that writes down every
``POST /v1/expand`` body. A batch of held-out toy problems runs to the end (stack time: submit to the last search
final). The stack is stopped, then every recorded generation request is replayed through vLLM's offline
``LLM.generate`` in one call, on the same machine, with the policy service's engine settings and the exact
prompts and sampling settings the service sent to its vLLM server (``services.policy.app.completion_payload``).

efficiency = replay time / stack time. 1.0 would mean the stack adds nothing to pure generation (value calls,
tree bookkeeping, Redis, HTTP, and the batches vLLM gets being smaller than one offline batch all count against
it). Sampling is random, so the replay's token counts differ a little from the stack's: both are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
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


def run_stack(args: argparse.Namespace, concurrency: int, run_dir: Path) -> tuple[float, list[dict[str, Any]], int]:
    os.environ["CPL_SEARCH_WORKER_CONCURRENCY"] = str(concurrency)
    stack = RecordedStack(run_dir=run_dir, port=find_free_port())
    try:
        stack.start()
        with SearchAPIClient(Target(stack.url, stack.api_key), timeout_s=120) as client:
            t0 = time.monotonic()
            batch = client.submit_problems(demo_problems(args.problems), args.simulations)
            batch = client.follow(batch["id"], interval_s=0.5, show_bar=False)
            stack_s = time.monotonic() - t0
            sims = sum(s["progress"]["simulations_done"] for s in client.batch_searches(batch["id"]))
        assert stack.proxy is not None
        return stack_s, list(stack.proxy.expands), sims
    finally:
        if stack.proxy is not None:
            stack.proxy.stop()
        stack.stop()


def replay(expands: list[dict[str, Any]]) -> tuple[float, int, int]:
    """Every recorded state's completion, in one ``LLM.generate`` call; answers (seconds, prompts, tokens)."""
    from vllm import LLM, SamplingParams

    prompts, params = [], []
    for body in expands:
        for raw in body["requests"]:
            payload = completion_payload(ExpandRequest.model_validate(raw), "policy")
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
    llm = LLM(
        model=str(REPO_ASSETS / "policy"),
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=256 << 20,
        enforce_eager=True,
    )
    try:
        llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up, outside the timing
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
    finally:
        del llm
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
    for r in range(args.rounds):
        for c in [int(x) for x in args.concurrency.split(",")]:
            stack_s, expands, sims = run_stack(args, c, args.run_dir / f"c{c}-r{r}")
            replay_s, prompts, tokens = replay(expands)
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
            }
            results.append(res)
            print(json.dumps(res), flush=True)
    for c in sorted({x["concurrency"] for x in results}):
        eff = statistics.median(x["efficiency"] for x in results if x["concurrency"] == c)
        print(f"concurrency {c}: efficiency {eff:.2f} (median of {args.rounds})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
