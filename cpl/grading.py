"""Answer extraction and equivalence: the terminal reward of the search (+1 / -1) and evaluation accuracy.

`extract_answer` pulls the last ``\\boxed{...}`` out of a generated solution, `gold_answer` reads the ground
truth of a GSM8K or MATH row, and `is_equivalent` decides whether the two agree.

`is_equivalent` works wherever it is called: at module level of a plain script, from threads (Celery thread
pools), inside an asyncio loop (it blocks: prefer ``asyncio.to_thread``) and inside daemonic processes (Celery
prefork workers, ``multiprocessing`` children with ``daemon=True``). math-verify's own timeouts use
``signal.alarm``, which only works in the main thread, and sympy can hang (or eat all memory) on inputs such as
``9^{9^{9^{9^{9}}}}``. So:

1. cheap fast paths (normalised string equality, exact rational arithmetic) decide most answers without sympy;
2. everything else runs through math-verify, with its signal timeouts off, in one persistent worker process
   (`cpl.grading_worker`, started with ``subprocess.Popen``, talking JSON lines over pipes: no ``multiprocessing``,
   so nothing re-imports the caller's ``__main__`` and daemonic processes may start it); the caller waits at most
   `VERIFY_TIMEOUT_S`, a worker that overruns is killed and replaced on the next call, and the answer is judged
   not equivalent.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

from cpl.grading_worker import MEMORY_BYTES_ENV

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


class _Worker:
    """One running `cpl.grading_worker` process and the thread that reads its answers into a queue.

    A plain child process (``subprocess.Popen``), not ``multiprocessing``: it needs no re-import of the
    caller's ``__main__`` and may be started from a daemonic process.
    """

    def __init__(self) -> None:
        env = dict(os.environ)
        env[MEMORY_BYTES_ENV] = str(WORKER_MEMORY_BYTES)
        # sys.path[0] is the directory holding `cpl`, not the caller's working directory: a user's module
        # named like a dependency of sympy cannot shadow it, and `cpl` need not be installed.
        bootstrap = f"import sys; sys.path[0] = {str(_PACKAGE_ROOT)!r}; import cpl.grading_worker as w; w.main()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", bootstrap],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
            bufsize=1,
            close_fds=True,
        )
        self._answers: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        threading.Thread(target=self._read_answers, name="cpl-grading-reader", daemon=True).start()

    def _read_answers(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        for line in stdout:
            try:
                self._answers.put(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("math-verify worker wrote a line that is not JSON: %.200r", line)
        self._answers.put(None)  # end of output: the worker exited

    def receive(self, timeout_s: float) -> dict[str, Any]:
        """The next answer; raises TimeoutError after ``timeout_s`` and EOFError if the worker died."""
        try:
            message = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no answer within {timeout_s:g} s") from None
        if message is None:
            self._answers.put(None)  # keep reporting the death to later calls
            raise EOFError(f"worker exited with code {self.process.poll()}")
        return message

    def send(self, message: dict[str, Any]) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(json.dumps(message) + "\n")
        stdin.flush()

    def kill(self) -> None:
        self.process.kill()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        # Reap it off the caller's path: after SIGKILL this is prompt, but never worth blocking a grader for.
        threading.Thread(target=self.process.wait, name="cpl-grading-reaper", daemon=True).start()


_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_lock = threading.Lock()  # one comparison in flight, so a caller's timeout measures its own comparison only
_worker: _Worker | None = None


def _reset_after_fork() -> None:
    # A forked child (e.g. a Celery prefork worker) does not own its parent's worker process or lock state.
    global _lock, _worker
    _lock = threading.Lock()
    _worker = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


@atexit.register
def _stop_worker() -> None:
    if _worker is not None:
        _worker.kill()


def _get_worker() -> _Worker:
    """The worker, started on first use (or after the last one was killed). Caller holds `_lock`."""
    global _worker
    if _worker is None or _worker.process.poll() is not None:
        try:
            worker = _Worker()
        except OSError as exc:
            raise RuntimeError(f"math-verify worker process failed to start: {exc!r}") from exc
        try:
            ready = worker.receive(STARTUP_TIMEOUT_S)
        except (TimeoutError, EOFError) as exc:
            worker.kill()
            # Failing loudly beats grading every answer as wrong (math-verify missing, no memory, ...).
            raise RuntimeError(f"math-verify worker process failed to start: {exc}") from exc
        if ready != {"ready": True}:
            worker.kill()
            raise RuntimeError(f"math-verify worker process failed to start: said {ready!r}")
        _worker = worker
    return _worker


def _verify_isolated(predicted: str, gold: str) -> bool:
    """math-verify's judgement, computed in the worker process, without the fast paths (tests call this)."""
    global _worker
    timeout_s = VERIFY_TIMEOUT_S
    with _lock:
        worker = _get_worker()
        try:
            worker.send({"gold": gold, "predicted": predicted})
            answer = worker.receive(timeout_s)
        except TimeoutError:
            reason = f"timed out after {timeout_s:g} s"
        except (EOFError, OSError):
            reason = "lost its worker process (crash or memory limit)"
        else:
            if "equivalent" in answer:
                return bool(answer["equivalent"])
            # math-verify itself failed on this input; the worker is fine
            logger.warning(
                "math-verify failed (%s) on %.100r vs gold %.100r; not equivalent", answer.get("error"), predicted, gold
            )
            return False
        worker.kill()
        _worker = None
    logger.warning("math-verify %s on %.100r vs gold %.100r; judged not equivalent", reason, predicted, gold)
    return False
