"""Out-of-domain evaluation settings: the paper's tasks and their shot counts (Table 3).

The paper evaluates ARC-C 25-shot, BBH 3-shot with chain of thought (lm-eval's ``bbh`` group is the CoT
few-shot variant) and MMLU-STEM 5-shot, in one evaluation. The harness run itself talks to an OpenAI-compatible
endpoint, so it lives in the service layer (`services.policy.evaluation.run_lm_eval`, ``cpl eval-ood``); this module
only says what to run. No dataset hub is reachable on our machines, so tests and offline runs point lm-eval's
``include_path`` at local task YAMLs whose data are JSON files (``dataset_path: json``); `cpl/eval_tasks/` ships a
small example of each task type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

PAPER_TASKS = ("arc_challenge", "bbh", "mmlu_stem")
PAPER_SHOTS: Mapping[str, int] = {"arc_challenge": 25, "bbh": 3, "mmlu_stem": 5}
"""Shots per task in the paper's Table 3."""
LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"


def parse_shots(text: str) -> dict[str, int]:
    """``"arc_challenge=25,bbh=3"`` -> ``{"arc_challenge": 25, "bbh": 3}``; raises ValueError on bad input."""
    shots: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        task, sep, count = item.partition("=")
        if not sep or not task.strip():
            raise ValueError(f"{item!r}: expected TASK=N")
        try:
            number = int(count)
        except ValueError:
            raise ValueError(f"{item!r}: the shot count must be an integer") from None
        if number < 0:
            raise ValueError(f"{item!r}: the shot count must be 0 or more")
        shots[task.strip()] = number
    return shots


def shots_per_task(
    tasks: Sequence[str], overrides: Mapping[str, int] | None = None, *, every_task: int | None = None
) -> dict[str, int | None]:
    """The shot count of each task: ``every_task`` if given, else ``overrides``, else the paper's (Table 3),
    else None (the task's own default in lm-eval)."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(tasks))
    if unknown:
        raise ValueError(f"shot counts for tasks that are not run: {', '.join(unknown)}")
    if every_task is not None:
        return dict.fromkeys(tasks, every_task)
    return {task: overrides.get(task, PAPER_SHOTS.get(task)) for task in tasks}
