"""One CPL round on the toy world, run by the stack: time per stage.

    .venv/bin/python bench/round_stack/run.py --problems 16 --eval-problems 40 --simulations 24

Starts ``cpl up --trainer`` (its own run directory and a private Redis when none answers at ``CPL_REDIS_URL``),
submits one round with ``cpl round --api`` (search → export → SFT → Step-APO → value → deploy → eval; paper
§4.1, with the sizes given here), waits for it, then reads the round's record (``GET /v1/rounds/{id}``) and prints
each stage's wall time, the Table 1 figures of its search and the evaluation accuracy, as JSON lines and a
Markdown table. The stack is stopped at the end (SIGTERM, as Ctrl-C would).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

from cpl.toy import world

REPO = Path(__file__).resolve().parents[2]


def seconds(stage: dict) -> float | None:
    if not stage.get("started_at") or not stage.get("finished_at"):
        return None
    start = datetime.fromisoformat(stage["started_at"])
    return (datetime.fromisoformat(stage["finished_at"]) - start).total_seconds()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=16, help="training-split toy problems searched")
    p.add_argument("--eval-problems", type=int, default=40, help="held-out toy problems evaluated")
    p.add_argument("--simulations", type=int, default=24)
    p.add_argument("--port", type=int, default=18741)
    p.add_argument("--run-dir", type=Path, default=Path("runs/bench_round_stack"))
    args = p.parse_args()

    run_dir = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    train = world.write_gsm8k_jsonl(
        world.generate("arith", args.problems, seed=3, split="train"), run_dir / "train.jsonl"
    )
    test = world.write_gsm8k_jsonl(
        world.generate("arith", args.eval_problems, seed=5, split="test"), run_dir / "test.jsonl"
    )
    cpl = [sys.executable, "-m", "services.cli"]
    up = subprocess.Popen(
        [*cpl, "up", "--trainer", "--port", str(args.port), "--run-dir", str(run_dir / "stack")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if line.startswith("Dashboard:"):
                break
        else:
            raise SystemExit(f"cpl up exited with {up.wait()}")
        url = f"http://127.0.0.1:{args.port}"
        started = time.monotonic()
        rnd = [*cpl, "round", "--api", url, "--rounds", "1", "--run-dir", str(run_dir / "stack")]
        rnd += ["--input", str(train), "--eval-input", str(test), "--simulations", str(args.simulations)]
        done = subprocess.run(rnd, cwd=REPO, capture_output=True, text=True)
        total = time.monotonic() - started
        if done.returncode != 0:
            print(done.stdout + done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        key = json.loads((run_dir / "stack" / "stack.json").read_text())["operator_key"]
        headers = {"Authorization": f"Bearer {key}"}
        (record,) = httpx.get(f"{url}/v1/rounds", headers=headers, params={"limit": 1}, timeout=30).json()
        record = httpx.get(f"{url}/v1/rounds/{record['id']}", headers=headers, timeout=30).json()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(timeout=120)

    rows = []
    for stage in record["stages"]:
        outputs = stage.get("outputs") or {}
        row = {"round": stage["round"], "stage": stage["stage"], "status": stage["status"], "seconds": seconds(stage)}
        if stage["stage"] == "search":
            row["stats"] = outputs.get("stats")
        if stage["stage"] == "eval":
            row["accuracy"] = outputs.get("accuracy")
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps({"total_seconds": round(total, 1), "problems": args.problems, "simulations": args.simulations}))
    print("\n| stage | status | seconds |\n| --- | --- | --- |")
    for row in rows:
        secs = "–" if row["seconds"] is None else f"{row['seconds']:.1f}"
        print(f"| {row['stage']} | {row['status']} | {secs} |")
    print(f"| whole round (client's view) | | {total:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
