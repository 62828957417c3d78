"""The statistics of the CPL table: paired differences with bootstrap intervals, disagreement, and the verdict.

Every model of a seed is evaluated on the *same* problems, so a comparison of two models is paired: per problem,
``correct(a) - correct(b)``. Intervals are percentile bootstraps over seeds and, within each resampled seed, over
its problems (both levels vary between replications of the experiment). The verdict applies the rules stated in
BENCHMARKS.md ("bench/cpl_table — verdict rules") to those intervals.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

PRECONDITION_DISAGREEMENT = 0.05
"""Step-APO and Step-DPO must give different answers on at least this share of problems, or the comparison is void
(identical models cannot show a difference, whatever the sample size)."""
NON_INFERIORITY_POINTS = 1.0
"""Margin of the Step-APO vs Step-DPO comparison, in accuracy points: the paper's own gap is at most 1 point."""


@dataclass(frozen=True)
class Interval:
    """A paired difference in accuracy points (100 x share): mean over seeds, and a 95% bootstrap interval."""

    mean: float
    low: float
    high: float
    per_seed: tuple[float, ...]

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero_above(self) -> bool:
        return self.low > 0

    def __str__(self) -> str:
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def paired_difference(
    a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], *, reps: int = 2000, seed: int = 0
) -> Interval:
    """``a`` and ``b``: per seed, per problem, whether the model was right (the same problems in the same order
    for both models). The mean of per-seed mean differences, and its 95% percentile bootstrap interval."""
    if len(a) != len(b) or not a:
        raise ValueError("need the same seeds (at least one) for both models")
    diffs = []
    for ra, rb in zip(a, b, strict=True):
        if len(ra) != len(rb) or not ra:
            raise ValueError("each seed needs the same problems (at least one) for both models")
        diffs.append([100.0 * (int(x) - int(y)) for x, y in zip(ra, rb, strict=True)])
    per_seed = tuple(statistics.fmean(d) for d in diffs)
    rng = random.Random(seed)
    means = []
    for _ in range(reps):
        seeds = [diffs[rng.randrange(len(diffs))] for _ in diffs]
        means.append(statistics.fmean(statistics.fmean(rng.choices(d, k=len(d))) for d in seeds))
    means.sort()
    low, high = means[int(0.025 * reps)], means[min(reps - 1, int(0.975 * reps))]
    return Interval(statistics.fmean(per_seed), low, high, per_seed)


def disagreement(a: Sequence[Sequence[str | None]], b: Sequence[Sequence[str | None]]) -> float:
    """Share of problems (all seeds) on which two models give different final answers (no answer counts as one)."""
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    if not pairs:
        raise ValueError("no problems to compare")
    return sum(x != y for x, y in pairs) / len(pairs)


def disagreements(answers: Mapping[str, Sequence[Sequence[str | None]]]) -> dict[tuple[str, str], float]:
    """`disagreement` of every pair of models."""
    return {(m, n): disagreement(answers[m], answers[n]) for m, n in combinations(answers, 2)}


def minimal_detectable(interval: Interval) -> float:
    """The smallest true difference this design detects with 80% power at 5% two-sided: 2.8 standard errors
    (the 95% interval spans 3.92 of them)."""
    return 2.8 * (interval.high - interval.low) / 3.92


@dataclass(frozen=True)
class Evidence:
    """The intervals the verdict reads (accuracy points, the in-domain set unless named)."""

    sft_vs_base: Interval
    apo_vs_sft: Interval
    apo_vs_dpo: Interval
    apo_vs_shuffled: Interval
    shared_ood_vs_base: Interval
    """Step-APO minus base on the shared-grammar out-of-domain families (their mean)."""
    controls_vs_base: Interval
    """Step-APO minus base on the negative-control families (their mean)."""
    apo_dpo_disagreement: float


def verdict(e: Evidence) -> tuple[str, list[str]]:
    """``void``, ``reproduced``, ``refuted at this scale`` or ``inconclusive``, with the reasons, by the rules of
    BENCHMARKS.md: void unless the precondition holds; reproduced when every claim of the paper holds; refuted
    when one of them is contradicted; inconclusive when the intervals decide neither (not enough power)."""
    if e.apo_dpo_disagreement < PRECONDITION_DISAGREEMENT:
        return "void", [
            f"Step-APO and Step-DPO disagree on {e.apo_dpo_disagreement:.1%} of problems "
            f"(< {PRECONDITION_DISAGREEMENT:.0%}): the comparison cannot show a difference"
        ]
    m = NON_INFERIORITY_POINTS
    claims = {
        f"SFT > base: {e.sft_vs_base}": e.sft_vs_base.low > 0,
        f"Step-APO > SFT: {e.apo_vs_sft}": e.apo_vs_sft.low > 0,
        f"Step-APO >= Step-DPO - {m:g} (non-inferior): {e.apo_vs_dpo}": e.apo_vs_dpo.low > -m,
        f"Step-APO > shuffled-advantage control: {e.apo_vs_shuffled}": e.apo_vs_shuffled.low > 0,
        f"shared-grammar OOD rises: {e.shared_ood_vs_base}": e.shared_ood_vs_base.low > 0,
        f"controls stay flat: {e.controls_vs_base}": e.controls_vs_base.low <= 0 <= e.controls_vs_base.high,
    }
    if all(claims.values()):
        return "reproduced", list(claims)
    # Reproduced is decided first: its non-inferiority claim overlaps "within +-1 point" below, and the shuffled
    # control is what then says whether the advantages themselves matter.
    contradictions = []
    if e.apo_vs_dpo.high <= m:
        contradictions.append(f"Step-APO - Step-DPO within +-{m:g} point or below: {e.apo_vs_dpo}")
    if -m <= e.apo_vs_shuffled.low and e.apo_vs_shuffled.high <= m:
        contradictions.append(f"Step-APO = the shuffled-advantage control within +-{m:g} point: {e.apo_vs_shuffled}")
    if e.apo_vs_sft.high <= 0:
        contradictions.append(f"preference learning <= SFT: {e.apo_vs_sft}")
    if contradictions:
        return "refuted at this scale", contradictions
    unmet = [claim for claim, holds in claims.items() if not holds]
    return "inconclusive", [f"not shown: {claim}" for claim in unmet]
