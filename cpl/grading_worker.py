"""The math-verify worker process of `cpl.grading`: one JSON request per line in, one JSON answer per line out.

Started by `cpl.grading` with ``subprocess.Popen`` (never ``multiprocessing``), so grading works in a plain
script without an ``if __name__ == "__main__":`` guard and inside daemonic processes such as Celery's prefork
workers. The protocol, on the worker's stdin/stdout:

- at start-up, after math-verify (and sympy) are imported: ``{"ready": true}``;
- request ``{"gold": "...", "predicted": "..."}`` -> ``{"equivalent": bool}``, or ``{"error": "..."}`` when
  math-verify itself raised on the input (the worker stays usable).

The worker exits when its stdin closes (the parent exited or closed it). Its timeouts are the parent's job: it
is killed when a comparison overruns, which also stops computations that never return to the interpreter (a huge
integer power inside sympy), where a signal-based timeout would not fire.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TextIO

MEMORY_BYTES_ENV = "CPL_GRADING_WORKER_MEMORY_BYTES"


def _limit_memory() -> None:
    """Cap the address space, so a huge integer power fails with MemoryError instead of swapping the node."""
    limit_bytes = int(os.environ.get(MEMORY_BYTES_ENV, "0"))
    if limit_bytes <= 0:
        return
    try:
        import resource
    except ImportError:  # not POSIX: the parent's timeout still applies
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError) as exc:  # not allowed here: the parent's timeout still applies
        print(f"cpl.grading_worker: memory limit not set: {exc!r}", file=sys.stderr)


def equivalent(gold: str, predicted: str) -> bool:
    """math-verify's judgement. Wrapping in \\boxed{} makes its LaTeX extraction take the whole answer."""
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)  # type: ignore[arg-type]
    pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)  # type: ignore[arg-type]
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))  # gold first: verify is asymmetric


def serve(requests: TextIO, answers: TextIO) -> None:
    def answer(message: dict[str, object]) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    answer({"ready": True})
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            result = equivalent(str(request["gold"]), str(request["predicted"]))
        except Exception as exc:  # math-verify failed on this input (or a malformed request): say so, keep serving
            answer({"error": repr(exc)[:500]})
        else:
            answer({"equivalent": result})


def main() -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr instead of corrupting it.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # math-verify warns that its own (signal-based) timeouts are off; the parent enforces the timeout instead.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _limit_memory()
    # Pay sympy's imports (math-verify imports parts of it lazily, on the first comparison) before saying ready,
    # not inside the first timed comparison.
    equivalent("\\frac{1}{2}", "\\sqrt{x}/2")
    serve(sys.stdin, answers)


if __name__ == "__main__":
    main()
