"""Latency of lone and lightly concurrent /v1/values requests for given vLLM spin windows (VLLM_BUSY_LOOP_S).

One fresh value gateway on the embedded planner per window; 25 single-state requests with gaps of 0-0.8 s, then
6 clients for 8 s. The gateway now refuses a window of 0, which showed vLLM's lost wake-ups as multi-second
requests (measured with this procedure before the refusal: docs/decisions/007-value-engine-does-not-spin.md).

    .venv/bin/python bench/value_wakeup/run.py 0.005 0.02 default
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from services.common.ports import find_free_port  # noqa: E402

PLANNER = REPO / "cpl" / "assets" / "planner"


def start(window: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = find_free_port()
    env = dict(os.environ)
    settings = {
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "MODEL": str(PLANNER / "value"),
        "CHECKPOINT_ROOT": str(PLANNER),
        "DTYPE": "float32",
        "MAX_MODEL_LEN": "2048",
        "KV_CACHE_MEMORY_BYTES": str(128 << 20),
        "ENFORCE_EAGER": "true",
    }
    if window != "default":
        settings["VLLM_BUSY_LOOP_S"] = window
    env.update({f"CPL_VALUE_{k}": v for k, v in settings.items()})
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.value.main"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            sys.exit(f"window {window}: the value service exited, see {log}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def sequential(url: str, rnd: random.Random) -> list[float]:
    latencies = []
    for i in range(25):
        start = time.perf_counter()
        httpx.post(f"{url}/v1/values", json={"states": [{"question": f"What is {i} + 3?"}]}, timeout=60)
        latencies.append(time.perf_counter() - start)
        time.sleep(rnd.choice([0.0, 0.01, 0.03, 0.1, 0.3, 0.8]))
    return latencies


async def concurrent(url: str, rnd: random.Random) -> list[float]:
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(k: int) -> None:
            end = time.perf_counter() + 8
            while time.perf_counter() < end:
                start = time.perf_counter()
                await client.post(f"{url}/v1/values", json={"states": [{"question": f"Q {k} {start}"}] * (k + 1)})
                latencies.append(time.perf_counter() - start)
                await asyncio.sleep(rnd.choice([0.0, 0.02, 0.2]))

        await asyncio.gather(*(one(k) for k in range(6)))
    return latencies


def main() -> None:
    windows = sys.argv[1:] or ["0.005", "0.02", "default"]
    logs = Path(tempfile.mkdtemp(prefix="value_wakeup_"))
    for window in windows:
        proc, url = start(window, logs / f"value_{window}.log")
        try:
            rnd = random.Random(0)
            seq = sequential(url, rnd)
            conc = asyncio.run(concurrent(url, rnd))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        print(
            f"window {window}: one at a time max {max(seq) * 1000:.0f} ms, {sum(x > 1 for x in seq)} over 1 s | "
            f"6 clients: {len(conc)} requests, max {max(conc) * 1000:.0f} ms, {sum(x > 1 for x in conc)} over 1 s",
            flush=True,
        )


if __name__ == "__main__":
    main()
