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

from cpl.training.config import PreferenceConfig, SFTConfig, TrainConfig, ValueConfig, config_for
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


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _default(cls: type[TrainConfig], name: str) -> object:
    return cls.model_fields[name].default


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
        p.add_argument("--lr", type=float, help=f"learning rate (default {_default(cls, 'learning_rate')})")
        p.add_argument("--epochs", type=_positive, help=f"epochs (default {_default(cls, 'epochs')})")
        p.add_argument(
            "--batch-size", type=_positive, help=f"examples per optimizer step (default {_default(cls, 'batch_size')})"
        )
        p.add_argument(
            "--micro-batch-size",
            type=_positive,
            help=f"examples per forward/backward pass (default {_default(cls, 'micro_batch_size')})",
        )
        p.add_argument("--max-length", type=_positive, help="drop longer examples (default 2048 tokens)")
        p.add_argument("--warmup-ratio", type=float, help="warmup fraction of the steps (default 0.1)")
        p.add_argument("--lr-scheduler", choices=["cosine", "linear", "constant"])
        p.add_argument("--weight-decay", type=float)
        p.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0; 0 disables)")
        p.add_argument("--seed", type=int)
        p.add_argument("--no-shuffle", action="store_true")
        p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
        p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
        p.add_argument("--deepspeed", choices=["auto", "on", "off"], help="DeepSpeed ZeRO (GPU); default auto")
        p.add_argument("--zero-stage", type=int, choices=[0, 1, 2])
        p.add_argument("--attn-implementation", choices=["auto", "flash_attention_2", "sdpa", "eager"])
        p.add_argument("--gradient-checkpointing", action="store_true")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if kind == "sft":
            p.add_argument("--round", type=int, choices=[1, 2], help="epochs preset: 5 in round 1, 3 later")
        if cls is PreferenceConfig:
            p.add_argument("--beta", type=float, help="beta (default 0.3)")
            p.add_argument("--no-prefix-sharing", action="store_true", help="run prompt + step as one sequence")
            p.add_argument("--reference-batch-size", type=_positive)
            p.add_argument(
                "--append-eos",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="append </s> to chosen/rejected (default: only for dpo)",
            )
        if kind == "step-apo":
            p.add_argument("--solution-value-scale", type=float, help="scale of solution-pair values (default 0.3)")
        if kind == "value":
            p.add_argument("--head-lr", type=float, help="learning rate of the score head (default: --lr)")
        p.set_defaults(func=cmd_train, train_kind=kind)
    return train


def build_config(args: argparse.Namespace) -> TrainConfig:
    kind = args.train_kind
    overrides: dict[str, object] = {
        "learning_rate": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "max_length": args.max_length,
        "warmup_ratio": args.warmup_ratio,
        "lr_scheduler": args.lr_scheduler,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm or None,
        "seed": args.seed,
        "shuffle": False if args.no_shuffle else None,
        "device": args.device,
        "precision": args.precision,
        "deepspeed": args.deepspeed,
        "zero_stage": args.zero_stage,
        "attn_implementation": args.attn_implementation,
        "gradient_checkpointing": True if args.gradient_checkpointing else None,
        "progress": False if args.quiet else None,
    }
    if kind == "sft" and args.round is not None and args.epochs is None:
        overrides["epochs"] = 5 if args.round == 1 else 3
    if kind in ("step-apo", "step-dpo", "dpo"):
        overrides["beta"] = args.beta
        overrides["prefix_sharing"] = False if args.no_prefix_sharing else None
        overrides["reference_batch_size"] = args.reference_batch_size
        overrides["append_eos"] = args.append_eos
    if kind == "step-apo":
        overrides["solution_value_scale"] = args.solution_value_scale
    if kind == "value":
        overrides["head_learning_rate"] = args.head_lr
    config = config_for(kind, **overrides)
    if args.max_grad_norm == 0:
        config = config.model_copy(update={"max_grad_norm": None})
    return config


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
        "dropped_too_long": result.manifest["dataset"]["dropped_too_long"],
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
