"""``cpl round --api URL --input train.jsonl --eval-input test.jsonl --rounds 2``: submit CPL's rounds to a running
stack (``POST /v1/rounds``) and follow them with progress bars; the round runs server-side and survives this
client going away (``--no-follow`` returns at once). Exit 0 when every round succeeded, 1 when the round failed
or was cancelled, 2 for bad input (the stack's 4xx message is printed).

The operator key comes from ``CPL_TRAINER_OPERATOR_KEY``, else the ``stack.json`` a ``cpl up --trainer`` wrote in
``--run-dir`` (default runs/up); it never goes on a command line. Without ``--api``, ``cpl round`` is the
library's in-process round (cpl/cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

STACK_RUN_DIR = Path("runs/up")
FINAL = ("succeeded", "failed", "cancelled")


class RoundClientError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def add_round_api(subparsers: Any) -> None:
    """Add ``--api`` (and ``--rounds``, ``--no-follow``) to the library's ``cpl round``; with ``--api`` the
    library-only flags ``--base`` and ``--run-dir`` are not needed."""
    rnd: argparse.ArgumentParser = subparsers.choices["round"]
    for action in rnd._actions:  # argparse has no public way to relax a required option of an existing parser
        if action.dest in ("base", "run_dir"):
            action.required = False
    rnd.add_argument("--api", metavar="URL", help="run the rounds on this stack (POST /v1/rounds) and follow them")
    rnd.add_argument("--rounds", type=int, default=None, help="with --api: how many rounds (default 2)")
    rnd.add_argument("--no-follow", dest="follow", action="store_false", help="with --api: print the id and return")
    library = rnd.get_default("func")

    def dispatch(args: argparse.Namespace) -> int:
        if args.api:
            return run_round_api(args)
        missing = [flag for flag, value in (("--base", args.base), ("--run-dir", args.run_dir)) if value is None]
        if missing or args.rounds is not None:
            what = f"{' and '.join(missing)} required" if missing else "--rounds goes with --api"
            print(f"cpl round: {what} (in-process round; or give --api URL)", file=sys.stderr)
            return 2
        return library(args)

    rnd.set_defaults(func=dispatch)


def operator_key(run_dir: Path) -> str:
    key = os.environ.get("CPL_TRAINER_OPERATOR_KEY")
    state = run_dir / "stack.json"
    if not key and state.is_file():
        try:
            key = json.loads(state.read_text()).get("operator_key")
        except (OSError, ValueError):
            key = None
    if not key:
        raise RoundClientError(
            f"no operator key: set CPL_TRAINER_OPERATOR_KEY or run next to a `cpl up --trainer` ({state})"
        )
    return key


def _problems(path: Path, limit: int | None) -> list[dict[str, Any]]:
    from cpl.problems import ProblemFileError, load_problems

    try:
        problems = load_problems(path, limit=limit)
    except (OSError, ProblemFileError) as exc:
        raise RoundClientError(str(exc)) from exc
    missing = [p.id for p in problems if p.gold is None]
    if missing:
        raise RoundClientError(f"{path}: problems without an answer ({', '.join(missing[:5])}): a round grades them")
    return [{"id": p.id, "question": p.question, "answer": p.gold} for p in problems]


def round_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request: the problems, and the library flags that were given, as the API's overrides."""
    body: dict[str, Any] = {"problems": _problems(args.input, args.limit)}
    if args.rounds is not None:
        body["rounds"] = args.rounds
    if args.eval_input is not None:
        body["eval_problems"] = _problems(args.eval_input, args.eval_limit)
    if getattr(args, "simulations", None) is not None:
        body["simulations"] = [args.simulations]
    search = {name: getattr(args, name, None) for name in ("max_step_tokens", "max_depth", "few_shot")}
    body["search_settings"] = {k: v for k, v in search.items() if v is not None}
    training: dict[str, dict[str, Any]] = {}
    for prefix, kinds in (("sft", ("sft",)), ("apo", ("step-apo", "step-dpo")), ("value", ("value",))):
        values = {
            "epochs": getattr(args, f"{prefix}_epochs"),
            "batch_size": getattr(args, f"{prefix}_batch_size"),
            "learning_rate": getattr(args, f"{prefix}_lr"),
            "micro_batch_size": args.micro_batch_size,
        }
        for kind in kinds:
            training[kind] = {k: v for k, v in values.items() if v is not None}
    body["training"] = {k: v for k, v in training.items() if v}
    body["eval_max_tokens"] = args.eval_max_tokens
    return body


class RoundsClient:
    def __init__(self, url: str, key: str, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout_s,
            transport=httpx.HTTPTransport(retries=3),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise RoundClientError(f"no stack answers at {self.url} ({exc})", code=1) from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:500]
            raise RoundClientError(
                f"{method} {path}: {response.status_code} {detail}", code=2 if response.status_code < 500 else 1
            )
        return response.json()

    def follow(self, round_id: str, interval_s: float = 1.0) -> dict[str, Any]:
        """A bar over the stages of every round, and one over the running training's steps."""
        record = self.request("GET", f"/v1/rounds/{round_id}")
        stages = tqdm(total=len(record["stages"]), unit="stage", desc=f"round {round_id[:8]}", dynamic_ncols=True)
        steps: tqdm | None = None
        training_id: str | None = None
        try:
            while True:
                record = self.request("GET", f"/v1/rounds/{round_id}")
                stages.n = sum(1 for s in record["stages"] if s["status"] in ("done", "skipped"))
                stages.set_postfix_str(f"round {record['round']}: {record['stage'] or record['status']}")
                if record.get("training_id") != training_id:
                    if steps is not None:
                        steps.close()
                        steps = None
                    training_id = record.get("training_id")
                    if training_id:
                        steps = tqdm(total=0, unit="step", desc="  training", leave=False, dynamic_ncols=True)
                if steps is not None and training_id:
                    training = self.request("GET", f"/v1/trainings/{training_id}")
                    steps.total = training.get("total_steps") or 0
                    steps.n = training.get("step") or 0
                    loss = training.get("loss")
                    steps.set_postfix_str(
                        f"{training['kind']} loss {loss:.4f}" if loss is not None else training["kind"]
                    )
                    steps.refresh()
                stages.refresh()
                if record["status"] in FINAL:
                    return record
                time.sleep(interval_s)
        finally:
            if steps is not None:
                steps.close()
            stages.close()


def summary(record: dict[str, Any]) -> list[str]:
    lines = [f"round {record['id']}: {record['status']}" + (f" ({record['error']})" if record.get("error") else "")]
    for entry in record["stages"]:
        note = entry.get("reason") or entry.get("error") or ""
        lines.append(f"  round {entry['round']} {entry['stage']:<9} {entry['status']}" + (f": {note}" if note else ""))
    if record.get("accuracy"):
        lines.append("accuracy per round: " + json.dumps(record["accuracy"]))
    return lines


def run_round_api(args: argparse.Namespace) -> int:
    try:
        client = RoundsClient(args.api, operator_key(args.run_dir or STACK_RUN_DIR))
        body = round_body(args)
        record = client.request("POST", "/v1/rounds", json=body)
        print(f"round {record['id']}: {len(record['stages'])} stages queued", flush=True)
        if not args.follow:
            return 0
        record = client.follow(record["id"])
    except RoundClientError as exc:
        print(f"cpl round: {exc}", file=sys.stderr)
        return exc.code
    print("\n".join(summary(record)))
    return 0 if record["status"] == "succeeded" else 1
