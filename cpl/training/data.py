"""Reading the exported JSONL datasets and turning them into token ids.

The trainer reads only the fields it needs from each row (docs/data-formats.md lists the rest, which is
provenance): ``prompt``/``response`` from ``sft.jsonl``; ``prompt``/``chosen``/``rejected`` (+ ``chosen_value``,
``rejected_value``, ``kind`` for Step-APO) from the pair files; ``text``/``value`` from ``value.jsonl``.

Token boundaries (docs/architecture.md): the prompt is tokenised alone, *with* the tokenizer's special tokens
(``<s>`` in front, as vLLM tokenises prompts), and the completion (response, step) alone, *without* special
tokens; the ids are concatenated. So a step's log-prob is over the same tokens whatever the prompt ends with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cpl.formats import StepKind
from cpl.losses import scale_solution_values


class TrainingInputError(ValueError):
    """Bad user input: a missing file, an empty dataset, a malformed row, a bad model directory."""


# --- rows ------------------------------------------------------------------------------------------------


class _Row(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SFTRow(_Row):
    """What SFT reads from an ``SFTExample`` row: the loss is on ``response`` (+ eos) only."""

    prompt: str
    response: str = Field(min_length=1)


class PairRow(_Row):
    """What DPO-style jobs read from a pair row (``PreferencePair`` or a plain {prompt, chosen, rejected})."""

    prompt: str
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)


class StepPairRow(PairRow):
    """What Step-APO reads from a ``PreferencePair`` row: the values and whether it is a solution-step pair."""

    chosen_value: float
    rejected_value: float
    kind: StepKind


class ValueRow(_Row):
    """What value training reads from a ``ValueExample`` row."""

    text: str = Field(min_length=1)
    value: float = Field(ge=-1.0, le=1.0)


RowT = TypeVar("RowT", bound=_Row)


@dataclass(frozen=True)
class DataFile:
    """A dataset file as recorded in a checkpoint's manifest."""

    path: str
    sha256: str
    rows: int

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256, "rows": self.rows}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_rows(paths: Sequence[Path], row_type: type[RowT]) -> tuple[list[RowT], list[DataFile]]:
    """Read and validate every row of ``paths``; raise :class:`TrainingInputError` with file:line on problems.

    Blank lines are skipped. A file without rows is fine as long as the files together have some (a round may
    have no solution pairs); no rows at all is an error.
    """
    if not paths:
        raise TrainingInputError("no --data file given")
    rows: list[RowT] = []
    files: list[DataFile] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise TrainingInputError(f"{path}: no such file")
        count = 0
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrainingInputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(data, dict):
                    raise TrainingInputError(f"{path}:{lineno}: expected a JSON object, got {type(data).__name__}")
                try:
                    rows.append(row_type.model_validate(data))
                except ValidationError as exc:
                    raise TrainingInputError(f"{path}:{lineno}: malformed row: {_first_error(exc)}") from exc
                count += 1
        files.append(DataFile(path=str(path.resolve()), sha256=file_sha256(path), rows=count))
    if not rows:
        names = ", ".join(str(p) for p in paths)
        raise TrainingInputError(f"empty dataset: no rows in {names}")
    return rows, files


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err.get("loc", ())) or "row"
    extra = f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {err.get('msg')}{extra}"


# --- tokenisation ----------------------------------------------------------------------------------------


@dataclass
class TokenizedSFT:
    input_ids: list[int]
    """prompt ids (with special tokens) + response ids (without) + eos"""
    prompt_len: int

    @property
    def num_target_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_value: float
    rejected_value: float

    @property
    def num_tokens(self) -> int:
        """Tokens of both sequences, prompt counted twice (the work a plain DPO implementation does)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TokenizedValue:
    input_ids: list[int]
    value: float


class _PromptCache:
    """Prompts repeat a lot (every pair under one parent, every SFT response of a question): tokenise once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, texts: Iterable[str]) -> list[list[int]]:
        texts = list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            for text, ids in zip(missing, self.tokenizer(missing).input_ids, strict=True):
                self.cache[text] = list(ids)
        return [self.cache[t] for t in texts]


def _completions(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]


def tokenize_sft(tokenizer, rows: Sequence[SFTRow], max_length: int) -> tuple[list[TokenizedSFT], int]:
    """Prompt + response + eos; returns the examples and how many were dropped for exceeding ``max_length``."""
    prompts = _PromptCache(tokenizer)([r.prompt for r in rows])
    responses = _completions(tokenizer, [r.response for r in rows])
    out, dropped = [], 0
    for p, r in zip(prompts, responses, strict=True):
        ids = p + r + [tokenizer.eos_token_id]
        if len(ids) > max_length:
            dropped += 1
            continue
        out.append(TokenizedSFT(input_ids=ids, prompt_len=len(p)))
    return out, dropped


def tokenize_pairs(
    tokenizer,
    rows: Sequence[PairRow],
    max_length: int,
    *,
    append_eos: bool,
    solution_value_scale: float | None,
) -> tuple[list[TokenizedPair], int]:
    """Tokenise pairs; ``solution_value_scale`` (Step-APO) scales the values of solution-step pairs.

    With ``solution_value_scale=None`` the values are zero (DPO baselines). A pair whose prompt + longer
    completion exceeds ``max_length`` is dropped and counted.
    """
    prompts = _PromptCache(tokenizer)([r.prompt for r in rows])
    chosen = _completions(tokenizer, [r.chosen for r in rows])
    rejected = _completions(tokenizer, [r.rejected for r in rows])
    eos = [tokenizer.eos_token_id] if append_eos else []
    out, dropped = [], 0
    for row, p, c, r in zip(rows, prompts, chosen, rejected, strict=True):
        c, r = c + eos, r + eos
        if len(p) + max(len(c), len(r)) > max_length:
            dropped += 1
            continue
        vw = vl = 0.0
        if solution_value_scale is not None and isinstance(row, StepPairRow):
            values = torch.tensor([row.chosen_value, row.rejected_value], dtype=torch.float64)
            is_solution = torch.tensor(row.kind is StepKind.SOLUTION)
            vw, vl = scale_solution_values(values, is_solution, solution_value_scale).tolist()
        out.append(TokenizedPair(prompt_ids=p, chosen_ids=c, rejected_ids=r, chosen_value=vw, rejected_value=vl))
    return out, dropped


def tokenize_values(tokenizer, rows: Sequence[ValueRow], max_length: int) -> tuple[list[TokenizedValue], int]:
    """Value texts are tokenised like prompts (with ``<s>``), as the value server tokenises them."""
    ids = _PromptCache(tokenizer)([r.text for r in rows])
    out, dropped = [], 0
    for row, x in zip(rows, ids, strict=True):
        if len(x) > max_length:
            dropped += 1
            continue
        out.append(TokenizedValue(input_ids=x, value=row.value))
    return out, dropped
