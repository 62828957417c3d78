"""``cpl up``, ``cpl submit``, ``cpl export`` (and ``cpl up --demo``, which ``make demo`` runs): the argparse part,
registered through services/cli.py's extension list."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

RUN_DIR = Path("runs/up")


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535 (got {value})")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _keep_default() -> bool:
    return os.environ.get("DEMO_KEEP", "1").strip().lower() not in ("0", "false", "no", "")


def add_stack_parsers(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up",
        help="start the stack here: Redis, policy and value services, search API + dashboard, a worker",
        description="Start the stack on the embedded planner and wait for Ctrl-C/SIGTERM; prints the dashboard URL "
        "and the API key (CPL_SEARCH_API_KEY, else a generated one). Redis: CPL_REDIS_URL, else a private "
        "redis-server under the run directory.",
    )
    up.add_argument("--port", type=_port, default=8003, help="search API and dashboard port (default 8003)")
    up.add_argument("--run-dir", type=Path, default=RUN_DIR, help="logs, private Redis data, stack.json")
    up.add_argument("--verbose", action="store_true", help="show the inference services' (vLLM's) logs")
    up.add_argument(
        "--trainer",
        action="store_true",
        help="also the trainer: training, deployment and round routes (operator key printed), a train worker, "
        "checkpoints under RUN_DIR/checkpoints hot-swapped into the policy and value services",
    )
    up.add_argument(
        "--demo",
        type=int,
        nargs="?",
        const=4,
        default=None,
        metavar="N",
        help="then search N held-out toy problems (default 4), print their best plans and Table 1",
    )
    up.add_argument("--demo-simulations", type=_positive, default=24, help="simulations of each demo search")
    up.add_argument(
        "--no-keep",
        dest="keep",
        action="store_false",
        default=None,
        help="stop once the demo is done instead of waiting for Ctrl-C (also DEMO_KEEP=0)",
    )
    up.set_defaults(func=run_up_cmd)

    submit = subparsers.add_parser(
        "submit", help="send a batch to a running stack (cpl up) and follow it with a progress bar"
    )
    what = submit.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", type=Path, help="JSONL file of problems, GSM8K or MATH format")
    what.add_argument("--question", help="one problem")
    submit.add_argument("--answer", help="its ground-truth answer (with --question)")
    submit.add_argument("--simulations", type=_positive, default=None, help="simulations of each search")
    submit.add_argument("--url", default=None, help="search API (default: CPL_SEARCH_URL or the running cpl up)")
    submit.add_argument("--run-dir", type=Path, default=RUN_DIR, help="where cpl up left stack.json")
    submit.add_argument("--no-follow", dest="follow", action="store_false", help="print the batch id and return")
    submit.add_argument("--show", action="store_true", help="print every search's best plan at the end")
    submit.set_defaults(func=run_submit_cmd)

    export = subparsers.add_parser("export", help="write a batch's four datasets (JSONL) from a running stack")
    export.add_argument("batch", help="batch id (cpl submit prints it)")
    export.add_argument("--out", type=Path, required=True, help="directory for sft/plan_pairs/solution_pairs/value")
    export.add_argument("--url", default=None, help="search API (default: CPL_SEARCH_URL or the running cpl up)")
    export.add_argument("--run-dir", type=Path, default=RUN_DIR, help="where cpl up left stack.json")
    export.set_defaults(func=run_export_cmd)


def _fail(exc: Exception, code: int) -> int:
    print(f"cpl: {exc}", file=sys.stderr)
    return code


def run_submit_cmd(args: argparse.Namespace) -> int:
    from services.stack.client import ClientError, SearchAPIClient, format_batch, format_best_plans, resolve_target

    if args.answer is not None and args.question is None:
        return _fail(ValueError("--answer goes with --question"), 2)
    try:
        with SearchAPIClient(resolve_target(args.url, args.run_dir)) as client:
            if args.input is not None:
                batch = client.submit_file(args.input, args.simulations)
            else:
                problem = {"question": args.question}
                if args.answer is not None:
                    problem["answer"] = args.answer
                batch = client.submit_problems([problem], args.simulations)
            print(f"batch {batch['id']}: {batch['total']} searches queued")
            if not args.follow:
                return 0
            batch = client.follow(batch["id"])
            if args.show:
                print("\n".join(format_best_plans(client.batch_searches(batch["id"]))))
            print("\n".join(format_batch(batch)))
            print(f"datasets: cpl export {batch['id']} --out DIR")
            return 1 if batch["counts"].get("failed") else 0
    except ClientError as exc:
        return _fail(exc, exc.code)


def run_export_cmd(args: argparse.Namespace) -> int:
    from services.stack.client import ClientError, SearchAPIClient, resolve_target

    try:
        with SearchAPIClient(resolve_target(args.url, args.run_dir)) as client:
            rows = client.export(args.batch, args.out)
    except ClientError as exc:
        return _fail(exc, exc.code)
    for name, count in rows.items():
        print(f"{args.out / (name + '.jsonl')}: {count} rows")
    return 0


def run_up_cmd(args: argparse.Namespace) -> int:
    from services.stack.up import run_up

    keep = True if args.keep is None else args.keep
    after = None
    if args.demo is not None:
        keep = _keep_default() if args.keep is None else args.keep
        if args.demo < 1:
            return _fail(ValueError("--demo needs at least one problem"), 2)
        from services.stack.demo import demo_batch

        def after(stack: Any) -> int:
            return demo_batch(stack, args.demo, args.demo_simulations)

    return run_up(args.port, args.run_dir, args.verbose, after_start=after, keep=keep, trainer=args.trainer)
