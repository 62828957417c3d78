"""Out-of-domain evaluation with lm-evaluation-harness against an OpenAI-compatible endpoint.

In a real deployment the tasks are ARC-C, BBH and MMLU-STEM (paper §4, few-shot, lm-eval defaults). No dataset
hub is reachable on our machines, so tests and offline runs point ``include_path`` at local task YAMLs whose
data are JSON files (``dataset_path: json``); `cpl/eval_tasks/` ships a small example of each task type.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAPER_TASKS = ("arc_challenge", "bbh", "mmlu_stem")
LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"


def run_lm_eval(
    base_url: str,
    tokenizer_dir: str | Path,
    tasks: Sequence[str],
    *,
    model_name: str | None = None,
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    num_concurrent: int = 8,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval's ``local-completions`` model on ``tasks``; returns ``{task: {metric: value}}``.

    ``base_url`` is the server root (``http://host:port``); the harness calls ``/v1/completions``, sending
    ``echo`` + ``logprobs`` for multiple-choice tasks, so a pass-through must forward them.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    url = base_url.rstrip("/")
    name = model_name or _served_model(url)
    model_args = {
        "model": name,
        "base_url": f"{url}/v1/completions",
        "tokenizer": str(tokenizer_dir),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": False,
        "num_concurrent": num_concurrent,
        "max_retries": 3,
    }
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return {task: dict(metrics) for task, metrics in results["results"].items()}


def _served_model(url: str) -> str:
    import httpx

    reply = httpx.get(f"{url}/v1/models", timeout=30)
    reply.raise_for_status()
    return reply.json()["data"][0]["id"]
