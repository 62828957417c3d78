"""One CPL round in library mode: search -> extract -> SFT -> Step-APO (+ baselines) -> value -> evaluation.

Every artefact lives under one run directory::

    RUN/search/trees/*.json, RUN/search/{sft,plan_pairs,solution_pairs,value}.jsonl
    RUN/policy_sft/  RUN/policy_step_apo/  RUN/policy_step_dpo/  RUN/value/     (HF checkpoints + manifest)
    RUN/eval.json                                                                 (accuracy of each policy)
    RUN/stages/<stage>.json                                                       (what finished, and how)

A stage whose record exists is skipped, so an interrupted round resumes where it stopped (the search stage
also resumes its own unfinished trees). Round 1 searches with the plain prompt and 200 simulations; round 2 with
the XML prompt and 100, and its policy is trained from the *base* model on round-2 data (paper §4.1) while the
search itself uses the round-1 fine-tuned policy (Step-APO) and value models, taken from the previous round's
run directory (``previous``) unless given explicitly; the round-2 value model continues from the round-1 one
(docs/decisions/004-round-2-value-init.md). ``RUN/stages/search.json`` records which models searched.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from cpl.config import SearchConfig
from cpl.problems import Problem
from cpl.training.config import PreferenceConfig, SFTConfig, ValueConfig

log = logging.getLogger(__name__)


class RoundSettingsError(ValueError):
    """The round cannot run with these settings (e.g. round 2 without the round-1 models)."""


class RoundSettings(BaseModel):
    round: int = Field(default=1, ge=1)
    base: Path = Field(description="base policy LM; round >= 2 trains from it again")
    previous: Path | None = Field(
        default=None, description="run directory of the previous round: round >= 2 searches with its models"
    )
    search_policy: Path | None = Field(
        default=None, description="policy used by the search (default: base in round 1, else previous round's)"
    )
    search_value: Path | None = Field(
        default=None, description="value used by the search (default: fresh head in round 1, else previous round's)"
    )
    search: SearchConfig
    concurrency: int = 32
    dtype: str = "auto"
    marker_bias: float = 0.0
    baselines: bool = Field(default=True, description="also train the Step-DPO baseline")
    sft: SFTConfig = Field(description="policy SFT (default: the round's Table 6 preset)")
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Step-APO and Step-DPO (the stage sets the loss)"
    )
    value: ValueConfig = Field(default_factory=ValueConfig, description="value model training")
    eval_max_tokens: int = 256
    eval_few_shot: bool = Field(
        default=False, description="prepend the demonstrations at evaluation (default zero-shot, paper §4.2)"
    )
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _round_preset_sft(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sft") is None:
            data = {**data, "sft": SFTConfig.round_preset(int(data.get("round", 1)))}
        return data


class SearchModels(BaseModel):
    """Which models a round's search used, and where they came from (recorded in ``stages/search.json``)."""

    policy: Path
    value: Path
    policy_from: str = Field(description="base | explicit | previous:<stage>")
    value_from: str = Field(description="fresh head | explicit | previous:value")


def previous_models(previous: Path) -> tuple[tuple[Path, str], tuple[Path, str]]:
    """The final policy (Step-APO, else SFT) and the value model of a finished round in ``previous``."""

    def done(stage: str) -> Path | None:
        path = previous / "stages" / f"{stage}.json"
        if not path.is_file():
            return None
        record = StageRecord.model_validate_json(path.read_text())
        return Path(record.outputs["model"]) if record.status == "done" and "model" in record.outputs else None

    if not (previous / "stages").is_dir():
        raise RoundSettingsError(f"--previous {previous}: not a round run directory (no stages/)")
    policy = next(((m, f"previous:{s}") for s in ("step_apo", "sft") if (m := done(s)) is not None), None)
    if policy is None:
        raise RoundSettingsError(f"--previous {previous}: the round trained no policy (step_apo and sft not done)")
    value = done("value")
    if value is None:
        raise RoundSettingsError(f"--previous {previous}: the round trained no value model (value stage not done)")
    return policy, (value, "previous:value")


class TrainingStep(BaseModel):
    """One training stage of a round, as any runner (this module's :class:`Round`, the stack's round driver) must
    order and start it: ``start`` is ``base``, ``stage:<name>`` (this round's checkpoint of that stage, the base
    when it was skipped) or ``previous:value`` (the previous round's value model, the base value in round 1)."""

    stage: str
    kind: str = Field(description="the job kind (cpl.training.config.JobKind)")
    start: str
    datasets: tuple[str, ...] = Field(description="the search's datasets it reads (cpl.pairs.DATASETS names)")


def training_steps(round_number: int, baselines: bool) -> list[TrainingStep]:
    """The training stages of a round, in order (paper §4.1; docs/decisions/004-round-2-value-init.md): every
    round's policy is trained from the *base* model (SFT), Step-APO (and the Step-DPO baseline) start from that
    SFT model, which is also their reference; the value model continues from the one that searched the round."""
    if round_number < 1:
        raise RoundSettingsError(f"round numbers start at 1, got {round_number}")
    pairs = ("plan_pairs", "solution_pairs")
    steps = [
        TrainingStep(stage="sft", kind="sft", start="base", datasets=("sft",)),
        TrainingStep(stage="step_apo", kind="step-apo", start="stage:sft", datasets=pairs),
    ]
    if baselines:
        steps.append(TrainingStep(stage="step_dpo", kind="step-dpo", start="stage:sft", datasets=pairs))
    value_start = "base" if round_number == 1 else "previous:value"
    steps.append(TrainingStep(stage="value", kind="value", start=value_start, datasets=("value",)))
    return steps


def final_policy_stage(done: set[str]) -> str | None:
    """The policy a round hands on (deployed, searched with next round): Step-APO, else SFT, else none."""
    return next((s for s in ("step_apo", "sft") if s in done), None)


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
        self.check_search_models()

    def check_search_models(self) -> None:
        """Round >= 2 needs the previous round's models (or both given explicitly): refuse early otherwise."""
        s = self.settings
        if s.round >= 2 and (s.search_policy is None or s.search_value is None):
            if s.previous is None:
                raise RoundSettingsError(
                    f"round {s.round} searches with the previous round's fine-tuned policy and value model: give "
                    "--previous RUN_DIR (the round-1 run directory) or both --search-policy and --search-value"
                )
            previous_models(s.previous)

    def search_models(self) -> SearchModels:
        s = self.settings
        from_previous = previous_models(s.previous) if s.round >= 2 and s.previous is not None else None
        if s.search_policy is not None:
            policy, policy_from = s.search_policy, "explicit"
        elif from_previous is not None:
            policy, policy_from = from_previous[0]
        else:
            policy, policy_from = s.base, "base"
        if s.search_value is not None:
            value, value_from = s.search_value, "explicit"
        elif from_previous is not None:
            value, value_from = from_previous[1]
        else:
            value, value_from = self.fresh_value_head(), "fresh head"
        return SearchModels(policy=policy, value=value, policy_from=policy_from, value_from=value_from)

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
        # The training stages and their order are training_steps', which the stack's rounds run too.
        training = [t.stage for t in training_steps(self.settings.round, self.settings.baselines)]
        stages = ["search", *training, "eval"]
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

    def fresh_value_head(self) -> Path:
        from cpl.models.value_head import make_value_model

        fresh = self.run / "value_init"
        if not (fresh / "config.json").is_file():
            make_value_model(self.settings.base, fresh, seed=self.settings.seed)
        return fresh

    def stage_search(self) -> StageRecord:
        from cpl.library_search import run_library_search

        models = self.search_models()
        counts = run_library_search(
            self.problems,
            models.policy,
            models.value,
            self.settings.search,
            self.data,
            max_concurrent=self.settings.concurrency,
            engine_seed=self.settings.seed,
            dtype=self.settings.dtype,
            marker_bias=self.settings.marker_bias,
        )
        from cpl.search_stats import STATS_FILE

        stats = json.loads((self.data / STATS_FILE).read_text())
        outputs = {"counts": counts, "dir": str(self.data), "models": models.model_dump(mode="json"), "stats": stats}
        return StageRecord(stage="search", status="done", outputs=outputs)

    def dataset_files(self, *names: str) -> list[Path]:
        """The search's non-empty exports among ``names`` (`cpl.pairs.DATASETS` names)."""
        return [p for n in names if (p := self.data / f"{n}.jsonl").is_file() and p.stat().st_size > 0]

    def stage_sft(self) -> StageRecord:
        from cpl.training.jobs import train_sft

        files = self.dataset_files("sft")
        if not files:
            return StageRecord(stage="sft", status="skipped", reason="no correct paths in the trees")
        config = self.settings.sft
        out = self.run / "policy_sft"
        result = train_sft(self.settings.base, files, out, config, overwrite=True)
        return StageRecord(stage="sft", status="done", outputs={"model": str(out), "metrics": result.metrics})

    def _preference(self, stage: str, loss: str) -> StageRecord:
        from cpl.training.jobs import train_preference

        files = self.dataset_files("plan_pairs", "solution_pairs")
        if not files:
            return StageRecord(stage=stage, status="skipped", reason="no preference pairs in the trees")
        start = self.checkpoint("sft", self.settings.base)  # the SFT model is both start and reference
        config = self.settings.preference.model_copy(update={"loss": loss})
        out = self.run / f"policy_{stage}"
        result = train_preference(start, files, out, config, overwrite=True)
        return StageRecord(stage=stage, status="done", outputs={"model": str(out), "metrics": result.metrics})

    def stage_step_apo(self) -> StageRecord:
        return self._preference("step_apo", "step-apo")

    def stage_step_dpo(self) -> StageRecord:
        return self._preference("step_dpo", "step-dpo")

    def stage_value(self) -> StageRecord:
        from cpl.training.jobs import train_value

        files = self.dataset_files("value")
        if not files:
            return StageRecord(stage="value", status="skipped", reason="no states with search values")
        # The value model that searched this round is trained further: a fresh head in round 1, the previous
        # round's value model later (docs/decisions/004-round-2-value-init.md).
        start = self.search_models().value
        out = self.run / "value"
        result = train_value(start, files, out, self.settings.value, overwrite=True)
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


def summarise_round(cpl_round: Round) -> str:
    """The search's summary (best plans, Table 1, files) and which models searched; empty before the search."""
    from cpl.search_stats import STATS_FILE, summary_of_run

    record = cpl_round.record("search")
    if record is None or not (cpl_round.data / STATS_FILE).is_file():
        return ""
    lines = [summary_of_run(cpl_round.data, [p.id for p in cpl_round.problems])]
    models = record.outputs.get("models")
    if models:
        lines.append(
            f"searched with policy {models['policy']} ({models['policy_from']}), "
            f"value {models['value']} ({models['value_from']})"
        )
    return "\n".join(lines)


def print_stage(stage: str, status: str) -> None:
    print(f"[cpl round] {stage}: {status}", file=sys.stderr, flush=True)
