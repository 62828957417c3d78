"""Answer extraction and equivalence: the terminal reward of the search (+1 / -1) and evaluation accuracy.

`extract_answer` pulls the last ``\\boxed{...}`` out of a generated solution, `gold_answer` reads the ground
truth of a GSM8K or MATH row, and `is_equivalent` decides whether the two agree.

`is_equivalent` must be safe to call from Celery thread-pool workers and asyncio code (through
``asyncio.to_thread``: it blocks). math-verify's own timeouts use ``signal.alarm``, which only works in the
main thread, and sympy can hang (or eat all memory) on inputs such as ``9^{9^{9^{9^{9}}}}``. So:

1. cheap fast paths (normalised string equality, exact rational arithmetic) decide most answers without sympy;
2. everything else runs through math-verify, with its signal timeouts off, in one persistent *spawned* worker
   process; the caller waits at most `VERIFY_TIMEOUT_S`, and a worker that overruns is killed and replaced on
   the next call, and the answer is judged not equivalent. (Spawn re-imports ``__main__``: scripts that grade
   need the usual ``if __name__ == "__main__":`` guard.)
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import re
import threading
from collections.abc import Mapping
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

VERIFY_TIMEOUT_S: float = 5.0
"""Longest a single math-verify comparison may take before it is judged not equivalent."""
STARTUP_TIMEOUT_S: float = 120.0
"""Longest the worker may take to start (interpreter + sympy import); kept apart from `VERIFY_TIMEOUT_S` so a
cold start is never mistaken for a pathological answer."""
MAX_INPUT_CHARS: int = 2000
"""Longer inputs are only compared as strings: real answers are short, and sympy time grows with length."""
WORKER_MEMORY_BYTES: int = 4 << 30
"""Address-space cap of the worker, so a huge integer power fails with MemoryError instead of swapping the node."""

# ---------------------------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_GSM8K_MARK = "####"
# A comma between digits followed by exactly three digits: "1,234,567" -> "1234567", but "1,2" stays a pair.
_THOUSANDS_SEP_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_SHORT_ANSWER_CHARS = 100


def _braced_content(text: str, open_at: int) -> str | None:
    """Content of the brace group opening at ``text[open_at] == "{"``; None if it never closes."""
    depth = 0
    i = open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces (sets), not grouping; skip the escaped character
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def extract_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in ``text``.

    None if there is no box, the last one is empty, or its braces never close (a truncated generation: an
    earlier box is not used, because the model's final answer is the unfinished one).
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :]
    body = rest.lstrip()
    if body.startswith("{"):
        content = _braced_content(text, len(text) - len(body))
    else:  # \boxed 5 — TeX takes the next token; take the run up to whitespace or math delimiters
        match = re.match(r"[^\s${}]+", body)
        content = match.group(0).rstrip(".,") if match else None
    if content is None or not content.strip():
        return None
    return content.strip()


def gold_answer(row: Mapping[str, Any]) -> str:
    """Ground-truth answer of a GSM8K row (``answer`` ending in ``#### 1,234`` -> ``"1234"``), a row whose
    ``answer`` is already a short plain answer, or a MATH row (last ``\\boxed{}`` of ``solution``)."""
    answer = row.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if isinstance(answer, str) and answer.strip():
        if _GSM8K_MARK in answer:
            lines = answer.rsplit(_GSM8K_MARK, 1)[1].strip().splitlines()
            if lines and lines[0].strip():
                return _THOUSANDS_SEP_RE.sub("", lines[0].strip())
        else:
            boxed = extract_answer(answer)
            if boxed is not None:
                return boxed
            plain = answer.strip()
            if len(plain) <= _SHORT_ANSWER_CHARS and "\n" not in plain:
                return plain
    solution = row.get("solution")
    if isinstance(solution, str):
        boxed = extract_answer(solution)
        if boxed is not None:
            return boxed
    raise ValueError(
        "no gold answer in row with keys "
        f"{sorted(row)}: expected a GSM8K 'answer' ending in '#### <answer>', a short plain 'answer', "
        "or a MATH 'solution' containing \\boxed{...}"
    )


# ------------------------------------------------------------------------------------------ fast paths

_SPACING_RE = re.compile(r"\\[!,;: ]|\s+")
_TEXT_UNIT_RE = re.compile(r"\\(?:text|textrm|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z\s.]*\}")  # \text{ cm}
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_GROUPED_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC_RE = re.compile(r"([+-]?)\\frac(?:\{([+-]?\d+)\}\{([+-]?\d+)\}|(\d)(\d))")
_SLASH_RE = re.compile(r"([+-]?\d+)/([+-]?\d+)")


def _normalise(s: str) -> str:
    """Spelling-only normalisation: two answers equal after it are certainly equivalent."""
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\$", "").replace("$", "")
    return s.rstrip(".")


class _Number(NamedTuple):
    value: Fraction
    inexact: bool  # written with a decimal point: math-verify compares those with rounding
    percent: bool  # math-verify accepts both 50% ~ 50 and 50% ~ 0.5


def _as_number(s: str) -> _Number | None:
    """Exact value of a plain numeric answer (integer, decimal, simple fraction, with unit/$/%); else None.

    Never evaluates powers or anything else whose cost could grow with the input.
    """
    s = _normalise(_TEXT_UNIT_RE.sub("", s))
    percent = s.endswith("%")
    if percent:
        s = s.removesuffix("%").removesuffix("\\")
    if _GROUPED_RE.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL_RE.fullmatch(s):
        return _Number(Fraction(s), "." in s, percent)
    if m := _FRAC_RE.fullmatch(s):
        sign, num, den = m.group(1), m.group(2) or m.group(4), m.group(3) or m.group(5)
    elif m := _SLASH_RE.fullmatch(s):
        sign, num, den = "", m.group(1), m.group(2)
    else:
        return None
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return _Number(-value if sign == "-" else value, False, percent)


def is_equivalent(predicted: str | None, gold: str) -> bool:
    """Whether the predicted answer is mathematically equivalent to the gold one (math-verify semantics).

    Thread-safe; blocks for at most about `VERIFY_TIMEOUT_S` (plus the wait for other callers' comparisons
    and, once per process, the worker's start-up). Run it through ``asyncio.to_thread`` from async code.
    Raises RuntimeError if the math-verify worker process cannot be started at all.
    """
    if predicted is None:
        return False
    pred_norm, gold_norm = _normalise(predicted), _normalise(gold)
    if not pred_norm or not gold_norm:
        return False
    if pred_norm == gold_norm:
        return True
    if len(predicted) > MAX_INPUT_CHARS or len(gold) > MAX_INPUT_CHARS:
        return False
    pred_num, gold_num = _as_number(predicted), _as_number(gold)
    if pred_num is not None and gold_num is not None:
        if pred_num.value == gold_num.value:
            return True
        # Exact integers/fractions that differ are different. Decimals and percentages go on to math-verify,
        # which rounds (1/3 ~ 0.333333) and reads 50% as both 50 and 0.5; deciding them here would disagree.
        if not (pred_num.inexact or gold_num.inexact or pred_num.percent or gold_num.percent):
            return False
    return _verify_isolated(predicted, gold)


# ------------------------------------------------------------------------------ math-verify in a worker


def _worker_init() -> None:
    # math-verify warns (once per process) that its timeouts are off; the parent enforces them instead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = WORKER_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(WORKER_MEMORY_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: the timeout still applies
        pass
    import math_verify  # noqa: F401 - pay the sympy import at start-up, not inside a timed comparison


def _ping() -> bool:
    return True


def _run_math_verify(gold: str, predicted: str) -> bool:
    """Runs in the worker. Wrapping in \\boxed{} makes math-verify's LaTeX extraction take the whole answer."""
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)  # type: ignore[arg-type]
    pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)  # type: ignore[arg-type]
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))  # gold first: verify is asymmetric


_lock = threading.Lock()  # one comparison in flight, so a caller's timeout measures its own comparison only
_pool: cf.ProcessPoolExecutor | None = None


def _reset_after_fork() -> None:
    # A forked child (e.g. a Celery prefork worker) does not own its parent's worker process or lock state.
    global _lock, _pool
    _lock = threading.Lock()
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _kill_pool(pool: cf.ProcessPoolExecutor) -> None:
    # shutdown() would wait for the hung call; before Python 3.14 (kill_workers) there is no public way to
    # stop a busy worker, so kill the processes directly.
    kill_workers = getattr(pool, "kill_workers", None)
    if kill_workers is not None:
        kill_workers()
    else:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _get_pool() -> cf.ProcessPoolExecutor:
    """The worker pool, started on first use. Caller holds `_lock`."""
    global _pool
    if _pool is None:
        # spawn, not fork: forking a process with running threads (Celery, asyncio) can deadlock the child.
        pool = cf.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
        )
        try:
            pool.submit(_ping).result(timeout=STARTUP_TIMEOUT_S)
        except BaseException as exc:
            _kill_pool(pool)
            # Failing loudly beats grading every answer as wrong. The usual cause: a script that calls the
            # grader at import time, without an `if __name__ == "__main__":` guard (spawn re-imports __main__).
            raise RuntimeError(f"math-verify worker process failed to start: {exc!r}") from exc
        _pool = pool
    return _pool


def _verify_isolated(predicted: str, gold: str) -> bool:
    """math-verify's judgement, computed in the worker process, without the fast paths (tests call this)."""
    global _pool
    timeout_s = VERIFY_TIMEOUT_S
    with _lock:
        pool = _get_pool()
        try:
            return pool.submit(_run_math_verify, gold, predicted).result(timeout=timeout_s)
        except TimeoutError:
            reason = f"timed out after {timeout_s:g} s"
        except BrokenProcessPool:
            reason = "lost its worker process (crash or memory limit)"
        except Exception as exc:  # math-verify itself failed on this input; the worker is fine
            logger.warning("math-verify failed (%r) on %.100r vs gold %.100r; not equivalent", exc, predicted, gold)
            return False
        _kill_pool(pool)
        _pool = None
    logger.warning("math-verify %s on %.100r vs gold %.100r; judged not equivalent", reason, predicted, gold)
    return False
