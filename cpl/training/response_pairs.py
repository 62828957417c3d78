"""Response-level preference pairs for the DPO baseline: correct vs wrong full paths of one tree.

The DPO baseline trains on whole responses instead of sibling steps. From a finished tree, every graded
root-to-solution path is a full response; a pair is (a correct path, a wrong path) of the same question, with
the prompt that SFT uses (``render_prompt(question, [], format, few_shot=config.few_shot)``) and the responses
rendered as in ``sft.jsonl``. All combinations can be many (tens of correct x tens of wrong paths per tree in
round 1), so at most ``max_pairs`` per tree are kept, sampled with a seed tied to the tree id (as
:func:`cpl.pairs.sft_examples`).

To build the file: ``export_response_pairs(trees, out / "response_pairs.jsonl")``, then
``cpl train dpo --model SFT_DIR --data out/response_pairs.jsonl --out DIR``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from cpl.formats import PromptFormat, StepKind, render_prompt, render_response
from cpl.tree import Node, Tree


class ResponsePair(BaseModel):
    """A correct and a wrong full response to one question (``prompt + chosen`` is an SFT-style text)."""

    prompt: str
    chosen: str
    rejected: str
    tree_id: str
    chosen_id: int
    rejected_id: int
    format: PromptFormat


def _graded_solutions(tree: Tree, correct: bool) -> list[Node]:
    return [n for n in tree.nodes if n.kind is StepKind.SOLUTION and n.correct is correct]


def response_pairs(tree: Tree, *, max_pairs: int | None = 4, seed: int = 0) -> list[ResponsePair]:
    """(correct path, wrong path) pairs of ``tree``; at most ``max_pairs`` (None: all), seeded per tree.

    Only graded solution steps count (``correct`` True or False); a tree without both kinds gives no pairs.
    """
    good, bad = _graded_solutions(tree, True), _graded_solutions(tree, False)
    combos = list(itertools.product(good, bad))
    if max_pairs is not None and len(combos) > max_pairs:
        rng = random.Random(f"response-pairs:{seed}:{tree.id}")
        combos = sorted(rng.sample(combos, max_pairs), key=lambda c: (c[0].id, c[1].id))
    fmt = tree.config.format
    prompt = render_prompt(tree.question, [], fmt, few_shot=tree.config.few_shot)
    return [
        ResponsePair(
            prompt=prompt,
            chosen=render_response(tree.state(w).as_steps(), fmt),
            rejected=render_response(tree.state(lose).as_steps(), fmt),
            tree_id=tree.id,
            chosen_id=w.id,
            rejected_id=lose.id,
            format=fmt,
        )
        for w, lose in combos
    ]


def export_response_pairs(trees: Iterable[Tree], path: Path, *, max_pairs: int | None = 4, seed: int = 0) -> int:
    """Write the response pairs of ``trees`` as JSONL; returns the number of rows."""
    from cpl.pairs import write_jsonl

    return write_jsonl(Path(path), (p for t in trees for p in response_pairs(t, max_pairs=max_pairs, seed=seed)))
