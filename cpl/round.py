"""One CPL round in library mode: search -> extract -> SFT -> Step-APO (+ baselines) -> value -> evaluation.

Every artefact lives under one run directory::

    RUN/search/trees/*.json, RUN/search/{sft,plan_pairs,solution_pairs,value}.jsonl
    RUN/policy_sft/  RUN/policy_step_apo/  RUN/policy_step_dpo/  RUN/value/     (HF checkpoints + manifest)
    RUN/eval.json                                                                 (accuracy of each policy)
    RUN/stages/<stage>.json                                                       (what finished, and how)

A stage whose record exists is skipped, so an interrupted round resumes where it stopped (the search stage
also resumes its own unfinished trees). Round 1 searches with the plain prompt and 200 simulations; round 2 with
the XML prompt and 100, and its policy is trained from the *base* model on round-2 data (paper §4.1) while the
search itself uses the round-1 policy and value models.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cpl.config import SearchConfig
from cpl.problems import Problem

log = logging.getLogger(__name__)

STAGES = ("search", "sft", "step_apo", "step_dpo", "value", "eval")


class RoundSettings(BaseModel):
    round: int = Field(default=1, ge=1)
    base: Path = Field(description="base policy LM; round >= 2 trains from it again")
    search_policy: Path | None = Field(default=None, description="policy used by the search (default: base)")
    search_value: Path | None = Field(default=None, description="value used by the search (default: fresh head)")
    search: SearchConfig
    concurrency: int = 32
    dtype: str = "auto"
    marker_bias: float = 0.0
    baselines: bool = Field(default=True, description="also train the Step-DPO baseline")
    sft: dict[str, Any] = Field(default_factory=dict, description="SFTConfig overrides")
    preference: dict[str, Any] = Field(default_factory=dict, description="PreferenceConfig overrides")
    value: dict[str, Any] = Field(default_factory=dict, description="ValueConfig overrides")
    eval_max_tokens: int = 256
    eval_few_shot: bool = Field(
        default=False, description="prepend the demonstrations at evaluation (default zero-shot, paper §4.2)"
    )
    seed: int = 0


class StageRecord(BaseModel):
    stage: str
    status: str = Field(description="done | skipped")
    reason: str | None = None
    outputs: dict[str, Any] = Field(default_factory=dict)
    finished_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class Round:
    def __init__(self, run_dir: Path, settings: RoundSettings, problems: list[Problem], eval_problems: list[Problem]):
        self.run = run_dir
        self.settings = settings
        self.problems = problems
        self.eval_problems = eval_problems

    # --- bookkeeping ---------------------------------------------------------------------------------------

    def record_path(self, stage: str) -> Path:
        return self.run / "stages" / f"{stage}.json"

    def record(self, stage: str) -> StageRecord | None:
        path = self.record_path(stage)
        return StageRecord.model_validate_json(path.read_text()) if path.is_file() else None

    def finish(self, record: StageRecord) -> None:
        path = self.record_path(record.stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(record.model_dump_json(indent=2))
        tmp.replace(path)

    def checkpoint(self, stage: str, fallback: Path) -> Path:
        """The model a finished stage produced, or ``fallback`` if it was skipped."""
        record = self.record(stage)
        if record is not None and record.status == "done" and "model" in record.outputs:
            return Path(record.outputs["model"])
        return fallback

    def run_all(self, on_stage: Callable[[str, str], None] | None = None) -> dict[str, StageRecord]:
        self.run.mkdir(parents=True, exist_ok=True)
        settings_path = self.run / "round.json"
        if not settings_path.is_file():
            settings_path.write_text(self.settings.model_dump_json(indent=2))
        stages = [s for s in STAGES if s != "step_dpo" or self.settings.baselines]
        for stage in stages:
            if self.record(stage) is not None:
                if on_stage:
                    on_stage(stage, "already finished, skipped")
                continue
            if on_stage:
                on_stage(stage, "running")
            self.finish(getattr(self, f"stage_{stage}")())
        return {s: r for s in stages if (r := self.record(s)) is not None}

    # --- stages --------------------------------------------------------------------------------------------

    @property
    def data(self) -> Path:
        return self.run / "search"

    def search_value_dir(self) -> Path:
        if self.settings.search_value is not None:
            return self.settings.search_value
        from cpl.models.value_head import make_value_model

        fresh = self.run / "value_init"
        if not (fresh / "config.json").is_file():
            make_value_model(self.settings.base, fresh, seed=self.settings.seed)
        return fresh

    def stage_search(self) -> StageRecord:
        from cpl.library_search import run_library_search

        counts = run_library_search(
            self.problems,
            self.settings.search_policy or self.settings.base,
            self.search_value_dir(),
            self.settings.search,
            self.data,
            max_concurrent=self.settings.concurrency,
            seed=self.settings.seed,
            dtype=self.settings.dtype,
            marker_bias=self.settings.marker_bias,
        )
        return StageRecord(stage="search", status="done", outputs={"counts": counts, "dir": str(self.data)})

    def _rows(self, *names: str) -> list[Path]:
        return [p for n in names if (p := self.data / f"{n}.jsonl").is_file() and p.stat().st_size > 0]

    def stage_sft(self) -> StageRecord:
        from cpl.training.config import SFTConfig
        from cpl.training.jobs import train_sft

        files = self._rows("sft")
        if not files:
            return StageRecord(stage="sft", status="skipped", reason="no correct paths in the trees")
        config = SFTConfig.round_preset(self.settings.round, **self.settings.sft)
        out = self.run / "policy_sft"
        result = train_sft(self.settings.base, files, out, config, overwrite=True)
        return StageRecord(stage="sft", status="done", outputs={"model": str(out), "metrics": result.metrics})

    def _preference(self, stage: str, loss: str) -> StageRecord:
        from cpl.training.config import PreferenceConfig
        from cpl.training.jobs import train_preference

        files = self._rows("plan_pairs", "solution_pairs")
        if not files:
            return StageRecord(stage=stage, status="skipped", reason="no preference pairs in the trees")
        start = self.checkpoint("sft", self.settings.base)  # the SFT model is both start and reference
        config = PreferenceConfig.model_validate({**self.settings.preference, "loss": loss})
        out = self.run / f"policy_{stage}"
        result = train_preference(start, files, out, config, overwrite=True)
        return StageRecord(stage=stage, status="done", outputs={"model": str(out), "metrics": result.metrics})

    def stage_step_apo(self) -> StageRecord:
        return self._preference("step_apo", "step-apo")

    def stage_step_dpo(self) -> StageRecord:
        return self._preference("step_dpo", "step-dpo")

    def stage_value(self) -> StageRecord:
        from cpl.training.config import ValueConfig
        from cpl.training.jobs import train_value

        files = self._rows("value")
        if not files:
            return StageRecord(stage="value", status="skipped", reason="no visited states")
        config = ValueConfig.model_validate(self.settings.value)
        out = self.run / "value"
        result = train_value(self.search_value_dir(), files, out, config, overwrite=True)
        return StageRecord(stage="value", status="done", outputs={"model": str(out), "metrics": result.metrics})

    def stage_eval(self) -> StageRecord:
        from cpl.evaluation import evaluate, offline_generator

        if not self.eval_problems:
            return StageRecord(stage="eval", status="skipped", reason="no evaluation problems given")
        models = {"base": self.settings.base}
        for stage in ("sft", "step_apo", "step_dpo"):
            record = self.record(stage)
            if record is not None and record.status == "done":
                models[stage] = Path(record.outputs["model"])
        fmt = self.settings.search.format
        accuracy: dict[str, float] = {}
        reports = {}
        for name, model in models.items():
            with offline_generator(str(model), fmt, dtype=self.settings.dtype) as generate:
                report = evaluate(
                    self.eval_problems,
                    generate,
                    fmt=fmt,
                    few_shot=self.settings.eval_few_shot,
                    max_tokens=self.settings.eval_max_tokens,
                )
            accuracy[name] = report.accuracy
            reports[name] = report.model_dump(mode="json")
        (self.run / "eval.json").write_text(json.dumps(reports, indent=2))
        return StageRecord(stage="eval", status="done", outputs={"accuracy": accuracy, "report": "eval.json"})


def print_stage(stage: str, status: str) -> None:
    print(f"[cpl round] {stage}: {status}", file=sys.stderr, flush=True)
