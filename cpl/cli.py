"""The `cpl` command line: library-mode search, tiny models, the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cpl.cli_fields import FieldFlag, add_field_flags, given_fields
from cpl.config import SearchConfig
from cpl.engines.vllm_offline import ENGINE_LOG_ENV
from cpl.formats import PromptFormat
from cpl.problems import Problem

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


positive_int = _positive
"""argparse type of a positive integer (for the service layer's commands)."""

PLANNER_DIR = Path(__file__).resolve().parent / "assets" / "planner"
"""The embedded default model: the toy planner trained by `cpl.toy.train_planner` (docs/toy-world.md)."""


def default_models() -> tuple[Path, Path]:
    policy, value = PLANNER_DIR / "policy", PLANNER_DIR / "value"
    if not (policy / "config.json").is_file() or not (value / "config.json").is_file():
        raise CLIError(
            f"the embedded planner is missing ({PLANNER_DIR}); give --policy and --value, "
            "or rebuild it with `python -m cpl.toy.train_planner --out cpl/assets/planner`"
        )
    return policy, value


def _model_dir(path: Path, flag: str) -> Path:
    if not (path / "config.json").is_file():
        raise CLIError(f"--{flag} {path}: not a model directory (no config.json)")
    return path


def _problems(path: Path, limit: int | None) -> list[Problem]:
    from cpl.problems import ProblemFileError, load_problems

    try:
        problems = load_problems(path, limit=limit)
    except ProblemFileError as exc:
        raise CLIError(str(exc)) from exc
    if not problems:
        raise CLIError(f"{path}: no problems in the file")
    return problems


ROUND_PRESETS = {"--round 2": SearchConfig.round_preset(2)}

SEARCH_FLAGS: tuple[FieldFlag | str, ...] = (
    "simulations",
    "c_puct",
    "temperature",
    "root_children",
    "children",
    "max_depth",
    "max_step_tokens",
    "prior",
    "format",
    FieldFlag("few_shot", negate=True),
    "seed",
)
"""The `SearchConfig` fields `cpl search` takes as flags (help and defaults come from the fields)."""

ROUND_SEARCH_FLAGS: tuple[FieldFlag | str, ...] = (
    "simulations",
    "format",
    "max_step_tokens",
    "max_depth",
    FieldFlag("few_shot", negate=True),
)
"""The `SearchConfig` fields `cpl round` takes as flags, on top of the round preset."""


def add_round_flag(p: argparse.ArgumentParser, *, default: int | None) -> None:
    help_text = "round preset: 1 = plain/200 sims, 2 = XML/100 sims; flags given override it"
    p.add_argument("--round", type=int, choices=[1, 2], default=default, help=help_text)


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", type=Path, help="policy model directory (default: the embedded model)")
    p.add_argument("--value", type=Path, help="value model directory (default: the embedded model)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, help="GSM8K or MATH JSONL file of problems")
    source.add_argument("--question", help="one question (use --answer for its ground truth)")
    p.add_argument("--answer", help="ground-truth answer of --question (omit for inference mode)")
    p.add_argument("--limit", type=_positive, help="search only the first N problems of --input")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_round_flag(p, default=None)
    add_field_flags(p, SearchConfig, SEARCH_FLAGS, presets=ROUND_PRESETS)
    p.add_argument("--concurrency", type=_positive, default=32, help="trees searched at once")
    p.add_argument("--dtype", default="auto", help="vLLM dtype (auto, float32, bfloat16, ...)")
    p.add_argument(
        "--marker-bias", type=float, default=0.0, help="logit bias on stop markers (for random-weight test models)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def search_config(args: argparse.Namespace) -> SearchConfig:
    """The round preset (when ``--round`` is given) or the defaults, with every flag given on top."""
    given = given_fields(args, SearchConfig)
    try:
        if args.round:
            return SearchConfig.round_preset(args.round, **given)
        return SearchConfig(**given)
    except ValidationError as exc:
        raise CLIError(validation_message(exc)) from exc


def validation_message(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
    return "invalid settings: " + "; ".join(parts)


def cmd_search(args: argparse.Namespace) -> int:
    from cpl.library_search import run_library_search
    from cpl.problems import problem_id

    if args.answer is not None and args.question is None:
        raise CLIError("--answer goes with --question")
    if args.input is None and args.question is None:
        raise CLIError("give --input FILE.jsonl or --question Q")
    if args.input is not None:
        problems = _problems(args.input, args.limit)
    else:
        if not args.question.strip():
            raise CLIError("--question is empty")
        problems = [Problem(id=problem_id(args.question), question=args.question, gold=args.answer)]
    config = search_config(args)
    default_policy, default_value = default_models() if args.policy is None or args.value is None else (None, None)
    policy = _model_dir(args.policy or default_policy, "policy")
    value = _model_dir(args.value or default_value, "value")
    counts = run_library_search(
        problems,
        policy,
        value,
        config,
        args.out,
        max_concurrent=args.concurrency,
        dtype=args.dtype,
        marker_bias=args.marker_bias,
        show_progress=not args.quiet,
    )
    from cpl.search_stats import summary_of_run

    print(summary_of_run(args.out, [p.id for p in problems]))
    print(f"{len(problems)} trees in {args.out / 'trees'}; " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


def cmd_models_tiny(args: argparse.Namespace) -> int:
    from cpl.models.tiny import build_tiny_models

    policy, value = build_tiny_models(args.out, arch=args.arch, seed=args.seed)
    print(f"policy: {policy}\nvalue: {value}")
    return 0


DEMO_SAMPLE = {"family": "arith", "n": 8, "seed": 11, "split": "test"}
DEMO_SEARCH_SEED = 5
"""The search seed (`SearchConfig.seed`) of both demos, `cpl demo` and `cpl up --demo` (`make demo`): seeded, they
show the same trees on every run, and with this seed they yield plan and solution pairs (measured; see
docs/decisions/005-search-seeds.md)."""
DEMO_PICKS = (1, 2, 4)
"""The demo's three held-out toy problems, picked from `DEMO_SAMPLE`: two the planner both solves and fails under
search, and a trap question it reads both ways; under search they yield plan and solution pairs (measured with
`cpl search --simulations 24 --seed 5` on the whole sample; docs/toy-world.md has the world)."""


def demo_problems() -> list[Any]:
    from cpl.toy import world

    sample = world.generate(**DEMO_SAMPLE)  # type: ignore[arg-type]
    return [sample[i] for i in DEMO_PICKS]


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: the embedded planner searches three held-out toy word problems."""
    from cpl.toy import world

    args.out.mkdir(parents=True, exist_ok=True)
    sample = args.out / "problems.jsonl"
    world.write_gsm8k_jsonl(demo_problems(), sample)
    argv = ["--verbose"] if args.verbose else []
    argv += ["search", "--input", str(sample), "--out", str(args.out), "--simulations", str(args.simulations)]
    argv += ["--max-step-tokens", "96", "--no-few-shot", "--dtype", "float32", "--seed", str(args.seed)]
    code = main(argv)
    if code == 0:
        print(f"problems: {sample}")
    return code


def cmd_eval(args: argparse.Namespace) -> int:
    from cpl.evaluation import evaluate, offline_generator

    policy_url = getattr(args, "policy_url", None)  # added by the service layer (services/policy/evaluation.py)
    if (args.model is None) == (policy_url is None):
        raise CLIError(
            "give exactly one of --model DIR or --policy-url URL" if hasattr(args, "policy_url") else "give --model DIR"
        )
    problems = _problems(args.input, args.limit)
    fmt = PromptFormat(args.format)
    if args.model is not None:
        with offline_generator(str(_model_dir(args.model, "model")), fmt, dtype=args.dtype) as generate:
            report = evaluate(problems, generate, fmt=fmt, few_shot=args.few_shot, max_tokens=args.max_tokens)
    else:
        generate = args.remote_generator(policy_url, fmt)
        report = evaluate(problems, generate, fmt=fmt, few_shot=args.few_shot, max_tokens=args.max_tokens)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report.model_dump_json(indent=2))
    shots = "few-shot" if args.few_shot else "zero-shot"
    print(f"accuracy {report.accuracy:.4f} ({report.correct}/{report.total}) on {args.input}, {shots}")
    return 0


def cmd_round(args: argparse.Namespace) -> int:
    from cpl.round import Round, RoundSettings, RoundSettingsError, print_stage, summarise_round
    from cpl.training.config import PreferenceConfig, SFTConfig, ValueConfig

    problems = _problems(args.input, args.limit)
    eval_problems = _problems(args.eval_input, args.eval_limit) if args.eval_input else []
    base = _model_dir(args.base, "base")
    for flag, path in (("search-policy", args.search_policy), ("search-value", args.search_value)):
        if path is not None:
            _model_dir(path, flag)
    search = search_config(args)

    def stage_overrides(prefix: str) -> dict[str, object]:
        """The ``--{prefix}-epochs/-batch-size/-lr`` and ``--micro-batch-size`` flags that were given."""
        values = {
            "epochs": getattr(args, f"{prefix}_epochs"),
            "batch_size": getattr(args, f"{prefix}_batch_size"),
            "learning_rate": getattr(args, f"{prefix}_lr"),
            "micro_batch_size": args.micro_batch_size,
        }
        return {k: v for k, v in values.items() if v is not None}

    try:
        settings = RoundSettings(
            round=args.round,
            base=base,
            previous=args.previous,
            search_policy=args.search_policy,
            search_value=args.search_value,
            search=search,
            concurrency=args.concurrency,
            dtype=args.dtype,
            marker_bias=args.marker_bias,
            baselines=not args.no_baselines,
            sft=SFTConfig.round_preset(args.round, **stage_overrides("sft")),
            preference=PreferenceConfig(**stage_overrides("apo")),
            value=ValueConfig(**stage_overrides("value")),
            eval_max_tokens=args.eval_max_tokens,
            eval_few_shot=args.eval_few_shot,
            seed=args.round_seed,
        )
        cpl_round = Round(args.run_dir, settings, problems, eval_problems)
    except RoundSettingsError as exc:
        raise CLIError(str(exc)) from exc
    records = cpl_round.run_all(on_stage=print_stage)
    for stage, record in records.items():
        extra = f" ({record.reason})" if record.reason else ""
        print(f"{stage}: {record.status}{extra}")
    if "eval" in records and records["eval"].status == "done":
        print("accuracy: " + json.dumps(records["eval"].outputs["accuracy"]))
    print(summarise_round(cpl_round))
    return 0


Extension = Callable[[Any], Any]
"""Adds sub-commands (or options of the library's sub-commands) to the ``cpl`` parser; the service layer uses it
to add ``cpl serve``, ``cpl eval --policy-url`` and ``cpl eval-ood`` (the library itself knows nothing about
services and speaks no HTTP)."""


def build_parser(extensions: Sequence[Extension] = ()) -> argparse.ArgumentParser:
    from cpl.training.cli import add_train_parser

    parser = argparse.ArgumentParser(prog="cpl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)

    search = sub.add_parser("search", help="MCTS over plan steps, in-process on vLLM")
    add_search_arguments(search)
    search.set_defaults(func=cmd_search)

    models = sub.add_parser("models", help="build models").add_subparsers(dest="models_command", required=True)
    tiny = models.add_parser("tiny", help="random-weight tiny policy + value models with a local tokenizer")
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_models_tiny)

    ev = sub.add_parser("eval", help="accuracy on GSM8K/MATH-format JSONL (zero-shot, as the paper reports it)")
    ev.add_argument("--model", type=Path, help="policy model directory (in-process vLLM)")
    ev.add_argument("--input", type=Path, required=True)
    ev.add_argument("--limit", type=_positive)
    ev.add_argument("--format", choices=[f.value for f in PromptFormat], default=PromptFormat.PLAIN.value)
    ev.add_argument(
        "--few-shot",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="prepend the appendix A.1 demonstrations (default: zero-shot, paper §4.2)",
    )
    ev.add_argument("--max-tokens", type=_positive, default=512)
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--out", type=Path, help="write the per-problem report as JSON")
    ev.set_defaults(func=cmd_eval)

    rnd = sub.add_parser("round", help="one CPL round in-process: search, extract, train, evaluate (resumable)")
    rnd.add_argument("--base", type=Path, required=True, help="base policy model directory")
    rnd.add_argument("--input", type=Path, required=True, help="training problems (GSM8K or MATH JSONL)")
    rnd.add_argument("--run-dir", type=Path, required=True, help="every artefact goes here; rerun to resume")
    add_round_flag(rnd, default=1)
    rnd.add_argument(
        "--previous", type=Path, help="run directory of the previous round (round 2 searches with its models)"
    )
    rnd.add_argument(
        "--search-policy", type=Path, help="policy for the search (default: base; round 2: --previous's Step-APO)"
    )
    rnd.add_argument(
        "--search-value", type=Path, help="value model for the search (default: fresh head; round 2: --previous's)"
    )
    rnd.add_argument("--eval-input", type=Path, help="held-out problems to evaluate every policy on")
    rnd.add_argument("--limit", type=_positive)
    rnd.add_argument("--eval-limit", type=_positive)
    add_field_flags(rnd, SearchConfig, ROUND_SEARCH_FLAGS, presets=ROUND_PRESETS)
    rnd.add_argument("--concurrency", type=_positive, default=32)
    rnd.add_argument("--dtype", default="auto")
    rnd.add_argument("--marker-bias", type=float, default=0.0)
    rnd.add_argument("--no-baselines", action="store_true", help="skip the Step-DPO baseline")
    for prefix in ("sft", "apo", "value"):
        rnd.add_argument(f"--{prefix}-epochs", type=_positive)
        rnd.add_argument(f"--{prefix}-batch-size", type=_positive)
        rnd.add_argument(f"--{prefix}-lr", type=float)
    rnd.add_argument("--micro-batch-size", type=_positive)
    rnd.add_argument("--eval-max-tokens", type=_positive, default=256)
    rnd.add_argument(
        "--eval-few-shot",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="prepend the demonstrations when evaluating (default: zero-shot, paper §4.2)",
    )
    rnd.add_argument(
        "--seed",
        dest="round_seed",  # not SearchConfig.seed: the round's searches stay unseeded unless a flag says otherwise
        type=int,
        default=0,
        help="the round's seed: the fresh value head's weights and the search engine's global sampler (default: 0)",
    )
    rnd.set_defaults(func=cmd_round)

    demo = sub.add_parser("demo", help="the embedded planner searches three toy word problems")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--simulations", type=_positive, default=24)
    demo.add_argument(
        "--seed",
        type=int,
        default=DEMO_SEARCH_SEED,
        help=f"search seed (SearchConfig.seed; default: {DEMO_SEARCH_SEED}, which yields plan and solution pairs)",
    )
    demo.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show vLLM's and the library's logs"
    )
    demo.set_defaults(func=cmd_demo)

    # After the library's commands, so that an extension may also add options to one of them.
    for extend in extensions:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, extensions: Sequence[Extension] = ()) -> int:
    args = build_parser(extensions).parse_args(argv)
    if not args.verbose:
        # vLLM logs every engine start at INFO (hundreds of lines); its engine children inherit the variable.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        logging.getLogger("vllm").setLevel(logging.ERROR)  # import-time warnings, before vLLM configures its logger
        # Library deprecation notices (torch, vLLM) in this process and in vLLM's engine children.
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        warnings.simplefilter("ignore")
        # What is left (C++ warnings, loading bars of the engine's children) goes to a log, not the terminal.
        os.environ.setdefault(ENGINE_LOG_ENV, str(Path(tempfile.gettempdir()) / f"cpl-vllm-{os.getpid()}.log"))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format='{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "message": "%(message)s"}',
    )
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"cpl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
