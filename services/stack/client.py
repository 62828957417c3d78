"""``cpl submit`` and ``cpl export``: a running stack's search API seen from the command line.

Where the stack is: ``--url``, else ``CPL_SEARCH_URL``, else the ``stack.json`` that ``cpl up`` writes in its run
directory, else ``http://127.0.0.1:8003``. The key: ``CPL_SEARCH_API_KEY``, else that ``stack.json`` (keys never
go on a command line).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from cpl.search_stats import SearchStats, format_table1
from services.stack.up import STATE_FILE

DEFAULT_URL = "http://127.0.0.1:8003"
EXPORTS = ("sft", "plan_pairs", "solution_pairs", "value")
FINAL = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    """What the user must fix (exit 2) or what the stack answered (exit 1)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Target:
    url: str
    api_key: str | None


def resolve_target(url: str | None, run_dir: Path) -> Target:
    state: dict[str, Any] = {}
    state_file = run_dir / STATE_FILE
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}
    url = url or os.environ.get("CPL_SEARCH_URL") or state.get("url") or DEFAULT_URL
    key = os.environ.get("CPL_SEARCH_API_KEY") or state.get("api_key")
    return Target(url.rstrip("/"), key)


class SearchAPIClient:
    """A small synchronous client of the public ``/v1`` API (connection retries; 4xx answers become errors)."""

    def __init__(self, target: Target, timeout_s: float = 30.0) -> None:
        if not target.api_key:
            raise ClientError(
                f"no API key: set CPL_SEARCH_API_KEY (cpl up prints it) or run next to a `cpl up` ({STATE_FILE})"
            )
        self.target = target
        self.http = httpx.Client(
            base_url=target.url,
            headers={"Authorization": f"Bearer {target.api_key}"},
            timeout=timeout_s,
            transport=httpx.HTTPTransport(retries=3),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SearchAPIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(
                f"no search API answers at {self.target.url} ({exc}); start the stack with `cpl up`", code=1
            ) from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:500]
            code = 2 if response.status_code < 500 else 1
            raise ClientError(f"{method} {path}: {response.status_code} {detail}", code=code)
        return response

    def submit_file(self, path: Path, simulations: int | None) -> dict[str, Any]:
        if not path.is_file():
            raise ClientError(f"{path}: no such file")
        data = {"simulations": str(simulations)} if simulations is not None else {}
        with path.open("rb") as f:
            files = {"file": (path.name, f, "application/x-ndjson")}
            return self.request("POST", "/v1/batches/upload", files=files, data=data).json()

    def submit_problems(
        self, problems: list[dict[str, Any]], simulations: int | None, settings: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``POST /v1/batches``; ``settings`` are the batch's other search settings (e.g. ``{"seed": 7}``)."""
        body: dict[str, Any] = {"problems": problems}
        if simulations is not None:
            body["simulations"] = simulations
        if settings:
            body["settings"] = settings
        return self.request("POST", "/v1/batches", json=body).json()

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/batches/{batch_id}").json()

    def batch_searches(self, batch_id: str) -> list[dict[str, Any]]:
        searches: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"batch_id": batch_id, "limit": 200}
            if cursor:
                params["cursor"] = cursor
            page = self.request("GET", "/v1/searches", params=params).json()
            searches += page["searches"]
            cursor = page.get("next_cursor")
            if not cursor:
                return searches

    def follow(self, batch_id: str, interval_s: float = 1.0, show_bar: bool = True) -> dict[str, Any]:
        """Wait for the batch to finish with a progress bar over its simulations; answers the final batch."""
        with tqdm(total=0, unit="sim", desc=f"batch {batch_id[:8]}", disable=not show_bar, dynamic_ncols=True) as bar:
            while True:
                batch = self.batch(batch_id)
                searches = self.batch_searches(batch_id)
                total = sum(s["progress"]["simulations_total"] for s in searches)
                # A final search counts whole: a cancelled or failed one will not add simulations.
                done = sum(
                    s["progress"]["simulations_total"] if s["status"] in FINAL else s["progress"]["simulations_done"]
                    for s in searches
                )
                bar.total = total
                bar.n = min(done, total)
                final = sum(batch["counts"].get(k, 0) for k in FINAL)
                bar.set_postfix_str(f"{final}/{batch['total']} searches done", refresh=False)
                bar.refresh()
                # Done when every search is final (a batch read while it is being created is not).
                if batch["done"] and final >= batch["total"]:
                    return batch
                time.sleep(interval_s)

    def export(self, batch_id: str, out: Path) -> dict[str, int]:
        self.batch(batch_id)  # a clear 404 before any file is written
        out.mkdir(parents=True, exist_ok=True)
        rows: dict[str, int] = {}
        for name in EXPORTS:
            path = out / f"{name}.jsonl"
            tmp = path.with_suffix(".jsonl.part")
            count = 0
            try:
                with self.http.stream("GET", f"/v1/batches/{batch_id}/exports/{name}") as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ClientError(f"export {name}: {response.status_code} {response.text[:300]}", code=1)
                    with tmp.open("wb") as f:
                        for line in response.iter_lines():
                            if line:
                                f.write(line.encode() + b"\n")
                                count += 1
            except httpx.TransportError as exc:
                tmp.unlink(missing_ok=True)
                raise ClientError(f"export {name} broke off: {exc}", code=1) from exc
            tmp.replace(path)
            rows[name] = count
        return rows


def format_batch(batch: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{k} {v}" for k, v in batch["counts"].items() if v)
    accuracy = (
        f"accuracy {100 * batch['accuracy']:.1f}% over {batch['graded']} graded"
        if batch.get("accuracy") is not None
        else "accuracy: nothing graded"
    )
    table1 = format_table1(SearchStats.model_validate(batch["stats"]))
    return [f"batch {batch['id']}: {batch['total']} searches ({counts}); {accuracy}", table1]


def format_best_plans(searches: list[dict[str, Any]], width: int = 110) -> list[str]:
    lines: list[str] = []
    for s in searches:
        best = s.get("best")
        question = s["question"] if len(s["question"]) <= width else s["question"][: width - 1] + "…"
        lines.append(f"• {question}")
        if best is None:
            lines.append(f"    {s['status']}: no solution" + (f" ({s['error']['message']})" if s.get("error") else ""))
            continue
        verdict = {True: "✓", False: "✗", None: "?"}[best.get("correct")]
        for i, step in enumerate(best["plan"][:-1], start=1):
            step = " ".join(step.split())
            lines.append(f"    {i}. {step[: width - 8]}")
        gold = f" (gold {s['answer']})" if s.get("answer") is not None else ""
        lines.append(f"    → answer {best['answer']} {verdict}{gold}, value {best['value']:+.2f}")
    return lines
