"""Evaluation over HTTP against the policy service (or any OpenAI-compatible ``/v1/completions`` server).

`cpl/` speaks no HTTP, so the two evaluations that call an endpoint live here and are added to the ``cpl``
command by `add_eval_commands` (the CLI extension mechanism of docs/decisions/002-cli-layering.md):

- ``cpl eval --policy-url URL``: in-domain accuracy (`cpl.evaluation.evaluate`) with `http_generator`;
- ``cpl eval-ood``: lm-evaluation-harness (`run_lm_eval`) with each task's shot count (the paper's Table 3 by
  default: ARC-C 25, BBH 3, MMLU-STEM 5; `cpl.ood_eval`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from cpl.evaluation import Generate, response_stop
from cpl.formats import PromptFormat
from cpl.ood_eval import PAPER_TASKS, parse_shots, shots_per_task

CONNECT_RETRIES = 3


def served_model(client: httpx.Client, url: str) -> str:
    reply = client.get(f"{url}/v1/models")
    reply.raise_for_status()
    return reply.json()["data"][0]["id"]


def http_generator(base_url: str, fmt: PromptFormat, *, timeout_s: float = 300.0, batch: int = 32) -> Generate:
    """Greedy generation through an OpenAI-compatible ``/v1/completions`` endpoint (e.g. the policy service).

    Greedy requests are idempotent, but only connection failures are retried (by the transport): a request the
    server received and failed on is reported, not resent.
    """

    def generate(prompts: Sequence[str], max_tokens: int) -> list[str]:
        url = base_url.rstrip("/")
        transport = httpx.HTTPTransport(retries=CONNECT_RETRIES)
        with httpx.Client(timeout=timeout_s, transport=transport) as client:
            model = served_model(client, url)
            texts: list[str] = []
            for start in range(0, len(prompts), batch):
                chunk = list(prompts[start : start + batch])
                body = {
                    "model": model,
                    "prompt": chunk,
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "stop": response_stop(fmt),
                }
                reply = client.post(f"{url}/v1/completions", json=body)
                reply.raise_for_status()
                choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
                texts += [c["text"] for c in choices]
        return texts

    return generate


def run_lm_eval(
    base_url: str,
    tokenizer_dir: str | Path,
    tasks: Sequence[str],
    *,
    shots: Mapping[str, int | None] | None = None,
    model_name: str | None = None,
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_concurrent: int = 8,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval's ``local-completions`` model on ``tasks``; returns ``{task: {metric: value}}``, each task's
    entry with its ``n-shot``.

    ``shots`` maps a task to its shot count (None or missing: the task's own default). lm-eval takes one shot
    count per run, so the tasks are run in one harness call per distinct count, against one model. ``base_url``
    is the server root (``http://host:port``); the harness calls ``/v1/completions``, sending ``echo`` +
    ``logprobs`` for multiple-choice tasks, so a pass-through must forward them.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    url = base_url.rstrip("/")
    if model_name is None:
        with httpx.Client(timeout=30, transport=httpx.HTTPTransport(retries=CONNECT_RETRIES)) as client:
            model_name = served_model(client, url)
    model_args = {
        "model": model_name,
        "base_url": f"{url}/v1/completions",
        "tokenizer": str(tokenizer_dir),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": False,
        "num_concurrent": num_concurrent,
        "max_retries": 3,
    }
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    shots = shots or {}
    by_count: dict[int | None, list[str]] = {}
    for task in tasks:
        by_count.setdefault(shots.get(task), []).append(task)
    merged: dict[str, dict[str, Any]] = {}
    for count, group in by_count.items():
        results = simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=group,
            task_manager=manager,
            limit=limit,
            num_fewshot=count,
            log_samples=False,
        )
        if results is None:
            raise RuntimeError("lm-eval returned no results")
        n_shot = results.get("n-shot", {})
        for task, metrics in results["results"].items():
            merged[task] = {**metrics, "n-shot": n_shot.get(task, count)}
    return merged


# ------------------------------------------------------------------------------------------ the CLI part


def _eval_ood(args: argparse.Namespace) -> int:
    from cpl.cli import CLIError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CLIError("--tasks is empty")
    try:
        shots = shots_per_task(tasks, parse_shots(args.shots or ""), every_task=args.num_fewshot)
    except ValueError as exc:
        raise CLIError(f"--shots: {exc}") from exc
    results = run_lm_eval(
        args.base_url, args.tokenizer, tasks, shots=shots, include_path=args.include_path, limit=args.limit
    )
    text = json.dumps(results, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


def add_eval_commands(subparsers: Any) -> None:
    """Add ``--policy-url`` to ``cpl eval`` and the ``cpl eval-ood`` command."""
    from cpl.cli import positive_int

    ev = subparsers.choices["eval"]
    ev.add_argument("--policy-url", help="a running policy service or OpenAI-compatible server (instead of --model)")
    ev.set_defaults(remote_generator=http_generator)

    ood = subparsers.add_parser(
        "eval-ood", help="lm-eval harness (ARC-C, BBH, MMLU-STEM) against an OpenAI-compatible endpoint"
    )
    ood.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    ood.add_argument("--tokenizer", type=Path, required=True, help="local tokenizer directory")
    ood.add_argument("--tasks", default=",".join(PAPER_TASKS))
    ood.add_argument("--include-path", type=Path, help="directory of local task YAMLs (no dataset hub here)")
    ood.add_argument("--limit", type=positive_int)
    ood.add_argument(
        "--shots",
        help="per-task shot counts, TASK=N[,TASK=N...]; default: the paper's (arc_challenge=25, bbh=3, "
        "mmlu_stem=5), other tasks their lm-eval default",
    )
    ood.add_argument("--num-fewshot", type=int, help="one shot count for every task (overrides --shots)")
    ood.add_argument("--out", type=Path)
    ood.set_defaults(func=_eval_ood)
