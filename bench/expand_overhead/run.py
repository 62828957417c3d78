"""Gateway overhead of ``POST /v1/expand``: the same expansion requests through the policy gateway vs sent
straight to its vLLM server.

    .venv/bin/python bench/expand_overhead/run.py                  # builds a tiny model, starts one gateway
    .venv/bin/python bench/expand_overhead/run.py --model DIR --rounds 7 --states 32

One policy gateway is started (it starts vLLM on a fixed localhost port, so the benchmark can also reach vLLM
directly). Each round runs the same workload twice, direct then gateway (order alternating between rounds):
``--batches`` batches of ``--states`` distinct states (few-shot plain prompts), ``--concurrency`` batches in
flight at once, k candidates per state.

* gateway: one ``POST /v1/expand`` per batch (the gateway fans out one vLLM request per state);
* direct: for each batch, one vLLM ``/v1/completions`` request per state, all at once, with the exact body the
  gateway sends (``services.policy.app.completion_payload``), JSON decoded by the client.

Both modes use aiohttp on the benchmark side (httpx costs ~1.7 ms of CPU per request with a busy pool, which on
a 2-core machine would slow the direct mode down and flatter the gateway). The gateway's own CPU time per run
is read from /proc and reported too.

Throughput is generated tokens per second (sampling lengths vary a little between runs; tokens/s normalises
for that). The report gives per-mode medians over the rounds and the ratio gateway/direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cpl.formats import StepKind  # noqa: E402
from cpl.protocols import ExpandRequest, State  # noqa: E402
from services.common.ports import find_free_port  # noqa: E402
from services.policy.app import completion_payload  # noqa: E402

NAMES = ["Ann", "Ben", "Carla", "Dev", "Emma", "Farid", "Gina", "Hugo"]
ITEMS = ["apples", "books", "coins", "pencils", "stickers", "marbles"]


def workload(batches: int, states: int, k: int, max_tokens: int) -> list[list[ExpandRequest]]:
    out = []
    for b in range(batches):
        batch = []
        for s in range(states):
            i = b * states + s
            name, item = NAMES[i % len(NAMES)], ITEMS[(i // len(NAMES)) % len(ITEMS)]
            question = f"{name} has {i + 3} {item} and buys {i % 17 + 2} more. How many {item} does {name} have now?"
            steps = [(StepKind.PLAN, f"Plan 1: Take the starting number of {item}.")] if i % 2 else []
            batch.append(
                ExpandRequest(state=State(question=question, steps=steps), n=k, temperature=0.7, max_tokens=max_tokens)
            )
        out.append(batch)
    return out


JSON = {"Content-Type": "application/json"}


async def run_gateway(url: str, work: list[list[ExpandRequest]], concurrency: int) -> tuple[float, int]:
    bodies = [json.dumps({"requests": [r.model_dump(mode="json") for r in batch]}) for batch in work]
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=concurrency * 2)) as session:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(body: str) -> int:
            async with semaphore, session.post("/v1/expand", data=body, headers=JSON) as response:
                response.raise_for_status()
                data = await response.json()
            return sum(c["num_tokens"] for r in data["results"] for c in r["candidates"])

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start, sum(tokens)


async def run_direct(url: str, work: list[list[ExpandRequest]], concurrency: int, model: str) -> tuple[float, int]:
    max_model_len = 4096  # the server runs with the gateway's default --max-model-len
    bodies = [[json.dumps(completion_payload(r, model, max_model_len)) for r in batch] for batch in work]
    limit = concurrency * max(len(b) for b in work)
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=limit)) as session:
        semaphore = asyncio.Semaphore(concurrency)

        async def state(body: str) -> int:
            async with session.post("/v1/completions", data=body, headers=JSON) as response:
                response.raise_for_status()
                data = await response.json()
            return sum(len(c["token_ids"]) for c in data["choices"])

        async def one(batch: list[str]) -> int:
            async with semaphore:
                return sum(await asyncio.gather(*(state(b) for b in batch)))

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start, sum(tokens)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (the gateway itself, not its vLLM child)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(model: Path, port: int, vllm_port: int, log: Path, extra_env: dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        {
            "CPL_POLICY_MODEL": str(model),
            "CPL_POLICY_HOST": "127.0.0.1",
            "CPL_POLICY_PORT": str(port),
            # The benchmark also calls vLLM directly (the baseline), so vLLM listens on a TCP port, not a socket.
            "CPL_POLICY_VLLM_UDS": "false",
            "CPL_POLICY_VLLM_PORT": str(vllm_port),
            "CPL_POLICY_LOG_LEVEL": "WARNING",
            **extra_env,
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "services.policy.main"],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("gateway not ready in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="policy model directory (default: build a tiny model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8, help="batches per run")
    parser.add_argument("--states", type=int, default=32, help="states per batch (per /v1/expand request)")
    parser.add_argument("--k", type=int, default=3, help="candidates per state")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=2, help="batches in flight at once")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cpl-bench-"))
    model = args.model
    if model is None:
        from cpl.models.tiny import build_tiny_models

        model, _ = build_tiny_models(tmp / "tiny")
    port, vllm_port = find_free_port(), find_free_port()
    gateway_url, vllm_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vllm_port}"
    env = {"CPL_POLICY_DTYPE": args.dtype, "CPL_POLICY_KV_CACHE_MEMORY_BYTES": str(args.kv_cache_memory_bytes)}
    proc = start_gateway(model, port, vllm_port, tmp / "gateway.log", env)
    try:
        wait_ready(gateway_url, proc)
        work = workload(args.batches, args.states, args.k, args.max_tokens)
        warm = workload(1, args.states, args.k, args.max_tokens)
        asyncio.run(run_gateway(gateway_url, warm, 1))
        asyncio.run(run_direct(vllm_url, warm, 1, "policy"))
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        for r in range(args.rounds):
            order = ["direct", "gateway"] if r % 2 == 0 else ["gateway", "direct"]
            for mode in order:
                cpu_before = cpu_seconds(proc.pid)
                if mode == "gateway":
                    seconds, tokens = asyncio.run(run_gateway(gateway_url, work, args.concurrency))
                else:
                    seconds, tokens = asyncio.run(run_direct(vllm_url, work, args.concurrency, "policy"))
                gateway_cpu = cpu_seconds(proc.pid) - cpu_before
                states = args.batches * args.states
                runs[mode].append(
                    {
                        "seconds": seconds,
                        "tokens": tokens,
                        "tokens_per_s": tokens / seconds,
                        "states_per_s": states / seconds,
                        "gateway_cpu_s": gateway_cpu,
                    }
                )
                print(
                    f"round {r + 1} {mode:8s} {seconds:7.2f}s {tokens:7d} tokens {tokens / seconds:8.0f} tok/s "
                    f"{states / seconds:6.1f} states/s  gateway CPU {gateway_cpu:5.2f}s",
                    flush=True,
                )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    median = {m: statistics.median(x["tokens_per_s"] for x in v) for m, v in runs.items()}
    median_states = {m: statistics.median(x["states_per_s"] for x in v) for m, v in runs.items()}
    ratio = median["gateway"] / median["direct"]
    gateway_cpu_per_state_ms = statistics.median(
        1000 * x["gateway_cpu_s"] / (args.batches * args.states) for x in runs["gateway"]
    )
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "median_tokens_per_s": median,
        "median_states_per_s": median_states,
        "ratio_gateway_over_direct": ratio,
        "gateway_overhead_pct": (1 - ratio) * 100,
        "gateway_cpu_ms_per_state": gateway_cpu_per_state_ms,
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
