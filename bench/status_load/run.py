"""Status polling under load: 100 concurrent pollers of ``GET /v1/searches/{id}`` while a batch runs.

    .venv/bin/cpl up &                                        # the stack (or any running search API)
    .venv/bin/python bench/status_load/run.py --rounds 3      # finds it through runs/up/stack.json

Each round runs three windows of ``--seconds`` (default 30) over a fresh batch, in turn:

* ``none``: no pollers (the baseline throughput);
* ``plain``: ``--pollers`` clients each polling one running search of the batch, full answers;
* ``etag``: the same with ``If-None-Match`` (the ETag of the previous answer: mostly 304s).

Each poller starts at a random moment within the first ``--interval`` seconds (independent dashboards do not
poll in step), then sends one request, waits ``--interval`` seconds, and so on (a dashboard polls every 2 s; 1 s
is twice that). Throughput is the batch's simulations done in the window per second (read from the API before and
after); latency is measured by the client per request; an error is any transport failure or a status other
than 200/304. The report gives medians over rounds, and the ratio of throughput with pollers to without.

The pollers share the machine with the stack, so their own cost is part of what they measure: they use aiohttp
(about a third of httpx's CPU per request), and the report gives this process's event-loop lag beside the
latencies, so a stall of the load generator is not read as one of the API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

import aiohttp
import httpx

from services.stack.client import resolve_target
from services.stack.demo import demo_problems


async def simulations_done(client: httpx.AsyncClient, batch_id: str) -> int:
    page = (await client.get("/v1/searches", params={"batch_id": batch_id, "limit": 200})).json()
    return sum(s["progress"]["simulations_done"] for s in page["searches"])


async def poller(
    session: aiohttp.ClientSession, url: str, etag_mode: bool, stop: float, interval: float, out: dict
) -> None:
    etag = None
    # Independent dashboards do not poll in step: each starts at its own moment within the interval.
    await asyncio.sleep(random.uniform(0, interval))
    while time.monotonic() < stop:
        headers = {"If-None-Match": etag} if etag_mode and etag else {}
        t0 = time.perf_counter()
        try:
            async with session.get(url, headers=headers) as r:
                await r.read()
            out["lat"].append(time.perf_counter() - t0)
            out["at"].append(t0)
            if r.status == 200:
                etag = r.headers.get("ETag")
                out["200"] += 1
            elif r.status == 304:
                out["304"] += 1
            else:
                out["errors"] += 1
                out["error_kinds"].append(f"HTTP {r.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            out["errors"] += 1
            out["error_kinds"].append(repr(exc)[:200])
        await asyncio.sleep(interval)


async def loop_lag(stop: float, out: list[float]) -> None:
    """How late this process's event loop wakes from a 10 ms sleep: a poller's latency includes it, so a large lag
    means the load generator itself stalled, not the API."""
    while time.monotonic() < stop:
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        out.append(time.perf_counter() - t - 0.01)


async def server_buckets(client: httpx.AsyncClient, endpoint: str) -> dict[float, float]:
    """The API's own latency histogram for ``endpoint`` (cumulative counts per upper bound, from /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics")).text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_request_latency_seconds"):
            for sample in family.samples:
                if sample.name.endswith("_bucket") and sample.labels.get("endpoint") == endpoint:
                    buckets[float(sample.labels["le"])] = sample.value
    return buckets


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile ``q`` of the requests between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    return next(b for b, c in zip(bounds, counts, strict=True) if c >= q * counts[-1])


async def window(args: argparse.Namespace, mode: str, url: str, key: str) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=args.pollers + 10, max_keepalive_connections=args.pollers + 10)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
        problems = demo_problems(args.problems)
        batch = (await client.post("/v1/batches", json={"problems": problems, "simulations": args.simulations})).json()
        batch_id = batch["id"]
        # Wait for the batch to be running, then measure.
        target = None
        while target is None:
            page = (await client.get("/v1/searches", params={"batch_id": batch_id, "status": "running"})).json()
            if page["searches"]:
                target = page["searches"][0]["id"]
            else:
                await asyncio.sleep(0.5)
        await asyncio.sleep(args.warmup)
        out = {"lat": [], "at": [], "200": 0, "304": 0, "errors": 0, "error_kinds": []}
        lags: list[float] = []
        # Searches by id are not a fixed path: the API's metrics count them under "other".
        buckets_before = await server_buckets(client, "other")
        before = await simulations_done(client, batch_id)
        window_start = time.perf_counter()
        t0 = time.monotonic()
        stop = t0 + args.seconds
        if mode != "none":
            connector = aiohttp.TCPConnector(limit=args.pollers)
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout) as session:
                await asyncio.gather(
                    loop_lag(stop, lags),
                    *(
                        poller(session, f"{url}/v1/searches/{target}", mode == "etag", stop, args.interval, out)
                        for _ in range(args.pollers)
                    ),
                )
        else:
            await asyncio.sleep(args.seconds)
        elapsed = time.monotonic() - t0
        after = await simulations_done(client, batch_id)
        buckets_after = await server_buckets(client, "other")
        await client.post(f"/v1/batches/{batch_id}/cancel")
        lat = sorted(out["lat"])
        result = {
            "mode": mode,
            "throughput_sims_s": (after - before) / elapsed,
            "requests": len(lat),
            "errors": out["errors"],
            "not_modified": out["304"],
        }
        if lat:
            result["p50_ms"] = 1000 * lat[len(lat) // 2]
            result["p99_ms"] = 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            # When the slowest requests were sent (seconds into the window): clustered means a stall.
            slowest = sorted(zip(out["lat"], out["at"], strict=True), reverse=True)[:10]
            result["slowest_sent_at_s"] = [round(at - window_start, 2) for _, at in slowest]
            result["error_kinds"] = sorted(set(out["error_kinds"]))[:5]
            lags.sort()
            result["client_loop_lag_p99_ms"] = 1000 * lags[int(0.99 * (len(lags) - 1))]
            result["client_loop_lag_max_ms"] = 1000 * lags[-1]
            for q in (0.5, 0.99):
                bound = bucket_quantile(buckets_before, buckets_after, q)
                result[f"server_p{round(q * 100)}_ms_at_most"] = None if bound is None else 1000 * bound
        # Let the cancelled batch drain before the next window (at most a minute: a search that does not stop is
        # reported, not waited for).
        deadline = time.monotonic() + 60
        while True:
            b = (await client.get(f"/v1/batches/{batch_id}")).json()
            if b["done"] or time.monotonic() > deadline:
                result["not_final_after_cancel"] = b["counts"].get("cancelling", 0) + b["counts"].get("running", 0)
                break
            await asyncio.sleep(0.5)
        return result


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None)
    p.add_argument("--run-dir", type=Path, default=Path("runs/up"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--pollers", type=int, default=100)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between one poller's requests")
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--simulations", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="write every window's figures here (JSON)")
    args = p.parse_args()
    target = resolve_target(args.url, args.run_dir)
    if not target.api_key:
        raise SystemExit("no API key: set CPL_SEARCH_API_KEY or run next to cpl up")
    results = []
    for r in range(args.rounds):
        for mode in ("none", "plain", "etag"):
            res = await window(args, mode, target.url, target.api_key)
            res["round"] = r
            res["load1"] = os.getloadavg()[0]
            results.append(res)
            print(json.dumps(res), flush=True)
    print("\nmedians over rounds:")
    base = statistics.median(x["throughput_sims_s"] for x in results if x["mode"] == "none")
    for mode in ("none", "plain", "etag"):
        rows = [x for x in results if x["mode"] == mode]
        tput = statistics.median(x["throughput_sims_s"] for x in rows)
        line = f"{mode:5s} throughput {tput:.2f} sims/s ({tput / base:.2f} of none)"
        if mode != "none":
            line += (
                f", p50 {statistics.median(x['p50_ms'] for x in rows):.1f} ms"
                f", p99 {statistics.median(x['p99_ms'] for x in rows):.1f} ms"
                f", errors {sum(x['errors'] for x in rows)}, requests {sum(x['requests'] for x in rows)}"
            )
        print(line)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
