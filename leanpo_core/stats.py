"""Intervals for accuracies measured on a finite set of questions, and for the change of two models on the same set.

Every accuracy the project reports comes with its n and a 95% interval, so a reader can tell a gain from noise:
  wilson_interval        one proportion k/n (Wilson score interval: well behaved at 0, 1 and small n);
  bootstrap_interval     the mean of any per-question score (e.g. correctness averaged over seeds);
  paired_difference      two models answering the SAME questions: the mean difference of their per-question
                         correctness, its paired-bootstrap percentile interval (resampling questions, seeded, so the
                         same inputs give the same interval) and the exact two-sided McNemar p-value (a binomial
                         test on the questions where the two models disagree);
  accuracy_summary       per-question correctness -> {value, n, ci_low, ci_high}, overall and per category.

    >>> wilson_interval(5, 10)          # (0.2366, 0.7634)
    >>> paired_difference([0, 1, 1], [1, 1, 1])["delta"]   # 0.3333
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes/n; (nan, nan) when n is 0."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: questions the second model gets right and the first wrong (`gained`) against
    the reverse (`lost`), under the null that either is equally likely. 1.0 when the models never disagree."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def bootstrap_interval(values: Sequence[float], resamples: int = 10_000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling them with replacement, seeded)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return math.nan, math.nan
    means = data[np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(before: Sequence[float], after: Sequence[float], resamples: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Difference after - before of two per-question scores (1/0 correctness) over the same questions, in order.

    Returns delta (mean difference), its paired-bootstrap percentile interval (ci_low, ci_high), the exact McNemar
    p-value, n, and gained / lost (questions right only after / only before).
    """
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"before and after must be 1-D and the same length, got {b.shape} and {a.shape}")
    n = len(a)
    if n == 0:
        return {"delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "n": 0,
                "gained": 0, "lost": 0}
    diff = a - b
    low, high = bootstrap_interval(diff, resamples, seed, level)
    gained, lost = int(((a > 0.5) & (b < 0.5)).sum()), int(((a < 0.5) & (b > 0.5)).sum())
    return {"delta": float(diff.mean()), "ci_low": low, "ci_high": high,
            "p_value": mcnemar_exact(gained, lost), "n": n, "gained": gained, "lost": lost}


def accuracy_summary(correct: Sequence[bool], categories: Sequence[str] | None = None) -> dict:
    """{"all": {value, n, ci_low, ci_high}, <category>: {...}, ...} of per-question correctness."""
    groups: dict[str, list[bool]] = {"all": list(correct)}
    if categories is not None:
        for category, ok in zip(categories, correct, strict=True):
            groups.setdefault(category, []).append(ok)
    summary = {}
    for name, values in groups.items():
        k, n = int(sum(values)), len(values)
        low, high = wilson_interval(k, n)
        summary[name] = {"value": k / n if n else math.nan, "n": n, "ci_low": low, "ci_high": high}
    return summary


def format_interval(value: float, low: float, high: float, n: int | None = None, points: bool = False) -> str:
    """"0.512 [0.443, 0.580] (n=200)"; with points=True in percentage points: "+6.5 pp [+1.5, +11.5]"."""
    if math.isnan(value):
        return "n/a"
    if points:
        text = f"{100 * value:+.1f} pp [{100 * low:+.1f}, {100 * high:+.1f}]"
    else:
        text = f"{value:.3f} [{low:.3f}, {high:.3f}]"
    return text + (f" (n={n})" if n is not None else "")
