"""Summaries over seeds: mean ± sample standard deviation, and paired differences with a t-interval.

Two settings trained with the same seeds see the same batches in the same order and start their heads from the
same random weights, so their difference is measured seed by seed (a paired comparison): the spread of the
per-seed differences, not of the scores, decides whether a difference is distinguishable from noise.
"""
from __future__ import annotations

import math

CONFIDENCE = 0.95


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1), as "mean ± std over N runs" is usually reported; the std of a
    single value is None (undefined), not 0."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """``a - b`` over the seeds both have: the mean difference, a 95% t-interval over the per-seed differences
    (Student's t with n - 1 degrees of freedom, scipy.stats.ttest_1samp), its two-sided p-value, and the seeds.

    ``ci`` and ``p`` are None with one common seed (no spread to estimate). None if no seed is common.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean = sum(diffs) / len(diffs)
    out = {"diff": mean, "ci": None, "p": None, "excludes_zero": False, "seeds": seeds,
           "per_seed": dict(zip(map(str, seeds), diffs))}
    if len(diffs) < 2:
        return out
    if max(diffs) - min(diffs) <= 1e-12 * max(1.0, abs(mean)):  # no spread: the interval is the point itself
        out.update(ci=[mean, mean], p=1.0 if mean == 0 else 0.0, excludes_zero=mean != 0)
        return out
    from scipy import stats

    test = stats.ttest_1samp(diffs, 0.0)
    ci = test.confidence_interval(CONFIDENCE)
    low, high = float(ci.low), float(ci.high)
    out.update(ci=[low, high], p=float(test.pvalue), excludes_zero=low > 0 or high < 0)
    return out


def format_difference(d: dict | None, scale: float = 1.0, digits: int = 4) -> str:
    """``+0.0123 [+0.0040, +0.0206] *`` (the star: the interval excludes 0); ``+0.0123 [n/a: 1 seed]``."""
    if d is None:
        return "-"
    f = f"{{:+.{digits}f}}"
    text = f.format(scale * d["diff"])
    if d["ci"] is None:
        return text + " [n/a: 1 seed]"
    low, high = (scale * x for x in d["ci"])
    text += f" [{f.format(low)}, {f.format(high)}]"
    return text + (" *" if d["excludes_zero"] else "")


def format_mean_std(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    f = f"{{:.{digits}f}}"
    return f.format(scale * mean) + (f" ± {f.format(scale * std)}" if std is not None else "")
