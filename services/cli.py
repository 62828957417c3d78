"""``cpl serve policy|value|search`` and ``cpl worker``: the argparse part, for cpl/cli.py to call.

    from services.cli import add_serve_parser
    add_serve_parser(sub)          # sub = parser.add_subparsers(...)
    ...
    return args.func(args)         # runs the service until SIGINT/SIGTERM

Flags override the ``CPL_POLICY_*`` / ``CPL_VALUE_*`` / ``CPL_SEARCH_*`` environment variables; everything else
(the admin token and API keys above all, which must not appear on a command line) comes from the environment.
docs/services.md and docs/search-service.md list them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# (flag, settings field, type, help)
_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--model", "model", Path, "model directory served at start"),
    ("--host", "host", str, "gateway address (default 0.0.0.0)"),
    ("--port", "port", int, "gateway port (default 8001 policy, 8002 value)"),
    ("--checkpoint-root", "checkpoint_root", Path, "hot-swap checkpoints must lie under this directory"),
    ("--admin-token-file", "admin_token_file", Path, "file with the admin bearer token"),
    ("--model-version", "model_version", str, "version label of the model loaded at start (default 1)"),
    ("--served-model-name", "served_model_name", str, "OpenAI model name (default policy / value)"),
    ("--max-model-len", "max_model_len", int, "vLLM --max-model-len (default 4096)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float, "vLLM memory share (default 0.9)"),
    ("--kv-cache-memory-bytes", "kv_cache_memory_bytes", int, "explicit vLLM KV cache size in bytes"),
    ("--dtype", "dtype", str, "vLLM --dtype (default auto)"),
    ("--vllm-port", "vllm_port", int, "with VLLM_UDS=false, the vLLM child's port on localhost (default: a free one)"),
    ("--log-format", "log_format", str, "json (default) or text"),
    ("--log-level", "log_level", str, "gateway log level (default INFO)"),
)


def _add_service_parser(which: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    prefix = f"CPL_{name.upper()}_"
    p = which.add_parser(
        name,
        help=help_text,
        description=f"{help_text}. Settings not given as flags come from {prefix}* environment variables.",
    )
    for flag, dest, kind, help_line in _OPTIONS:
        p.add_argument(flag, dest=dest, type=kind, default=None, help=help_line)
    p.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=None, help="no torch.compile")
    p.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=None,
        help="turn vLLM prefix caching off",
    )
    p.set_defaults(func=run_serve, service=name)
    return p


# (flag, settings field, type, help) of the search API and its workers (docs/search-service.md)
_SEARCH_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--redis-url", "redis_url", str, "Redis URL: store and Celery broker"),
    ("--key-prefix", "key_prefix", str, "prefix of every Redis key"),
    ("--policy-url", "policy_url", str, "the policy service"),
    ("--value-url", "value_url", str, "the value service"),
    ("--log-format", "log_format", str, "json (default) or text"),
    ("--log-level", "log_level", str, "log level (default INFO)"),
)


def _add_search_options(p: argparse.ArgumentParser) -> None:
    for flag, dest, kind, help_line in _SEARCH_OPTIONS:
        p.add_argument(flag, dest=dest, type=kind, default=None, help=help_line)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve {policy,value,search}`` to an argparse sub-parser collection; returns the ``serve`` parser."""
    serve = subparsers.add_parser("serve", help="run a service: policy or value (gateway + vLLM), or the search API")
    which = serve.add_subparsers(dest="service", required=True, metavar="{policy,value,search}")
    _add_service_parser(which, "policy", "policy service: /v1/expand and /v1/completions on vLLM")
    _add_service_parser(which, "value", "value service: /v1/values on vLLM's pooling runner")
    search = which.add_parser(
        "search",
        help="search API: plan-tree searches run by Celery workers (cpl worker)",
        description="The search API. Settings not given as flags come from CPL_SEARCH_* environment variables "
        "(the API keys above all, which must not appear on a command line).",
    )
    search.add_argument("--host", dest="host", type=str, default=None, help="API address (default 0.0.0.0)")
    search.add_argument("--port", dest="port", type=int, default=None, help="API port (default 8003)")
    _add_search_options(search)
    search.set_defaults(func=run_serve, service="search")
    return serve


def add_worker_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``worker``: a Celery worker process of the search service."""
    p = subparsers.add_parser(
        "worker",
        help="run a worker: searches (Celery, threads pool) and/or trainings and rounds (--queues train)",
        description="A search and/or train worker. Settings not given as flags come from CPL_SEARCH_* (and, for "
        "the train queue, CPL_TRAINER_*) environment variables.",
    )
    p.add_argument(
        "--concurrency", dest="worker_concurrency", type=int, default=None, help="trees searched at once (default 64)"
    )
    p.add_argument(
        "--queues",
        default="search",
        help="comma-separated queues to consume: search (threads pool), train (trainings and rounds, one at a "
        "time; needs CPL_TRAINER_* settings). `search,train` runs one worker process for each (default search)",
    )
    _add_search_options(p)
    p.set_defaults(func=run_worker)
    return p


def _search_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = [dest for _, dest, _, _ in _SEARCH_OPTIONS] + ["host", "port", "worker_concurrency"]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _settings_error(exc: Exception) -> int:
    print(f"cpl: invalid search settings: {exc}", file=sys.stderr)
    return 2


def run_worker(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from services.search.main import work
    from services.search.worker import parse_queues

    try:
        queues = parse_queues(args.queues)
    except ValueError as exc:
        print(f"cpl: {exc}", file=sys.stderr)
        return 2
    try:
        return work(queues, **_search_overrides(args))
    except ValidationError as exc:
        # the train queue also reads CPL_TRAINER_*: say which settings refused
        kind = {"SearchSettings": "search ", "TrainerSettings": "trainer "}.get(exc.title, "")
        print(f"cpl: invalid {kind}settings: {exc}", file=sys.stderr)
        return 2


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    names = [dest for _, dest, _, _ in _OPTIONS] + ["enforce_eager", "enable_prefix_caching"]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def run_serve(args: argparse.Namespace) -> int:
    if args.service == "search":
        from pydantic import ValidationError

        from services.search.main import serve as serve_search

        try:
            serve_search(**_search_overrides(args))
        except ValidationError as exc:
            return _settings_error(exc)
        return 0
    overrides = overrides_from_args(args)
    if args.service == "policy":
        from services.policy.main import serve
    else:
        from services.value.main import serve
    serve(**overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``cpl`` console script: the library's commands plus ``cpl serve``, ``cpl worker``, the evaluations
    over HTTP (``cpl eval --policy-url``, ``cpl eval-ood``), the stack (``cpl up``, ``submit``, ``export``) and its
    rounds (``cpl round --api``)."""
    from cpl.cli import main as cpl_main
    from services.policy.evaluation import add_eval_commands
    from services.stack.cli import add_stack_parsers
    from services.trainer.round_cli import add_round_api

    extensions = [add_serve_parser, add_worker_parser, add_eval_commands, add_stack_parsers, add_round_api]
    return cpl_main(argv, extensions=extensions)


if __name__ == "__main__":
    sys.exit(main())
