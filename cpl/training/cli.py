"""``cpl train sft|step-apo|step-dpo|dpo|value``: the training jobs on the command line.

``add_train_parser(subparsers)`` registers the ``train`` command on an argparse sub-parser set; each job sets
``func`` to :func:`cmd_train`, which returns the exit code: 0, or 2 with a one-line message on bad input (a
missing file or model directory, an empty dataset, a malformed row, an invalid hyperparameter, a non-empty
``--out``). ``python -m cpl.training.cli train ...`` runs it without the main CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from cpl.cli_fields import FieldFlag, add_field_flags, given_fields
from cpl.training.config import CONFIG_CLASSES, PreferenceConfig, SFTConfig, TrainConfig, ValueConfig
from cpl.training.data import TrainingInputError

EXIT_USAGE = 2

_JOBS: dict[str, tuple[type[TrainConfig], str, str]] = {
    "sft": (SFTConfig, "policy SFT on sft.jsonl", "loss on the response tokens (+ eos) only"),
    "step-apo": (
        PreferenceConfig,
        "Step-APO on plan_pairs.jsonl + solution_pairs.jsonl",
        "eq. 12 with the pairs' MCTS values (solution-pair values scaled by --solution-value-scale)",
    ),
    "step-dpo": (PreferenceConfig, "Step-DPO baseline: the step pairs, values ignored", "DPO's sigmoid loss"),
    "dpo": (
        PreferenceConfig,
        "response-level DPO baseline on {prompt, chosen, rejected} rows",
        "see cpl.training.response_pairs to build the rows from trees",
    ),
    "value": (ValueConfig, "value model MSE on value.jsonl", "tanh(score logit) against the MCTS values"),
}


COMMON_FLAGS: tuple[FieldFlag | str, ...] = (
    FieldFlag("learning_rate", flag="--lr"),
    "epochs",
    "batch_size",
    "micro_batch_size",
    "max_length",
    "warmup_ratio",
    "lr_scheduler",
    "weight_decay",
    FieldFlag("max_grad_norm", zero_means_none=True),
    "seed",
    FieldFlag("shuffle", negate=True),
    "device",
    "precision",
    "deepspeed",
    "zero_stage",
    "attn_implementation",
    "gradient_checkpointing",
    FieldFlag("progress", flag="--quiet", negate=True, help="no progress bar"),
)
"""`TrainConfig` fields every job takes as flags (help and defaults come from the config classes)."""

PREFERENCE_FLAGS: tuple[FieldFlag | str, ...] = (
    "beta",
    FieldFlag("prefix_sharing", negate=True),
    "reference_batch_size",
)
JOB_FLAGS: dict[str, tuple[FieldFlag | str, ...]] = {
    "sft": (),
    "step-apo": (*PREFERENCE_FLAGS, "solution_value_scale"),
    "step-dpo": PREFERENCE_FLAGS,
    "dpo": PREFERENCE_FLAGS,
    "value": (FieldFlag("head_learning_rate", flag="--head-lr"),),
}


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` and its jobs on ``subparsers``; returns the ``train`` parser."""
    train = subparsers.add_parser("train", help="train the policy (SFT, Step-APO, baselines) or the value model")
    jobs = train.add_subparsers(dest="train_job", required=True, metavar="JOB")
    for kind, (cls, summary, detail) in _JOBS.items():
        p = jobs.add_parser(kind, help=summary, description=f"{summary}: {detail}.")
        p.add_argument("--model", type=Path, required=True, help="starting model directory (HF format)")
        p.add_argument(
            "--data", type=Path, action="append", required=True, help="JSONL dataset (repeat for several files)"
        )
        p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        presets = {"--round 2": SFTConfig.round_preset(2)} if kind == "sft" else None
        add_field_flags(p, cls, (*COMMON_FLAGS, *JOB_FLAGS[kind]), presets=presets)
        if kind == "sft":
            p.add_argument("--round", type=int, choices=[1, 2], help="epochs preset: 5 in round 1, 3 later")
        if cls is PreferenceConfig:
            p.add_argument(
                "--append-eos",
                dest="append_eos",
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=cls.model_fields["append_eos"].description,
            )
        p.set_defaults(func=cmd_train, train_kind=kind)
    return train


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The job's config: its defaults (the SFT round preset with ``--round``) and every flag given on top."""
    kind = args.train_kind
    cls = CONFIG_CLASSES[kind]
    given = given_fields(args, cls)
    if kind == "sft" and args.round is not None:
        return SFTConfig.round_preset(args.round, **given)
    if cls is PreferenceConfig:
        given["loss"] = kind
    return cls.model_validate(given)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid hyperparameters: " + "; ".join(parts)


def cmd_train(args: argparse.Namespace) -> int:
    from cpl.training.jobs import TRAINERS

    try:
        config = build_config(args)
        result = TRAINERS[args.train_kind](args.model, args.data, args.out, config, overwrite=args.overwrite)
    except ValidationError as exc:
        print(f"cpl: error: {_validation_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInputError as exc:
        print(f"cpl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    metrics = result.metrics
    summary = {
        "kind": args.train_kind,
        "out": str(result.out_dir),
        "steps": metrics["steps"],
        "first_step_loss": metrics["first_step_loss"],
        "final_step_loss": metrics["final_step_loss"],
        "tokens_per_second": metrics["tokens_per_second"],
        "dropped_too_long": result.manifest.dataset.dropped_too_long,
    }
    print(json.dumps(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpl", description="CPL training jobs")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
