"""Problems to search: GSM8K or MATH JSONL rows, or one question given on the command line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from cpl.grading import gold_answer


class Problem(BaseModel):
    id: str
    question: str
    gold: str | None = None


class ProblemFileError(ValueError):
    """A problems file that cannot be read; the message names the file and line."""


def problem_id(question: str) -> str:
    """A stable id from the question text, so re-running a search over the same file resumes its trees."""
    return hashlib.sha1(question.encode()).hexdigest()[:12]


def load_problems(path: Path, *, limit: int | None = None, max_question_chars: int = 4000) -> list[Problem]:
    """Read GSM8K rows (``question``, ``answer`` ending in ``#### n``) or MATH rows (``problem``, ``solution``)."""
    return list(_iter_problems(path, limit, max_question_chars))


def _iter_problems(path: Path, limit: int | None, max_chars: int) -> Iterator[Problem]:
    if not path.is_file():
        raise ProblemFileError(f"{path}: no such file")
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(seen) >= limit:
                return
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProblemFileError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ProblemFileError(f"{path}:{lineno}: expected a JSON object")
            question = row.get("question") or row.get("problem")
            if not isinstance(question, str) or not question.strip():
                raise ProblemFileError(f"{path}:{lineno}: no 'question' (GSM8K) or 'problem' (MATH) field")
            if len(question) > max_chars:
                raise ProblemFileError(f"{path}:{lineno}: question longer than {max_chars} characters")
            try:
                gold = gold_answer(row)
            except ValueError as exc:
                raise ProblemFileError(f"{path}:{lineno}: {exc}") from exc
            pid = str(row.get("id") or problem_id(question))
            if pid in seen:
                continue  # the same question twice would overwrite its own tree
            seen.add(pid)
            yield Problem(id=pid, question=question, gold=gold)
