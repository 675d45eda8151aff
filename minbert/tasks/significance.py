"""How sure is a dev score? Bootstrap confidence intervals and paired comparisons of prediction folders.

The report's rows differ by 0.001 to 0.01, while on 1,101 SST dev sentences the standard error of an accuracy
near 0.5 is about 0.015: most of such a ranking is noise. ``evaluate.py --ci`` and ``--compare`` show it.

* Confidence interval of a task's score: resample its dev examples with replacement (``N_RESAMPLES`` times, seed
  ``SEED``), recompute the score (accuracy, or Pearson's r for STS), and take the 2.5% and 97.5% percentiles
  (the percentile bootstrap; Efron & Tibshirani 1993, ch. 13). The overall score resamples each task
  independently, since the tasks' dev sets are independent samples.
* Paired comparison of runs A and B on the same examples: every resample draws the same examples for A and B,
  so the interval of A − B leaves out the variation the two runs share (which examples are easy). The p-value
  is two-sided: the share of resampled differences at least |A − B| away from A − B (the resampled difference
  shifted to 0 mimics the null hypothesis A = B; Berg-Kirkpatrick et al. 2012, §2), counted as (1 + k) / (1 + n)
  so that it is never 0.

Both are built on ``scipy.stats.bootstrap``: the resampled objects are example indices, so that a pair task's
prediction and gold label, and A's and B's predictions, always move together.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.stats import bootstrap

from minbert.tasks.data import TASKS, DataError, load_task, shorten
from minbert.tasks.metrics import LEADERBOARD_TASKS, overall_score, task_score
from minbert.tasks.predict import prediction_path, read_predictions

N_RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
# Below this many examples in a task the percentile bootstrap's intervals are unreliable (too few distinct
# resamples; with 2-3 rows often of width 0): evaluate.py warns (and refuses below 2).
MIN_RELIABLE = 30
BATCH = 250  # resamples evaluated at once: bounds memory to BATCH x (largest dev set) indices


@dataclass
class DevPredictions:
    """One task's scored dev examples, in the gold file's order."""
    ids: list[str]
    pred: np.ndarray
    gold: np.ndarray


def read_dev_predictions(pred_dir: str | Path, data_dir: str | Path, allow_partial: bool = False,
                         skip_bad_rows: bool = False) -> dict[str, DevPredictions]:
    """{task: DevPredictions} for every dev prediction file in ``pred_dir`` whose gold labels exist; the same
    examples ``predict.score_prediction_dir`` scores (call that first: it reports bad or incomplete files)."""
    out = {}
    for task, spec in TASKS.items():
        path = prediction_path(pred_dir, task, "dev")
        if not path.exists():
            continue
        preds = read_predictions(path, spec)
        gold = load_task(task, "dev", data_dir, skip_bad_rows=skip_bad_rows)
        examples = [ex for ex in gold.examples if ex.id in preds] if allow_partial else gold.examples
        if gold.has_labels and examples:
            out[task] = DevPredictions([ex.id for ex in examples], np.array([preds[ex.id] for ex in examples]),
                                       np.array([ex.label for ex in examples], dtype=np.float64))
    return out


def resampled_score(task: str, pred: np.ndarray, gold: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """idx (..., n) -> the task's score on each row of resampled examples (metrics.task_score, vectorised)."""
    if TASKS[task].metric != "pearson":
        correct = (pred == gold).astype(np.float64)
        return lambda idx: correct[idx].mean(-1)

    def pearson(idx: np.ndarray) -> np.ndarray:
        x, y = pred[idx], gold[idx]
        x = x - x.mean(-1, keepdims=True)
        y = y - y.mean(-1, keepdims=True)
        den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
        # A constant predictor (or gold) carries no correlation: 0, as metrics.pearson says.
        return np.divide((x * y).sum(-1), den, out=np.zeros_like(den), where=den > 0)
    return pearson


def _bootstrap(statistic: Callable[..., np.ndarray], sizes: list[int]):
    """scipy's percentile bootstrap of ``statistic(idx_1, ..., idx_k)`` over k independently resampled index
    sets (one per task), with the module's fixed seed."""
    data = tuple(np.arange(n) for n in sizes)

    def stat(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(*(np.moveaxis(i, axis, -1).astype(np.intp) for i in idx))

    return bootstrap(data, stat, n_resamples=N_RESAMPLES, batch=BATCH, vectorized=True, paired=False,
                     confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(SEED))


def _overall(tasks: list[str], scorers: list[Callable]) -> Callable[..., np.ndarray]:
    """The overall score (metrics.overall_score, elementwise) of the tasks' resampled scores."""
    return lambda *idx: overall_score({t: f(i) for t, f, i in zip(tasks, scorers, idx)})


def check_sample_sizes(dev: dict[str, DevPredictions], flag: str = "--ci") -> list[str]:
    """A bootstrap needs examples to resample: fewer than 2 in a task is an error (DataError naming the task);
    fewer than MIN_RELIABLE gives intervals that mean little (returned as warnings, one line each)."""
    warnings = []
    for task, d in dev.items():
        n = len(d.ids)
        if n < 2:
            raise DataError(f"{flag}: {task} dev has {n} scored example(s); a bootstrap interval needs at least 2 "
                            f"(and {MIN_RELIABLE} to mean much)")
        if n < MIN_RELIABLE:
            warnings.append(f"{flag}: {task} dev has only {n} scored examples; below {MIN_RELIABLE} a bootstrap "
                            "interval is unreliable (often too narrow, even of width 0)")
    return warnings


def confidence_intervals(dev: dict[str, DevPredictions]) -> dict[str, list[float]]:
    """{task or "overall": [low, high]}: 95% percentile-bootstrap intervals of the dev scores (call
    :func:`check_sample_sizes` first)."""
    out = {}
    scorers = [resampled_score(t, d.pred, d.gold) for t, d in dev.items()]
    for (task, d), f in zip(dev.items(), scorers):
        ci = _bootstrap(f, [len(d.ids)]).confidence_interval
        out[task] = [float(ci.low), float(ci.high)]
    if all(t in dev for t in LEADERBOARD_TASKS):  # the leaderboard's overall only (metrics.with_overall)
        ci = _bootstrap(_overall(list(dev), scorers), [len(d.ids) for d in dev.values()]).confidence_interval
        out["overall"] = [float(ci.low), float(ci.high)]
    return out


def check_same_examples(a: dict[str, DevPredictions], b: dict[str, DevPredictions], name_a: str, name_b: str) -> None:
    """A paired comparison needs A and B to cover the same dev ids of the same tasks (one-line DataError)."""
    if set(a) != set(b):
        raise DataError(f"{name_b}: has dev predictions for {', '.join(b) or 'no task'}, {name_a} for "
                        f"{', '.join(a) or 'no task'}; a paired comparison needs the same tasks and ids")
    for task in a:
        ids_a, ids_b = set(a[task].ids), set(b[task].ids)
        if ids_a != ids_b:
            only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
            example = f"{shorten(only_a[0])} only in {name_a}" if only_a else f"{shorten(only_b[0])} only in {name_b}"
            raise DataError(f"{name_b}: {task} dev covers other ids than {name_a} ({len(only_a)} only in {name_a}, "
                            f"{len(only_b)} only in {name_b}, e.g. {example}); a paired comparison needs the same ids")


def _paired(diff: Callable[..., np.ndarray], sizes: list[int], a: float, b: float) -> dict:
    observed = a - b
    res = _bootstrap(diff, sizes)
    dist = np.asarray(res.bootstrap_distribution)
    # Two-sided p-value of the shifted bootstrap distribution (tolerance: float noise of an exact 0 difference).
    k = int(np.sum(np.abs(dist - observed) >= abs(observed) - 1e-12))
    return {"a": a, "b": b, "diff": observed, "ci": [float(res.confidence_interval.low),
                                                     float(res.confidence_interval.high)],
            "p": (1 + k) / (1 + dist.size)}


def paired_comparison(a: dict[str, DevPredictions], b: dict[str, DevPredictions], name_a: str = "A",
                      name_b: str = "B") -> dict[str, dict]:
    """{task or "overall": {"a", "b", "diff": a - b, "ci": [low, high], "p"}}, paired over the same examples."""
    check_same_examples(a, b, name_a, name_b)
    if not a:
        raise DataError(f"{name_a}: no dev predictions with gold labels to compare")
    out, diffs = {}, []
    for task, da in a.items():
        db = b[task]
        order = {i: k for k, i in enumerate(db.ids)}
        pred_b = db.pred[[order[i] for i in da.ids]]  # B's predictions in A's order
        fa, fb = resampled_score(task, da.pred, da.gold), resampled_score(task, pred_b, da.gold)
        diffs.append((fa, fb))
        score_a, score_b = task_score(task, da.pred, da.gold), task_score(task, pred_b, da.gold)
        out[task] = _paired(lambda idx, fa=fa, fb=fb: fa(idx) - fb(idx), [len(da.ids)], score_a, score_b)
    tasks = list(a)
    if not all(t in tasks for t in LEADERBOARD_TASKS):  # no overall over fewer tasks (metrics.with_overall)
        return out
    overall_a = _overall(tasks, [fa for fa, _ in diffs])
    overall_b = _overall(tasks, [fb for _, fb in diffs])
    point_a = overall_score({t: out[t]["a"] for t in tasks})
    point_b = overall_score({t: out[t]["b"] for t in tasks})
    out["overall"] = _paired(lambda *idx: overall_a(*idx) - overall_b(*idx), [len(a[t].ids) for t in tasks],
                             point_a, point_b)
    return out


# ------------------------------------------------------------------------------------------------ Markdown

def _name(key: str) -> str:
    return TASKS[key].table_label if key in TASKS else key


def format_intervals(scores: dict[str, float], intervals: dict[str, list[float]]) -> str:
    """dev scores with their 95% intervals, one row per score."""
    lines = [f"| dev score | value | {CONFIDENCE:.0%} bootstrap interval | ± |", "|---|---|---|---|"]
    for key, (low, high) in intervals.items():
        lines.append(f"| {_name(key)} | {scores[key]:.4f} | [{low:.4f}, {high:.4f}] | {(high - low) / 2:.4f} |")
    return "\n".join(lines)


def format_comparison(comparison: dict[str, dict], name_a: str, name_b: str) -> str:
    """A − B per score, its paired 95% interval, the p-value, and whether the interval excludes 0."""
    lines = [f"A = {name_a}, B = {name_b} (paired bootstrap over the same dev examples, {N_RESAMPLES} resamples)",
             "", f"| dev score | A | B | A − B | {CONFIDENCE:.0%} interval | p | |", "|---|---|---|---|---|---|---|"]
    for key, c in comparison.items():
        low, high = c["ci"]
        verdict = "A > B" if low > 0 else "A < B" if high < 0 else "no difference shown"
        # The smallest p-value n resamples can give is 1 / (n + 1): show it as a bound.
        p = f"< {2 / (N_RESAMPLES + 1):.1g}" if c["p"] * (N_RESAMPLES + 1) < 1.5 else f"{c['p']:.3g}"
        lines.append(f"| {_name(key)} | {c['a']:.4f} | {c['b']:.4f} | {c['diff']:+.4f} | [{low:+.4f}, {high:+.4f}] "
                     f"| {p} | {verdict} |")
    return "\n".join(lines)


__all__ = ["DevPredictions", "read_dev_predictions", "confidence_intervals", "paired_comparison",
           "check_same_examples", "check_sample_sizes", "format_intervals", "format_comparison", "N_RESAMPLES",
           "SEED", "MIN_RELIABLE"]
