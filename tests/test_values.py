"""The value transform exists once (`cpl.values`) and every consumer uses it."""

from __future__ import annotations

import math
import re
import tokenize
from pathlib import Path

import torch

from cpl.values import clamp_value, value_from_logit

REPO = Path(__file__).resolve().parents[1]


def test_value_from_logit_is_tanh_clamped():
    assert value_from_logit(0.0) == 0.0
    assert math.isclose(value_from_logit(0.5), math.tanh(0.5))
    assert value_from_logit(1e6) == 1.0 and value_from_logit(-1e6) == -1.0
    assert value_from_logit(3) == math.tanh(3)  # ints are numbers too
    t = value_from_logit(torch.tensor([100.0, -100.0, 0.25]))
    assert torch.allclose(t, torch.tensor([1.0, -1.0, math.tanh(0.25)]))


def test_clamp_value():
    assert clamp_value(1.5) == 1.0 and clamp_value(-7.0) == -1.0 and clamp_value(0.3) == 0.3


def code_lines(path: Path) -> dict[int, str]:
    """The file's code without strings and comments, line by line."""
    lines: dict[int, str] = {}
    with path.open("rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type not in (tokenize.STRING, tokenize.COMMENT, tokenize.ENCODING):
                lines[tok.start[0]] = lines.get(tok.start[0], "") + tok.string
    return lines


def test_the_transform_is_written_once():
    """No other tanh or [-1, 1] clamp in the library or the services: they call `cpl.values`."""
    pattern = re.compile(r"\btanh\(|max\(-1(\.0)?,|min\(1(\.0)?,|clamp\(-1")
    offenders = []
    for path in [*REPO.glob("cpl/**/*.py"), *REPO.glob("services/**/*.py")]:
        if path == REPO / "cpl" / "values.py":
            continue
        for number, code in code_lines(path).items():
            if pattern.search(code):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {code}")
    assert offenders == []
