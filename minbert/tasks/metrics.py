"""Task metrics and the CS224N overall score."""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr

from minbert.tasks.registry import LEADERBOARD_TASKS, OVERALL, TASKS



def metric_name(task: str) -> str | None:
    """The metric of ``task`` ("accuracy", "pearson"), None for a name that is no task (looked up when asked:
    tasks of the user's own join the registry at run time)."""
    return TASKS[task].metric if task in TASKS else None


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean())


def is_constant(values) -> bool:
    """All values equal (or fewer than two): Pearson r is undefined. Compared exactly: the standard deviation
    of equal floats can come out as 1e-17 instead of 0, and scipy then returns NaN."""
    values = np.asarray(values, dtype=np.float64)
    return values.size < 2 or bool((values == values[0]).all())


def pearson(pred, gold) -> float:
    """Pearson r; 0.0 where it is undefined (constant predictions or gold scores: a constant predictor carries
    no correlation; evaluate.py says so with a warning). Never NaN for finite inputs."""
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if is_constant(pred) or is_constant(gold):
        return 0.0
    r = float(pearsonr(pred, gold).statistic)
    return r if math.isfinite(r) else 0.0


def task_score(task: str, pred, gold) -> float:
    return pearson(pred, gold) if TASKS[task].metric == "pearson" else accuracy(pred, gold)


def overall_score(scores: dict[str, float]) -> float:
    """(SST acc + QQP acc + (STS r + 1) / 2) / 3, averaged over the tasks present (Pearson mapped to 0..1). Tasks
    of the user's own are reported beside it, never part of it."""
    parts = [TASKS[t].overall_part(v) for t, v in scores.items() if t in TASKS and not TASKS[t].user]
    return sum(parts) / len(parts) if parts else math.nan


def with_overall(scores: dict[str, float]) -> dict[str, float]:
    """``scores`` with the CS224N leaderboard's "overall" added only when SST, QQP and STS are all scored: over
    fewer tasks it would be another number under the leaderboard's name (evaluate.py then prints none)."""
    out = {k: v for k, v in scores.items() if k != OVERALL}
    if all(t in out for t in LEADERBOARD_TASKS):
        out[OVERALL] = overall_score({t: out[t] for t in LEADERBOARD_TASKS})
    return out


def format_scores(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per split, columns SST / QQP / STS / overall (training and evaluate.py print it)."""
    # The leaderboard's columns always; another built-in task's (SST-2) in front, where a split has its score;
    # tasks of the user's own after "overall", which they are no part of.
    scored = [t for t in TASKS if t not in LEADERBOARD_TASKS and any(t in scores for scores in results.values())]
    others, user = [t for t in scored if not TASKS[t].user], [t for t in scored if TASKS[t].user]
    cols = [(t, TASKS[t].table_label) for t in [*others, *LEADERBOARD_TASKS]] + [(OVERALL, OVERALL)]
    cols += [(t, TASKS[t].table_label) for t in user]
    lines = ["| split | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for split, scores in results.items():
        cells = [f"{scores[k]:.4f}" if k in scores else "-" for k, _ in cols]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
