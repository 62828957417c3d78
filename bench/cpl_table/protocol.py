"""One seed of the CPL table: rounds, the tuned Step-APO / Step-DPO arms, the shuffled-advantage control, evaluation.

Everything a seed produces lives under ``OUT/seed<k>/`` and is reused when present, so a run that stops resumes
where it stopped and seeds can run on different machines (copy their directories into one ``OUT`` and report):

    seed<k>/round<r>/                 the round (cpl.round.Round: search, SFT, value; stages/*.json)
    seed<k>/round<r>/grid/<arm>/      one preference model per (loss, learning rate, epochs), and dev.json
    seed<k>/round<r>/apo_shuffled-<settings>/   Step-APO (its tuned settings) on shuffled advantages: the control
    seed<k>/evals/<model>.json        per problem: right or not, the final answer, the trap flag
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpl.config import SearchConfig
from cpl.formats import PromptFormat
from cpl.problems import Problem
from cpl.round import Round, RoundSettings, StageRecord, print_stage
from cpl.toy import world
from cpl.training.config import PreferenceConfig
from cpl.training.manifest import MANIFEST

LOSSES = ("step-apo", "step-dpo")
EVAL_SEED = 7
"""Seed of the held-out evaluation problems: the same for every seed of the experiment (paired over problems)."""


@dataclass(frozen=True)
class Sizes:
    """What one seed costs. `PILOT` runs in under 20 minutes on the 2-core CPU; `FULL` is the powered protocol."""

    train_problems: int
    simulations: int
    dev_problems: int
    eval_problems: int
    ood_problems: int
    rounds: int
    grid_lr: tuple[float, ...]
    grid_epochs: tuple[int, ...]
    sft_epochs: int = 3
    sft_lr: float = 1e-4
    batch_size: int = 16


PILOT = Sizes(
    train_problems=200,
    simulations=24,
    dev_problems=100,
    eval_problems=300,
    ood_problems=60,
    rounds=1,
    grid_lr=(1e-5, 3e-5, 1e-4),
    grid_epochs=(4,),
)
FULL = Sizes(
    train_problems=700,
    simulations=32,
    dev_problems=300,
    eval_problems=1000,
    ood_problems=300,
    rounds=2,
    grid_lr=(1e-5, 3e-5, 1e-4),
    grid_epochs=(2, 4),
)


@dataclass
class EvalSet:
    name: str
    problems: list[world.ToyProblem]

    def as_problems(self) -> list[Problem]:
        return [
            Problem(id=f"{self.name}-{i}", question=p.question, gold=str(p.answer)) for i, p in enumerate(self.problems)
        ]


def eval_sets(sizes: Sizes) -> list[EvalSet]:
    """The held-out test split: in-domain and every out-of-domain family (the same problems for every seed)."""
    sets = [EvalSet("in-domain", world.generate("arith", sizes.eval_problems, seed=EVAL_SEED, split="test"))]
    sets += [
        EvalSet(f, world.generate(f, sizes.ood_problems, seed=EVAL_SEED, split="test")) for f in world.OUT_OF_DOMAIN
    ]
    return sets


def train_and_dev(sizes: Sizes, seed: int) -> tuple[list[Problem], EvalSet]:
    """CPL's training problems (in-domain, train split) and a disjoint dev set from the same split for tuning."""
    train = world.generate("arith", sizes.train_problems, seed=1000 + seed, split="train")
    seen = {p.question for p in train}
    dev = [p for p in world.generate("arith", sizes.dev_problems + len(train), seed=5000 + seed, split="train")]
    dev = [p for p in dev if p.question not in seen][: sizes.dev_problems]
    as_problems = [
        Problem(id=f"train-{seed}-{i}", question=p.question, gold=str(p.answer)) for i, p in enumerate(train)
    ]
    return as_problems, EvalSet("dev", dev)


Evaluator = Callable[[Path, Sequence[EvalSet]], dict[str, dict[str, list[Any]]]]


def evaluator(device: str) -> Evaluator:
    """Greedy evaluation of one model on several sets: vLLM offline on a CPU (as every other figure here), the
    transformers path (`cpl.toy.evaluate.generate_greedy`) on a GPU machine, which has no vLLM."""

    def run(model: Path, sets: Sequence[EvalSet]) -> dict[str, dict[str, list[Any]]]:
        from cpl.evaluation import Generate, evaluate, offline_generator
        from cpl.toy.evaluate import generate_greedy

        def on_gpu(prompts: Sequence[str], max_tokens: int) -> list[str]:
            return generate_greedy(model, prompts, PromptFormat.PLAIN, max_new_tokens=max_tokens, device=device)

        def all_sets(generate: Generate) -> dict[str, dict[str, list[Any]]]:
            results = {}
            for s in sets:
                report = evaluate(s.as_problems(), generate, fmt=PromptFormat.PLAIN, few_shot=False, max_tokens=256)
                results[s.name] = _columns(s, [i.correct for i in report.items], [i.predicted for i in report.items])
            return results

        if device != "cpu":
            return all_sets(on_gpu)
        with offline_generator(str(model), PromptFormat.PLAIN, dtype="float32") as generate:
            return all_sets(generate)

    return run


def _columns(s: EvalSet, correct: list[bool], predicted: list[str | None]) -> dict[str, list[Any]]:
    return {
        "correct": correct,
        "predicted": predicted,
        "trap": [bool(world.inverted_comparisons(p)) for p in s.problems],
    }


def cached_eval(path: Path, model: Path, sets: Sequence[EvalSet], run: Evaluator) -> dict[str, dict[str, list[Any]]]:
    """A model's evaluation, reused while it is of the same checkpoint (a changed grid may pick another one)."""
    if path.is_file() and (cached := json.loads(path.read_text())).get("model") == str(model):
        return {k: v for k, v in cached.items() if k != "model"}
    results = run(model, sets)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": str(model), **results}))
    return results


def shuffle_advantages(files: Sequence[Path], out_dir: Path, seed: int) -> list[Path]:
    """The control arm's data: the same pairs, with (chosen_value, rejected_value) permuted across the pairs of
    each file (plan pairs among plan pairs, solution pairs among solution pairs, so every value keeps its
    kind's scale). Step-APO on these keeps every pair and the distribution of margins, but no pair carries its
    own advantage any more."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"cpl_table.shuffle:{seed}")
    written = []
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        values = [(r["chosen_value"], r["rejected_value"]) for r in rows]
        rng.shuffle(values)
        target = out_dir / path.name
        with target.open("w") as f:
            for row, (chosen, rejected) in zip(rows, values, strict=True):
                f.write(json.dumps({**row, "chosen_value": chosen, "rejected_value": rejected}) + "\n")
        written.append(target)
    return written


@dataclass
class SeedRun:
    out: Path
    seed: int
    sizes: Sizes
    planner: Path
    device: str = "cpu"
    concurrency: int = 64
    max_step_tokens: int = 96
    evaluate: Evaluator = field(init=False)

    def __post_init__(self) -> None:
        self.evaluate = evaluator(self.device)
        self.dir = self.out / f"seed{self.seed}"

    def preference_config(self, loss: str, lr: float, epochs: int) -> PreferenceConfig:
        return PreferenceConfig(
            loss=loss,
            learning_rate=lr,
            epochs=epochs,
            batch_size=self.sizes.batch_size,
            micro_batch_size=self.sizes.batch_size,
            seed=self.seed,
            device=self.device,
            progress=False,
        )

    def round(self, number: int, train: list[Problem], dev: EvalSet) -> dict[str, Path]:
        """Round ``number``: search, SFT and value by `cpl.round.Round`; each preference loss tuned on the dev set
        over the same grid; the shuffled-advantage control with Step-APO's chosen settings. Returns the models."""
        from cpl.training.jobs import train_preference

        s = self.sizes
        run_dir = self.dir / f"round{number}"
        settings = RoundSettings(
            round=number,
            base=self.planner / "policy",
            previous=self.dir / f"round{number - 1}" if number > 1 else None,
            search_value=self.planner / "value" if number == 1 else None,
            # the embedded planner reads only the plain format, which round 2's preset would switch from
            search=SearchConfig.round_preset(
                number,
                simulations=s.simulations,
                few_shot=False,
                max_step_tokens=self.max_step_tokens,
                format=PromptFormat.PLAIN,
                seed=self.seed,
            ),
            concurrency=self.concurrency,
            dtype="float32",
            sft={"epochs": s.sft_epochs, "batch_size": 32, "learning_rate": s.sft_lr, "micro_batch_size": 16},
            value={"epochs": 1, "batch_size": 64, "learning_rate": 1e-4, "micro_batch_size": 32},
            seed=self.seed,
        )
        r = Round(run_dir, settings, train, eval_problems=[])
        for stage in ("search", "sft", "value"):
            if r.record(stage) is None:
                print_stage(f"seed {self.seed} round {number} {stage}", "running")
                r.finish(getattr(r, f"stage_{stage}")())
        models = {"sft": r.checkpoint("sft", settings.base)}
        pairs = r.dataset_files("plan_pairs", "solution_pairs")
        if not pairs:
            return models
        dev_scores: dict[str, float] = {}
        dev_file = run_dir / "grid" / "dev.json"
        if dev_file.is_file():
            dev_scores = json.loads(dev_file.read_text())
        best: dict[str, tuple[float, str, PreferenceConfig]] = {}
        for lr in s.grid_lr:
            for epochs in s.grid_epochs:
                for loss in LOSSES:
                    name = f"{loss}-lr{lr:g}-ep{epochs}"
                    out = run_dir / "grid" / name
                    config = self.preference_config(loss, lr, epochs)
                    if not (out / MANIFEST).is_file():
                        print_stage(f"seed {self.seed} round {number} {name}", "training")
                        train_preference(models["sft"], pairs, out, config, overwrite=True)
                    if name not in dev_scores:
                        result = self.evaluate(out, [dev])["dev"]["correct"]
                        dev_scores[name] = sum(result) / len(result)
                        dev_file.write_text(json.dumps(dev_scores, indent=2))
                    if loss not in best or dev_scores[name] > best[loss][0]:  # ties: the earlier grid point
                        best[loss] = (dev_scores[name], name, config)
        for loss, (score, name, _) in best.items():
            stage = loss.replace("-", "_")
            models[stage] = run_dir / "grid" / name
            # Round 2 searches with the chosen Step-APO model (cpl.round.previous_models reads this record).
            record = StageRecord(
                stage=stage, status="done", outputs={"model": str(models[stage]), "dev_accuracy": score}
            )
            r.finish(record)
        control = run_dir / f"apo_shuffled-{best['step-apo'][1].removeprefix('step-apo-')}"  # Step-APO's settings
        if not (control / MANIFEST).is_file():
            print_stage(f"seed {self.seed} round {number} shuffled-advantage control", "training")
            shuffled = shuffle_advantages(pairs, run_dir / "shuffled_pairs", self.seed)
            train_preference(models["sft"], shuffled, control, best["step-apo"][2], overwrite=True)
        models["apo_shuffled"] = control
        return models

    def run(self) -> dict[str, Any]:
        """All rounds, then every model on every held-out set; returns the seed's summary (also ``summary.json``)."""
        train, dev = train_and_dev(self.sizes, self.seed)
        sets = eval_sets(self.sizes)
        models: dict[str, Path] = {"base": self.planner / "policy"}
        for number in range(1, self.sizes.rounds + 1):
            for arm, path in self.round(number, train, dev).items():
                models[f"r{number}_{arm}"] = path
            if f"r{number}_step_apo" not in models:  # no pairs: a later round has no policy to search with
                break
        evals = {
            name: cached_eval(self.dir / "evals" / f"{name}.json", path, sets, self.evaluate)
            for name, path in models.items()
        }
        rounds = {}
        for number in range(1, self.sizes.rounds + 1):
            record = self.dir / f"round{number}" / "stages" / "search.json"
            if record.is_file():
                rounds[number] = json.loads(record.read_text())["outputs"]["stats"]
        summary = {"seed": self.seed, "models": {k: str(v) for k, v in models.items()}, "search_stats": rounds}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return {"summary": summary, "evals": evals}
