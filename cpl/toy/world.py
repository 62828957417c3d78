"""The toy reasoning world: seeded word problems whose difficulty lies in the *choice* of plan steps.

Every problem is small enough for a tiny planner model trained on CPU (single-digit givens, results up to
20, digit-level tokens), and is built so that several plausible plans exist and only some are right.

Families
--------
In-domain (the planner is trained on it):

* ``arith`` — GSM8K-style comparison chains, 2-6 steps. One person's count is given; every other person's
  count is stated relative to someone already known ("Ben has 3 more apples than Ann", "twice as many",
  "half as many"); the question asks for one count, a total of two, or a difference of two. Some people are
  distractors (nobody needs them). The difficulty is the *inverted* comparison: "Ann has 3 more apples than
  Ben" when Ann is the one known means Ben has 3 *fewer*. The noisy demonstrator of the training corpus
  misreads such a sentence more often than not, so the base model tends to pick the wrong plan step there,
  and a search that samples plans has a better step to find.

Out-of-domain, sharing the in-domain grammar and trap on another surface (a minority of the planner's
pre-training, never CPL's training problems):

* ``heights`` — the same chains about heights ("Ben's tree is 3 feet taller than Ann's", "half as tall as").
* ``money`` — the same chains about earnings ("Ben earns 3 dollars less than Ann", "twice as much as").

Out-of-domain (never trained on; another surface and another structure; ``units`` and ``sequence`` are the
negative controls, `CONTROLS`):

* ``units`` — convert big units to small ones (yards -> feet, weeks -> days, ...), then add and take away.
* ``ages`` — ages stated by "older / younger than" (inversions too), then a logic step: how much older the
  oldest is than the youngest, or one person's age.
* ``sequence`` — arithmetic sequences: the n-th term is ``first + (n - 1) * difference`` (the trap: n steps
  instead of n - 1).

Each problem carries its family, the question, the integer answer, a Python-evaluable ``expression`` that
yields the answer, and a ``spec`` (the structure its solutions are rendered from). `reference_solution`
writes the right plan and solution steps in the step convention of :mod:`cpl.formats`; `flawed_solution`
writes a wrong plan choice (``"plan"``) or the right plan with an arithmetic slip (``"slip"``), always with a
wrong final answer; `demonstrator_solution` is the noisy annotator whose solutions make up the training corpus.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cpl.formats import PromptFormat, Step, StepKind, plan_text, solution_text

IN_DOMAIN: tuple[str, ...] = ("arith",)
SHARED_GRAMMAR: tuple[str, ...] = ("heights", "money")
"""Out-of-domain families with the in-domain plan grammar and trap on another surface: a minority of the planner's
pre-training, never in CPL's training problems, so what CPL teaches about the critical step can transfer."""
CONTROLS: tuple[str, ...] = ("units", "sequence")
"""Out-of-domain negative controls: operations the planner never saw, which arithmetic-plan training cannot move."""
OUT_OF_DOMAIN: tuple[str, ...] = (*SHARED_GRAMMAR, "ages", *CONTROLS)
ARITH_GRAMMAR: tuple[str, ...] = (*IN_DOMAIN, *SHARED_GRAMMAR)
"""Families written in the comparison-chain grammar (`demonstrator_solution` writes all of them)."""
FAMILIES: tuple[str, ...] = IN_DOMAIN + OUT_OF_DOMAIN
FLAW_KINDS: tuple[str, ...] = ("plan", "slip")
SPLITS: tuple[str, ...] = ("train", "test")

NAMES: tuple[str, ...] = ("Ann", "Ben", "Cara", "Dev", "Emma", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kim", "Leo")
ITEMS: tuple[str, ...] = (
    "apples",
    "books",
    "coins",
    "pencils",
    "stickers",
    "marbles",
    "shells",
    "cards",
    "stamps",
    "toys",
)

MAX_VALUE = 20
"""Largest number a correct solution of the in-domain family ever writes."""
MAX_FLAWED_VALUE = 60
"""Largest number a flawed solution may write (a misread "half" doubles instead)."""

# The noisy demonstrator that writes the training corpus (see `demonstrator_solution`).
TRAP_RATE = 0.6
"""Probability that the demonstrator misreads an inverted comparison it needs (the critical plan step)."""
WRONG_OP_RATE = 0.06
"""Probability of one other wrong operation in the plan."""
WRONG_PERSON_RATE = 0.04
"""Probability of combining the wrong person in a total/difference question (when a distractor exists)."""
SLIP_RATE = 0.06
"""Probability of an arithmetic slip (right plan, one wrong result)."""
DETOUR_RATE = 0.1
"""Probability of computing an unneeded distractor first (a longer plan that is still right)."""


@dataclass(frozen=True)
class ToyProblem:
    family: str
    question: str
    answer: int
    expression: str
    """A Python expression (integers, + - * /, parentheses, max/min) whose value is the answer."""
    spec: Mapping[str, Any] = field(repr=False, hash=False)
    """The structure the question and the solutions are rendered from (JSON-able, family-specific)."""

    @property
    def gold(self) -> str:
        return str(self.answer)


# --------------------------------------------------------------------------------------------- helpers

_OPS: dict[str, Callable[[int, int], int | None]] = {
    "add": lambda v, k: v + k,
    "sub": lambda v, k: v - k,
    "mul": lambda v, k: v * k,
    "div": lambda v, k: v // k if v % k == 0 else None,
}
_SYMBOL = {"add": "+", "sub": "-", "mul": "\\times ", "div": "/"}
_PY_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_FLIP = {"add": "sub", "sub": "add", "mul": "div", "div": "mul"}


def _apply(op: str, v: int, k: int) -> int | None:
    return _OPS[op](v, k)


def _math(v: int, op: str, k: int, r: int) -> str:
    return f"${v}{_SYMBOL[op]}{k}={r}$"


def _ok(value: int | None, limit: int) -> bool:
    return value is not None and 0 < value <= limit


class _Invalid(Exception):
    """A solution path wrote a number outside the world's range (a rejected problem or flaw)."""


@dataclass
class _Trace:
    """A rendered solution: plan texts, implementation lines, final value."""

    plans: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    value: int = 0

    def steps(self, fmt: PromptFormat) -> list[Step]:
        steps = [Step(StepKind.PLAN, plan_text(i, p)) for i, p in enumerate(self.plans, start=1)]
        steps.append(Step(StepKind.SOLUTION, solution_text(self.lines, str(self.value), fmt)))
        return steps


class _Calc:
    """Runs one solution path: every computed line may carry a slip, every number is range-checked."""

    def __init__(self, choice: Mapping[str, Any], limit: int):
        self.trace = _Trace()
        self.slip: tuple[int, int] | None = tuple(choice["slip"]) if choice.get("slip") else None  # type: ignore[assignment]
        self.limit = limit

    def step(self, plan: str, op: str, v: int, k: int, line: Callable[[str, int], str]) -> int:
        r = _apply(op, v, k)
        if r is None:
            raise _Invalid
        if self.slip and self.slip[0] == len(self.trace.lines):
            r += self.slip[1]
        if not _ok(r, self.limit):
            raise _Invalid
        self.trace.plans.append(plan)
        self.trace.lines.append(line(_math(v, op, k, r), r))
        return r


# --------------------------------------------------- the comparison-chain grammar (arith, heights, money)
#
# spec: surface (absent for arith), item (a height's unit follows from its item), people (sentence order), given
# {who, value}, facts [{new, known, op, k, inverse}] in sentence order, needed (names the query depends on, in
# sentence order), query {kind, x, y}.
#   op is the *true* operation that computes `new` from `known`: add/sub k, mul/div by k (2 or 3).
#   inverse: the sentence is written from the known person's side ("Ann has 3 more apples than Ben", Ann known).
# A person may be compared with anyone stated before, so the chain is a tree: the two people of a total or a
# difference can sit on independent branches, which a plan may compute in either order.
#
# Three surfaces share this grammar: `arith` (counts of items, the in-domain family), `heights` (taller/shorter)
# and `money` (earns more/less). Plan steps and solution lines have several wordings (`PLAN_WORDINGS`,
# `LINE_WORDINGS`): the reference solution always writes the first, the demonstrator picks one at random for
# each step, so a planner trained on its corpus has real choices of wording besides the choice that matters
# (the reading of an inverted comparison).

_WORD_OF = {"add": "more", "sub": "fewer", "mul": "times", "div": "part"}
_INVERSE_WORD_OF = {"add": "fewer", "sub": "more", "mul": "part", "div": "times"}
_NAIVE_OP = {"more": "add", "fewer": "sub", "times": "mul", "part": "div"}
_TIMES_WORD = {2: "twice", 3: "three times"}
_PART_WORD = {2: "half", 3: "a third"}

_HEIGHT_ITEMS = {"tree": ("trees", "feet"), "plant": ("plants", "inches"), "tower": ("towers", "blocks")}
_MONEY_ITEMS = ("dollars", "euros", "pounds")


@dataclass(frozen=True)
class _Surface:
    """How one family of the comparison-chain grammar says things (``{item}``, ``{items}``, ``{unit}`` filled from
    the spec)."""

    given: str  # {s} {v}
    more: str  # {s} {k} {o}; also "fewer", "times", "part" below ({t}: twice, half, ...)
    fewer: str
    times: str
    noun: str  # a person's quantity in a plan step: {n}
    single: str  # questions: {x} {y}
    total: str
    diff: str
    goal_total: str
    goal_diff: str
    line: str  # solution lines: {n} {m}; {x} {y} {m}
    line_total: str
    line_diff: str


_SURFACES: dict[str, _Surface] = {
    "arith": _Surface(
        given="{s} has {v} {item}.",
        more="{s} has {k} more {item} than {o}.",
        fewer="{s} has {k} fewer {item} than {o}.",
        times="{s} has {t} as many {item} as {o}.",
        noun="{n}'s {item}",
        single="How many {item} does {x} have?",
        total="How many {item} do {x} and {y} have together?",
        diff="How many more {item} does {x} have than {y}?",
        goal_total="how many they have together",
        goal_diff="how many more {x} has",
        line="{n} has {m} {item}.",
        line_total="Together {x} and {y} have {m} {item}.",
        line_diff="{x} has {m} more {item} than {y}.",
    ),
    "heights": _Surface(
        given="{s}'s {item} is {v} {unit} tall.",
        more="{s}'s {item} is {k} {unit} taller than {o}'s.",
        fewer="{s}'s {item} is {k} {unit} shorter than {o}'s.",
        times="{s}'s {item} is {t} as tall as {o}'s.",
        noun="the height of {n}'s {item}",
        single="How tall is {x}'s {item}?",
        total="How tall are {x}'s and {y}'s {items} together?",
        diff="How much taller is {x}'s {item} than {y}'s?",
        goal_total="their height together",
        goal_diff="how much taller {x}'s {item} is",
        line="{n}'s {item} is {m} {unit} tall.",
        line_total="Together {x}'s and {y}'s {items} are {m} {unit} tall.",
        line_diff="{x}'s {item} is {m} {unit} taller than {y}'s.",
    ),
    "money": _Surface(
        given="{s} earns {v} {item}.",
        more="{s} earns {k} {item} more than {o}.",
        fewer="{s} earns {k} {item} less than {o}.",
        times="{s} earns {t} as much as {o}.",
        noun="{n}'s earnings",
        single="How many {item} does {x} earn?",
        total="How many {item} do {x} and {y} earn together?",
        diff="How many more {item} does {x} earn than {y}?",
        goal_total="how much they earn together",
        goal_diff="how much more {x} earns",
        line="{n} earns {m} {item}.",
        line_total="Together {x} and {y} earn {m} {item}.",
        line_diff="{x} earns {m} more {item} than {y}.",
    ),
}

# How a plan step says "compute new from known": (how, as a gerund phrase on K), (imperative on K), (imperative
# on "it"), keyed by (op, k) with k 0 for add/sub.
_HOW: dict[tuple[str, int], tuple[str, str, str]] = {
    ("add", 0): ("adding the difference to {K}", "Add the difference to {K}", "add the difference"),
    ("sub", 0): ("subtracting the difference from {K}", "Subtract the difference from {K}", "subtract the difference"),
    ("mul", 2): ("doubling {K}", "Double {K}", "double it"),
    ("mul", 3): ("tripling {K}", "Triple {K}", "triple it"),
    ("div", 2): ("halving {K}", "Halve {K}", "halve it"),
    ("div", 3): ("taking a third of {K}", "Take a third of {K}", "take a third of it"),
}
_PLAN_TEMPLATES = (
    "Find {N} by {how}.",
    "{imperative} to get {N}.",
    "Work out {N} by {how}.",
    "Use {K} to find {N}: {short}.",
)
_COMBINE_TEMPLATES = {
    "add": ("Add {X} and {Y} to find {goal}.", "Find {goal} by adding {X} and {Y}.", "Put {X} and {Y} together."),
    "sub": (
        "Subtract {Y} from {X} to find {goal}.",
        "Find {goal} by subtracting {Y} from {X}.",
        "Take {Y} away from {X}.",
    ),
}
_LINE_PREFIXES = ("", "So ", "Then ")
PLAN_WORDINGS = len(_PLAN_TEMPLATES)
"""Wordings of a plan step that computes one person from another (the demonstrator uses each equally often)."""
LINE_WORDINGS = len(_LINE_PREFIXES)


def _surface(spec: Mapping[str, Any]) -> _Surface:
    return _SURFACES[spec.get("surface", "arith")]


def _fill(template: str, spec: Mapping[str, Any], **names: Any) -> str:
    item = spec["item"]
    extra = {"items": _HEIGHT_ITEMS[item][0], "unit": _HEIGHT_ITEMS[item][1]} if item in _HEIGHT_ITEMS else {}
    return template.format(item=item, **extra, **names)


def _fact_word(fact: Mapping[str, Any]) -> str:
    return _INVERSE_WORD_OF[fact["op"]] if fact["inverse"] else _WORD_OF[fact["op"]]


def _arith_sentence(fact: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    surface = _surface(spec)
    subject, obj = (fact["known"], fact["new"]) if fact["inverse"] else (fact["new"], fact["known"])
    word, k = _fact_word(fact), fact["k"]
    if word in ("more", "fewer"):
        return _fill(getattr(surface, word), spec, s=subject, k=k, o=obj)
    t = _TIMES_WORD[k] if word == "times" else _PART_WORD[k]
    return _fill(surface.times, spec, s=subject, t=t, o=obj)


def _arith_question(spec: Mapping[str, Any]) -> str:
    surface = _surface(spec)
    given = spec["given"]
    sentences = [_fill(surface.given, spec, s=given["who"], v=given["value"])]
    sentences += [_arith_sentence(f, spec) for f in spec["facts"]]
    q = spec["query"]
    sentences.append(_fill(getattr(surface, q["kind"]), spec, x=q["x"], y=q.get("y")))
    return " ".join(sentences)


def _arith_plan(spec: Mapping[str, Any], new: str, known: str, op: str, k: int, wording: int) -> str:
    noun = _surface(spec).noun
    big_n, big_k = _fill(noun, spec, n=new), _fill(noun, spec, n=known)
    how, imperative, short = (t.format(K=big_k) for t in _HOW[(op, k if op in ("mul", "div") else 0)])
    return _PLAN_TEMPLATES[wording].format(N=big_n, K=big_k, how=how, imperative=imperative, short=short)


def _arith_goal(spec: Mapping[str, Any]) -> str:
    q, surface = spec["query"], _surface(spec)
    return _fill(surface.goal_total if q["kind"] == "total" else surface.goal_diff, spec, x=q["x"])


class _Style:
    """The demonstrator's free choices that do not change the answer: each step's wording and the order of
    independent steps. Without a seed: the first wording and sentence order (the reference solution)."""

    def __init__(self, seed: int | None):
        self.rng = random.Random(seed) if seed is not None else None

    def wording(self, n: int) -> int:
        return self.rng.randrange(n) if self.rng else 0

    def order(self, names: list[str], facts: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """A topological order of ``names`` (each after the person it is computed from): sentence order, or a
        random one."""
        if self.rng is None:
            return names
        todo, out = list(names), []
        while todo:
            ready = [n for n in todo if facts[n]["known"] not in todo]
            pick = self.rng.choice(ready)
            todo.remove(pick)
            out.append(pick)
        return out


def _arith_solve(spec: Mapping[str, Any], choice: Mapping[str, Any], limit: int = MAX_VALUE) -> _Trace:
    """One solution path. ``choice`` keys: ``misread`` (names whose inverted sentence is read naively),
    ``flip`` (a name, or ``"query"``, whose operation is flipped), ``swap`` (a distractor used in place of the
    query's second person), ``detour`` (a distractor computed although unneeded), ``slip`` (line, delta),
    ``style`` (a seed for the wordings and the order of independent steps; none: the reference's)."""
    surface = _surface(spec)
    style = _Style(choice.get("style"))
    facts = {f["new"]: f for f in spec["facts"]}
    misread, flip = set(choice.get("misread", ())), choice.get("flip")
    swap, detour = choice.get("swap"), choice.get("detour")
    q = spec["query"]
    x, y = q["x"], q.get("y")
    if swap:
        y = swap

    order = list(spec["needed"])
    extra = [p for p in (swap, detour) if p]
    for p in extra:  # compute the chain down to p's anchor, then p, in sentence order
        chain = []
        while p not in order and p != spec["given"]["who"]:
            chain.append(p)
            p = facts[p]["known"]
        order = sorted(set(order) | set(chain), key=spec["people"].index)
    order = style.order(order, facts)

    calc = _Calc(choice, limit)
    values = {spec["given"]["who"]: spec["given"]["value"]}
    for name in order:
        f = facts[name]
        op = _NAIVE_OP[_fact_word(f)] if name in misread else f["op"]
        if flip == name:
            op = _FLIP[op]
        plan = _arith_plan(spec, name, f["known"], op, f["k"], style.wording(PLAN_WORDINGS))
        prefix = _LINE_PREFIXES[style.wording(LINE_WORDINGS)]

        def line(m: str, r: int, n: str = name, prefix: str = prefix) -> str:
            return prefix + _fill(surface.line, spec, n=n, m=m)

        values[name] = calc.step(plan, op, values[f["known"]], f["k"], line)
    if q["kind"] == "single":
        calc.trace.value = values[x]
        return calc.trace
    op = "add" if q["kind"] == "total" else "sub"
    if flip == "query":
        op = _FLIP[op]
    nouns = {"X": _fill(surface.noun, spec, n=x), "Y": _fill(surface.noun, spec, n=y)}
    plan = _COMBINE_TEMPLATES[op][style.wording(len(_COMBINE_TEMPLATES[op]))].format(**nouns, goal=_arith_goal(spec))
    template = surface.line_total if q["kind"] == "total" else surface.line_diff
    prefix = _LINE_PREFIXES[style.wording(LINE_WORDINGS)]

    def combine_line(m: str, r: int) -> str:
        return prefix + _fill(template, spec, x=x, y=y, m=m)

    calc.trace.value = calc.step(plan, op, values[x], values[y], combine_line)
    return calc.trace


def _arith_expression(spec: Mapping[str, Any]) -> str:
    facts = {f["new"]: f for f in spec["facts"]}

    def expr(name: str) -> str:
        if name == spec["given"]["who"]:
            return str(spec["given"]["value"])
        f = facts[name]
        return f"({expr(f['known'])}{_PY_SYMBOL[f['op']]}{f['k']})"

    q = spec["query"]
    if q["kind"] == "single":
        return expr(q["x"])
    return f"{expr(q['x'])}{'+' if q['kind'] == 'total' else '-'}{expr(q['y'])}"


_STEP_WEIGHTS = {2: 25, 3: 30, 4: 22, 5: 13, 6: 10}
INVERSE_PROB = 0.35
"""Probability that a comparison sentence is written from the known person's side (the trap)."""
BRANCH_PROB = 0.3
"""Probability that a person is compared with an earlier person of the chain rather than the last one."""


def _arith_random_fact(rng: random.Random, new: str, known: str, known_value: int) -> dict[str, Any] | None:
    op = rng.choices(["add", "sub", "mul", "div"], weights=[35, 35, 15, 15])[0]
    k = rng.randint(1, 9) if op in ("add", "sub") else rng.choice([2, 2, 3])
    value = _apply(op, known_value, k)
    if not _ok(value, MAX_VALUE):
        return None
    inverse = rng.random() < INVERSE_PROB and not (op == "mul" and k == 3)  # never "K has a third as many as N"
    return {"new": new, "known": known, "op": op, "k": k, "inverse": inverse}


def _ancestors(name: str, facts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    out = []
    while name in facts:
        out.append(name)
        name = facts[name]["known"]
    return out


def _gen_chain(rng: random.Random, surface: str) -> dict[str, Any] | None:
    steps = rng.choices(list(_STEP_WEIGHTS), weights=list(_STEP_WEIGHTS.values()))[0]
    kind = rng.choices(["single", "total", "diff"], weights=[40, 30, 30])[0]
    chain_len = steps if kind == "single" else steps - 1
    n_distractors = rng.choices([0, 1, 2], weights=[40, 40, 20])[0]
    people = rng.sample(NAMES, 1 + chain_len + n_distractors)
    if surface == "heights":
        item = rng.choice(list(_HEIGHT_ITEMS))
    elif surface == "money":
        item = rng.choice(_MONEY_ITEMS)
    else:
        item = rng.choice(ITEMS)
    given = {"who": people[0], "value": rng.randint(1, 9)}
    values = {people[0]: given["value"]}
    chain = people[: 1 + chain_len]
    facts: list[dict[str, Any]] = []
    for i, new in enumerate(chain[1:], start=1):
        known = chain[i - 1] if i == 1 or rng.random() >= BRANCH_PROB else rng.choice(chain[: i - 1])
        fact = _arith_random_fact(rng, new, known, values[known])
        if fact is None:
            return None
        values[new] = _apply(fact["op"], values[known], fact["k"])  # type: ignore[assignment]
        facts.append(fact)
    for d in people[1 + chain_len :]:  # distractors hang off a random known person, placed after it
        anchor = rng.choice([p for p in people if p in values])
        fact = _arith_random_fact(rng, d, anchor, values[anchor])
        if fact is None:
            return None
        values[d] = _apply(fact["op"], values[anchor], fact["k"])  # type: ignore[assignment]
        after = 0 if anchor == people[0] else next(i for i, f in enumerate(facts) if f["new"] == anchor) + 1
        facts.insert(rng.randint(after, len(facts)), fact)
    order = [people[0]] + [f["new"] for f in facts]
    x = chain[-1]
    query: dict[str, Any] = {"kind": kind, "x": x}
    if kind != "single":
        y = rng.choice(chain[:-1])
        if kind == "diff":
            if values[x] == values[y]:
                return None
            if values[x] < values[y]:
                x, y = y, x
        elif values[x] + values[y] > MAX_VALUE:
            return None
        query = {"kind": kind, "x": x, "y": y}
    by_new = {f["new"]: f for f in facts}
    needed = set(_ancestors(query["x"], by_new)) | set(_ancestors(query.get("y", query["x"]), by_new))
    if len(needed) + (kind != "single") < 2:  # a branch left the query one step away: not a plan
        return None
    spec = {"item": item, "people": order, "given": given, "facts": facts}
    if surface != "arith":
        spec = {"surface": surface, **spec}
    return {**spec, "needed": [p for p in order if p in needed], "query": query}


def _arith_distractors(spec: Mapping[str, Any]) -> list[str]:
    needed = set(spec["needed"]) | {spec["given"]["who"]}
    return [p for p in spec["people"] if p not in needed]


def _arith_inverted(spec: Mapping[str, Any]) -> list[str]:
    return [f["new"] for f in spec["facts"] if f["inverse"] and f["new"] in spec["needed"]]


def inverted_comparisons(problem: ToyProblem) -> list[str]:
    """The people whose needed comparison is written from the known side (the critical plan steps)."""
    if problem.family in ARITH_GRAMMAR:
        return _arith_inverted(problem.spec)
    if problem.family == "ages":
        return [f["new"] for f in problem.spec["facts"] if f["inverse"]]
    return []


def _arith_plan_flaws(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    flaws: list[dict[str, Any]] = [{"misread": [p]} for p in _arith_inverted(spec)]
    flaws += [{"flip": p} for p in spec["needed"]]
    if spec["query"]["kind"] != "single":
        flaws.append({"flip": "query"})
        flaws += [{"swap": d} for d in _arith_distractors(spec)]
    return flaws


# ------------------------------------------------------------------------------- units (out-of-domain)

_UNITS = (
    # big (singular, plural), small (singular, plural), factor, stuff
    ("yard", "yards", "foot", "feet", 3, "ribbon"),
    ("week", "weeks", "day", "days", 7, "holiday"),
    ("gallon", "gallons", "quart", "quarts", 4, "juice"),
    ("pint", "pints", "cup", "cups", 2, "milk"),
)


def _gen_units(rng: random.Random) -> dict[str, Any] | None:
    unit = list(rng.choice(_UNITS))
    factor = unit[4]
    a = rng.randint(2, 4) if factor <= 4 else rng.randint(1, 3)
    kind = rng.choice(["use", "add", "both"])
    b = rng.randint(1, 9) if kind != "add" else 0
    c = rng.randint(1, 9) if kind != "use" else 0
    if a * factor + c - b <= 0 or a + factor - b <= 0:
        return None
    return {"name": rng.choice(NAMES), "unit": unit, "a": a, "b": b, "c": c, "kind": kind}


def _units_question(spec: Mapping[str, Any]) -> str:
    big, bigs, _, smalls, factor, stuff = spec["unit"]
    name, a, b, c = spec["name"], spec["a"], spec["b"], spec["c"]
    s = [f"{name} has {a} {bigs} of {stuff}.", f"One {big} is {factor} {smalls}."]
    if c:
        s.append(f"{name} gets {c} more {smalls} of {stuff}.")
    if b:
        s.append(f"{name} uses {b} {smalls} of {stuff}.")
    s.append(f"How many {smalls} of {stuff} does {name} have now?")
    return " ".join(s)


def _units_solve(spec: Mapping[str, Any], choice: Mapping[str, Any], limit: int = MAX_FLAWED_VALUE) -> _Trace:
    big, bigs, _, smalls, factor, stuff = spec["unit"]
    name, a, b, c = spec["name"], spec["a"], spec["b"], spec["c"]
    calc = _Calc(choice, limit)
    conv = "add" if choice.get("convert") == "add" else "mul"
    how = "multiplying by" if conv == "mul" else "adding"
    v = calc.step(
        f"Convert the {bigs} of {stuff} to {smalls} by {how} the {smalls} in one {big}.",
        conv,
        a,
        factor,
        lambda m, r: f"{a} {bigs} is {m} {smalls}.",
    )
    for amount, op, verb in ((c, "add", "gets"), (b, "sub", "uses")):
        if not amount:
            continue
        if choice.get("flip") == verb:
            op = _FLIP[op]
        word = "Add" if op == "add" else "Subtract"
        v = calc.step(
            f"{word} the {smalls} {name} {verb}.",
            op,
            v,
            amount,
            lambda m, r: f"{name} then has {m} {smalls}.",
        )
    calc.trace.value = v
    return calc.trace


def _units_expression(spec: Mapping[str, Any]) -> str:
    return f"{spec['a']}*{spec['unit'][4]}+{spec['c']}-{spec['b']}"


def _units_plan_flaws(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    flaws: list[dict[str, Any]] = [{"convert": "add"}]
    flaws += [{"flip": verb} for amount, verb in ((spec["c"], "gets"), (spec["b"], "uses")) if amount]
    return flaws


# -------------------------------------------------------------------------------- ages (out-of-domain)
#
# spec: people [a, b, c], given age of a, facts [{new, known, k, older, inverse}] for b and c, query.
# "older": new = known + k. The sentence compares subject to object; inverse puts the known person first.


def _gen_ages(rng: random.Random) -> dict[str, Any] | None:
    people = rng.sample(NAMES, 3)
    ages = {people[0]: rng.randint(5, 15)}
    facts = []
    for i, new in enumerate(people[1:], start=1):
        known = people[i - 1] if rng.random() < 0.7 else people[0]
        k = rng.randint(1, 9)
        older = rng.random() < 0.5
        ages[new] = ages[known] + (k if older else -k)
        if not 0 < ages[new] <= MAX_VALUE:
            return None
        facts.append({"new": new, "known": known, "k": k, "older": older, "inverse": rng.random() < 0.3})
    if len(set(ages.values())) < 3:
        return None
    query = rng.choice(["spread", "single"])
    return {"people": people, "given": ages[people[0]], "facts": facts, "query": query}


def _ages_sentence(f: Mapping[str, Any]) -> str:
    older = f["older"] != f["inverse"]
    subject, obj = (f["known"], f["new"]) if f["inverse"] else (f["new"], f["known"])
    return f"{subject} is {f['k']} years {'older' if older else 'younger'} than {obj}."


def _ages_question(spec: Mapping[str, Any]) -> str:
    people = spec["people"]
    s = [f"{people[0]} is {spec['given']} years old."] + [_ages_sentence(f) for f in spec["facts"]]
    if spec["query"] == "spread":
        s.append(f"How many years older is the oldest of {people[0]}, {people[1]} and {people[2]} than the youngest?")
    else:
        s.append(f"How old is {people[2]}?")
    return " ".join(s)


def _ages_solve(spec: Mapping[str, Any], choice: Mapping[str, Any], limit: int = MAX_FLAWED_VALUE) -> _Trace:
    people = spec["people"]
    ages = {people[0]: spec["given"]}
    calc = _Calc(choice, limit)
    for f in spec["facts"]:
        older = f["older"]
        if f["new"] in choice.get("misread", ()):  # reads the sentence's word as if it described the new person
            older = f["older"] != f["inverse"]
        if choice.get("flip") == f["new"]:
            older = not older
        op = "add" if older else "sub"
        how = "adding the difference to" if op == "add" else "subtracting the difference from"
        ages[f["new"]] = calc.step(
            f"Find {f['new']}'s age by {how} {f['known']}'s age.",
            op,
            ages[f["known"]],
            f["k"],
            lambda m, r, n=f["new"]: f"{n} is {m} years old.",
        )
    if spec["query"] == "single":
        calc.trace.value = ages[people[2]]
        return calc.trace
    ranked = sorted(people, key=lambda p: ages[p])
    hi, lo = ranked[-1], ranked[0]
    if choice.get("spread") == "last":  # compares the first and the last person instead of the extremes
        hi, lo = people[0], people[2]
        if ages[hi] < ages[lo]:
            hi, lo = lo, hi
    calc.trace.value = calc.step(
        "Compare the three ages and subtract the youngest age from the oldest age."
        if choice.get("spread") != "last"
        else f"Subtract the younger of {people[0]} and {people[2]}'s ages from the older one.",
        "sub",
        ages[hi],
        ages[lo],
        lambda m, r: f"The oldest is {hi} and the youngest is {lo}, so the difference is {m} years.",
    )
    return calc.trace


def _ages_expression(spec: Mapping[str, Any]) -> str:
    people = spec["people"]
    expr = {people[0]: str(spec["given"])}
    for f in spec["facts"]:
        expr[f["new"]] = f"({expr[f['known']]}{'+' if f['older'] else '-'}{f['k']})"
    if spec["query"] == "single":
        return expr[people[2]]
    all3 = ", ".join(expr[p] for p in people)
    return f"max({all3})-min({all3})"


def _ages_plan_flaws(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    flaws: list[dict[str, Any]] = [{"misread": [f["new"]]} for f in spec["facts"] if f["inverse"]]
    if spec["query"] == "spread":
        flaws.append({"spread": "last"})
    flaws += [{"flip": f["new"]} for f in spec["facts"] if not f["inverse"]]
    return flaws


# ---------------------------------------------------------------------------- sequence (out-of-domain)

_ORDINAL = {3: "3rd", 4: "4th", 5: "5th", 6: "6th", 7: "7th", 8: "8th", 9: "9th"}


def _gen_sequence(rng: random.Random) -> dict[str, Any] | None:
    a, d, n = rng.randint(1, 9), rng.randint(2, 5), rng.randint(3, 7)
    up = rng.random() < 0.6
    if not up and a < (n - 1) * d + 1:
        a = (n - 1) * d + rng.randint(1, 9)  # a decreasing sequence must stay positive
    value = a + (n - 1) * d if up else a - (n - 1) * d
    if not 0 < value <= 40:
        return None
    return {"a": a, "d": d, "n": n, "up": up, "story": rng.random() < 0.5, "name": rng.choice(NAMES)}


def _sequence_question(spec: Mapping[str, Any]) -> str:
    a, d, n = spec["a"], spec["d"], spec["n"]
    if spec["story"]:
        name = spec["name"]
        verb = "adds" if spec["up"] else "takes out"
        return (
            f"On day 1 there are {a} beads in {name}'s jar. Every day after that, {name} {verb} {d} beads. "
            f"How many beads are in the jar on day {n}?"
        )
    rel = "more" if spec["up"] else "less"
    return (
        f"A sequence starts with {a}, and each term is {d} {rel} than the term before it. "
        f"What is the {_ORDINAL[n]} term of the sequence?"
    )


def _sequence_solve(spec: Mapping[str, Any], choice: Mapping[str, Any], limit: int = MAX_FLAWED_VALUE) -> _Trace:
    a, d, n = spec["a"], spec["d"], spec["n"]
    calc = _Calc(choice, limit)
    what = f"day {n}" if spec["story"] else f"the {_ORDINAL[n]} term"
    first = "day 1" if spec["story"] else "the first term"
    if choice.get("count") == "n":
        gaps = n
        unit = "days" if spec["story"] else "terms"
        calc.trace.plans.append(f"Count the {unit} up to {what}.")
        calc.trace.lines.append(f"There are {n} {unit} up to {what}.")
    else:
        gaps = calc.step(
            f"Count the steps from {first} to {what}.",
            "sub",
            n,
            1,
            lambda m, r: f"From {first} to {what} there are {m} steps.",
        )
    change = calc.step(
        "Multiply the number of steps by the change per step.",
        "mul",
        gaps,
        d,
        lambda m, r: f"The total change is {m}.",
    )
    op = "add" if spec["up"] != (choice.get("flip") == "direction") else "sub"
    calc.trace.value = calc.step(
        f"{'Add' if op == 'add' else 'Subtract'} the total change {'to' if op == 'add' else 'from'} {first}.",
        op,
        a,
        change,
        lambda m, r: f"On {what} there are {m} beads." if spec["story"] else f"The {what[4:]} is {m}.",
    )
    return calc.trace


def _sequence_expression(spec: Mapping[str, Any]) -> str:
    return f"{spec['a']}{'+' if spec['up'] else '-'}({spec['n']}-1)*{spec['d']}"


def _sequence_plan_flaws(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"count": "n"}, {"flip": "direction"}]


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class _Family:
    gen: Callable[[random.Random], dict[str, Any] | None]
    question: Callable[[Mapping[str, Any]], str]
    solve: Callable[..., _Trace]
    expression: Callable[[Mapping[str, Any]], str]
    plan_flaws: Callable[[Mapping[str, Any]], list[dict[str, Any]]]


_FAMILIES: dict[str, _Family] = {
    **{
        surface: _Family(
            partial(_gen_chain, surface=surface), _arith_question, _arith_solve, _arith_expression, _arith_plan_flaws
        )
        for surface in ARITH_GRAMMAR
    },
    "units": _Family(_gen_units, _units_question, _units_solve, _units_expression, _units_plan_flaws),
    "ages": _Family(_gen_ages, _ages_question, _ages_solve, _ages_expression, _ages_plan_flaws),
    "sequence": _Family(_gen_sequence, _sequence_question, _sequence_solve, _sequence_expression, _sequence_plan_flaws),
}


def _family(name: str) -> _Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def _try_solve(problem: ToyProblem, choice: Mapping[str, Any], limit: int = MAX_FLAWED_VALUE) -> _Trace | None:
    try:
        return _family(problem.family).solve(problem.spec, choice, limit)
    except _Invalid:
        return None


def split_of(question: str) -> str:
    """The held-out split of a question, by a hash of its text: about 1 in 8 questions is ``"test"``."""
    return "test" if hashlib.sha256(question.encode()).digest()[0] % 8 == 0 else "train"


def _valid(problem: ToyProblem) -> bool:
    """Accept a generated problem only if its reference solution is in range and both kinds of flaw exist."""
    ref = _try_solve(problem, {}, MAX_VALUE)
    if ref is None or ref.value != problem.answer:
        return False
    if problem.family in ARITH_GRAMMAR:  # every way of falling for the inverted comparisons is writable, and wrong
        inverted = _arith_inverted(problem.spec)
        for r in range(1, len(inverted) + 1):
            for misread in itertools.combinations(inverted, r):
                trace = _try_solve(problem, {"misread": list(misread)})
                if trace is None or trace.value == problem.answer:
                    return False
    return bool(_plan_flaw_traces(problem)) and bool(_slip_traces(problem))


def generate(family: str, n: int, seed: int = 0, *, split: str | None = None) -> list[ToyProblem]:
    """``n`` distinct problems of ``family``, deterministic under ``seed``.

    With ``split`` (``"train"`` or ``"test"``) only questions of that split (`split_of`) are kept, so a
    held-out test set never overlaps any training corpus, whatever the seeds.
    """
    fam = _family(family)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    rng = random.Random(f"cpl.toy:{family}:{seed}")
    problems: list[ToyProblem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 1000 * (n + 10):
            raise RuntimeError(f"could not generate {n} distinct {family} problems")
        spec = fam.gen(rng)
        if spec is None:
            continue
        question = fam.question(spec)
        if question in seen or (split is not None and split_of(question) != split):
            continue
        expression = fam.expression(spec)
        answer = _eval_int(expression)
        problem = ToyProblem(family, question, answer, expression, spec)
        if not _valid(problem):
            continue
        seen.add(question)
        problems.append(problem)
    return problems


def _eval_int(expression: str) -> int:
    value = eval(expression, {"__builtins__": {}}, {"max": max, "min": min})  # our own strings only
    if value != int(value):
        raise ValueError(f"{expression} is not an integer")
    return int(value)


# ----------------------------------------------------------------------------------------- solutions


def reference_solution(problem: ToyProblem, fmt: PromptFormat) -> list[Step]:
    """The right plan steps (``Plan 1: ...``) and the final solution step, in `cpl.formats` conventions."""
    trace = _try_solve(problem, {}, MAX_FLAWED_VALUE)
    assert trace is not None and trace.value == problem.answer, problem
    return trace.steps(PromptFormat(fmt))


def _plan_flaw_traces(problem: ToyProblem) -> list[_Trace]:
    traces = []
    for choice in _family(problem.family).plan_flaws(problem.spec):
        trace = _try_solve(problem, choice)
        if trace is not None and trace.value != problem.answer:
            traces.append(trace)
    return traces


def _slip_traces(problem: ToyProblem) -> list[_Trace]:
    ref = _try_solve(problem, {})
    assert ref is not None
    for deltas in ((1, -1, 2, -2), (10, -10)):  # small slips if any is possible
        traces = []
        for line in range(len(ref.lines)):
            for delta in deltas:
                trace = _try_solve(problem, {"slip": (line, delta)})
                if trace is not None and trace.value != problem.answer:
                    traces.append(trace)
        if traces:
            return traces
    return []


def flawed_solution(
    problem: ToyProblem, fmt: PromptFormat, kind: str = "plan", rng: random.Random | int = 0
) -> list[Step]:
    """A solution with a wrong final answer.

    ``kind="plan"``: a wrong plan choice, executed faithfully (a misread comparison, a wrong operation, the
    wrong person or conversion). ``kind="slip"``: the right plan with one arithmetic slip (carried through).
    ``rng`` (or a seed) chooses among the possible flaws of that kind.
    """
    if kind not in FLAW_KINDS:
        raise ValueError(f"kind must be one of {FLAW_KINDS}, got {kind!r}")
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    traces = _plan_flaw_traces(problem) if kind == "plan" else _slip_traces(problem)
    return rng.choice(traces).steps(PromptFormat(fmt))


def demonstrator_solution(problem: ToyProblem, fmt: PromptFormat, rng: random.Random) -> list[Step]:
    """The noisy annotator that writes the training corpus (the comparison-chain families, `ARITH_GRAMMAR`).

    It misreads each inverted comparison it needs with probability `TRAP_RATE` (the critical planning step),
    sometimes picks another wrong operation or the wrong person, sometimes slips in arithmetic, and sometimes
    computes an unneeded distractor first. A combination that would write a number out of range keeps only
    the misreadings (the generator guarantees that every way of misreading is writable). Each step's wording
    and the order of independent steps are its free choice (uniform), so none of them is a habit to learn.
    """
    if problem.family not in ARITH_GRAMMAR:
        raise ValueError(f"the demonstrator writes comparison-chain solutions only ({', '.join(ARITH_GRAMMAR)})")
    spec = problem.spec
    style = rng.getrandbits(32)
    choice: dict[str, Any] = {"misread": [p for p in _arith_inverted(spec) if rng.random() < TRAP_RATE]}
    if rng.random() < WRONG_OP_RATE:
        choice["flip"] = rng.choice([*spec["needed"], *(["query"] if spec["query"]["kind"] != "single" else [])])
    distractors = _arith_distractors(spec)
    if distractors and spec["query"]["kind"] != "single" and rng.random() < WRONG_PERSON_RATE:
        choice["swap"] = rng.choice(distractors)
    elif distractors and rng.random() < DETOUR_RATE:
        choice["detour"] = rng.choice(distractors)
    choice["style"] = style
    trace = _try_solve(problem, choice) or _try_solve(problem, {"misread": choice["misread"], "style": style})
    if trace is not None and rng.random() < SLIP_RATE:
        slipped = _try_solve(problem, {**choice, "slip": (rng.randrange(len(trace.lines)), rng.choice([1, -1]))})
        trace = slipped or trace
    if trace is None:
        trace = _try_solve(problem, {"style": style})
        assert trace is not None
    return trace.steps(PromptFormat(fmt))


# ------------------------------------------------------------------------------------------------- I/O


def worked_answer(problem: ToyProblem) -> str:
    """A GSM8K-style ``answer``: the reference lines with ``<<a+b=c>>`` calculator marks, then ``#### N``."""
    trace = _try_solve(problem, {}, MAX_FLAWED_VALUE)
    assert trace is not None
    lines = []
    for line in trace.lines:
        head, _, rest = line.partition("$")
        math, _, tail = rest.partition("$")
        lhs, _, result = math.partition("=")
        lhs = lhs.replace("\\times ", "*")
        lines.append(f"{head}{lhs}=<<{lhs}={result}>>{result}{tail}" if math else line)
    return "\n".join([*lines, f"#### {problem.answer}"])


def to_row(problem: ToyProblem) -> dict[str, Any]:
    return {
        "question": problem.question,
        "answer": worked_answer(problem),
        "family": problem.family,
        "expression": problem.expression,
    }


def write_gsm8k_jsonl(problems: Iterable[ToyProblem], path: Path | str) -> Path:
    """One GSM8K row per problem: ``question``, ``answer`` (worked, ending ``#### N``), ``family``,
    ``expression``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(to_row(problem)) + "\n")
    return path
