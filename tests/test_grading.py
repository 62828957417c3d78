"""Tests for cpl.grading: answer extraction, gold answers of the real data sets, and equivalence."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cpl import grading
from cpl.grading import extract_answer, gold_answer, is_equivalent

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


def _rows(name: str) -> list[dict[str, Any]]:
    with (DATA / name / "test.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------ extract_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The final answer is \\boxed{42}.", "42"),
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}.", "3"),
        ("The answer is \\boxed 5.", "5"),
        ("$\\boxed -7$", "-7"),
        ("\\fbox{12}", "12"),
        ("\\boxed{1} and later \\fbox{x+1}", "x+1"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not grouping
        ("\\boxed{ 7 }", "7"),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 42.",
        "",
        "\\boxed{\\frac{1}{2}",  # unbalanced: truncated generation
        "\\boxed{3} and then \\boxed{4",  # the last box is unbalanced; an earlier box is not used
        "\\boxed{}",
        "\\boxedfoo{3}",  # another macro
    ],
)
def test_extract_answer_none(text: str) -> None:
    assert extract_answer(text) is None


# -------------------------------------------------------------------------------------------- gold_answer


def test_gold_answer_formats() -> None:
    assert gold_answer({"question": "q", "answer": "2+2=<<2+2=4>>4\n#### 1,234"}) == "1234"
    assert gold_answer({"question": "q", "answer": "x\n#### 1,234,567.5"}) == "1234567.5"
    assert gold_answer({"question": "q", "answer": "x\n#### -3"}) == "-3"
    assert gold_answer({"problem": "p", "solution": "so \\boxed{1} no, \\boxed{\\frac{1}{2}}."}) == "\\frac{1}{2}"
    assert gold_answer({"question": "q", "answer": "\\frac{3}{4}"}) == "\\frac{3}{4}"
    assert gold_answer({"question": "q", "answer": 18}) == "18"


@pytest.mark.parametrize(
    "row",
    [
        {"question": "q"},
        {"question": "q", "answer": ""},
        {"question": "q", "answer": "worked solution\n#### "},
        {"question": "q", "answer": "a long worked solution\nwith several lines\nand no final marker"},
        {"problem": "p", "solution": "no box here"},
        {"problem": "p", "solution": "\\boxed{unbalanced"},
    ],
)
def test_gold_answer_missing_raises(row: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="no gold answer"):
        gold_answer(row)


# ----------------------------------------------------------------------------------- the real data sets


@pytest.mark.parametrize(("name", "count"), [("gsm8k", 1319), ("math", 1000)])
def test_every_gold_answer_round_trips(name: str, count: int) -> None:
    rows = _rows(name)
    assert len(rows) == count
    failures = []
    for i, row in enumerate(rows):
        gold = gold_answer(row)
        predicted = extract_answer(f"The final answer is \\boxed{{{gold}}}.")
        if predicted != gold or not is_equivalent(predicted, gold):
            failures.append((i, gold, predicted))
    assert failures == []


def test_gsm8k_gold_answers_are_plain_numbers() -> None:
    for row in _rows("gsm8k"):
        gold = gold_answer(row)
        assert "," not in gold and grading._as_number(gold) is not None, gold


def test_math_gold_answers_self_equivalent_through_math_verify() -> None:
    sample = [gold_answer(row) for row in _rows("math")[::20]]
    assert len(sample) == 50
    failures = [gold for gold in sample if not grading._verify_isolated(gold, gold)]
    assert failures == []


# ----------------------------------------------------------------------------------------- is_equivalent

EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("1,234", "1234"),
    ("1234", "1,234"),
    ("\\dfrac{3}{4}", "\\frac34"),
    ("5\\text{ cm}", "5"),
    ("\\$18", "18"),
    ("$18$", "18"),
    ("18.00", "18"),
    ("50\\%", "50"),
    ("x=3", "3"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("-\\frac{1}{2}", "-0.5"),
    ("\\{2, 1\\}", "\\{1, 2\\}"),
    ("\\text{(C)}", "\\text{(C)}"),
]
NOT_EQUIVALENT = [
    ("3", "4"),
    ("0.5", "\\frac{1}{3}"),
    ("12", "1,2"),
    ("1,2", "12"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("18.5", "18"),
    ("", "3"),
    ("\\sqrt{2}", "2"),
    ("12345678901234567", "12345678901234568"),  # exact: no float rounding on integers
]


@pytest.mark.parametrize(("predicted", "gold"), EQUIVALENT)
def test_equivalent(predicted: str, gold: str) -> None:
    assert is_equivalent(predicted, gold)


@pytest.mark.parametrize(("predicted", "gold"), NOT_EQUIVALENT)
def test_not_equivalent(predicted: str, gold: str) -> None:
    assert not is_equivalent(predicted, gold)


def test_none_is_not_equivalent() -> None:
    assert not is_equivalent(None, "3")


@pytest.mark.parametrize(("predicted", "gold"), EQUIVALENT)
def test_fast_paths_agree_with_math_verify(predicted: str, gold: str) -> None:
    assert grading._verify_isolated(predicted, gold)


@pytest.mark.parametrize(("predicted", "gold"), NOT_EQUIVALENT[:6])
def test_fast_paths_agree_with_math_verify_not_equivalent(predicted: str, gold: str) -> None:
    assert not grading._verify_isolated(predicted, gold)


def test_long_input_only_string_equal() -> None:
    long = "1+" * grading.MAX_INPUT_CHARS + "1"
    assert is_equivalent(long, long)
    assert not is_equivalent(long, str(grading.MAX_INPUT_CHARS + 1))


def test_pathological_input_times_out_and_worker_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grading, "VERIFY_TIMEOUT_S", 2.0)
    assert grading._verify_isolated("1", "1")  # start the worker outside the timed part
    worker = grading._worker
    assert worker is not None

    start = time.monotonic()
    assert not is_equivalent("9^{9^{9^{9^{9}}}}", "1")
    elapsed = time.monotonic() - start
    assert elapsed < 5.0

    assert grading._worker is None  # the worker timed out and was replaced ...
    assert worker.process.wait(timeout=60) != 0  # ... and killed (generous: CI machines can be heavily loaded)
    assert is_equivalent("x=3", "3")  # and a fresh worker answers


def test_dead_worker_is_replaced() -> None:
    assert grading._verify_isolated("1", "1")
    worker = grading._worker
    assert worker is not None
    worker.process.kill()
    worker.process.wait(timeout=60)
    # the call that finds it dead is judged not equivalent or restarts it; the next one certainly answers
    grading._verify_isolated("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")
    assert grading._verify_isolated("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")
    assert grading._worker is not worker


# A case the fast paths cannot decide, so it reaches the math-verify worker process.
NEEDS_WORKER = ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")

PLAIN_SCRIPT = """
from cpl import grading
from cpl.grading import is_equivalent

print(is_equivalent("1/2", "0.5"))
print(grading._verify_isolated("1/2", "0.5"))
print(is_equivalent({predicted!r}, {gold!r}))
"""


def test_plain_script_without_main_guard(tmp_path: Path) -> None:
    script = tmp_path / "grade.py"
    script.write_text(PLAIN_SCRIPT.format(predicted=NEEDS_WORKER[0], gold=NEEDS_WORKER[1]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"]


def _grade_into(answers: Any, predicted: str, gold: str) -> None:
    answers.put((multiprocessing.current_process().daemon, is_equivalent(predicted, gold)))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_daemonic_process(start_method: str) -> None:
    context = multiprocessing.get_context(start_method)
    answers = context.Queue()
    child = context.Process(target=_grade_into, args=(answers, *NEEDS_WORKER), daemon=True)
    child.start()
    try:
        assert answers.get(timeout=300) == (True, True)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def test_inside_an_asyncio_loop() -> None:
    async def grade() -> list[bool]:
        blocking = is_equivalent(*NEEDS_WORKER)
        threaded = await asyncio.gather(
            *(asyncio.to_thread(is_equivalent, p, g) for p, g in [NEEDS_WORKER, ("\\sqrt{2}", "2")])
        )
        return [blocking, *threaded]

    assert asyncio.run(grade()) == [True, True, False]


def test_works_from_non_main_threads() -> None:
    cases = [(p, g, True) for p, g in EQUIVALENT] + [(p, g, False) for p, g in NOT_EQUIVALENT]
    with ThreadPoolExecutor(max_workers=8) as threads:
        results = list(threads.map(lambda case: is_equivalent(case[0], case[1]), cases))
    assert results == [expected for _, _, expected in cases]

    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(is_equivalent(*NEEDS_WORKER)))
    thread.start()
    thread.join(timeout=60)
    assert seen == [True]
