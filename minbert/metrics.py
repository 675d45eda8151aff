"""Task metrics and the CS224N overall score."""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr

METRIC_NAMES = {"sst": "accuracy", "qqp": "accuracy", "sts": "pearson", "sst2": "accuracy"}


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean())


def pearson(pred, gold) -> float:
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if pred.std() == 0 or gold.std() == 0:  # undefined; a constant predictor carries no correlation
        return 0.0
    return float(pearsonr(pred, gold).statistic)


def task_score(task: str, pred, gold) -> float:
    return pearson(pred, gold) if task == "sts" else accuracy(pred, gold)


def overall_score(scores: dict[str, float]) -> float:
    """(SST acc + QQP acc + (STS r + 1) / 2) / 3, averaged over the tasks present (Pearson mapped to 0..1)."""
    parts = [(v + 1) / 2 if t == "sts" else v for t, v in scores.items() if t in METRIC_NAMES]
    return sum(parts) / len(parts) if parts else math.nan


def format_scores(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per split, columns SST / QQP / STS / overall (training and evaluate.py print it)."""
    cols = [("sst", "SST acc"), ("qqp", "QQP acc"), ("sts", "STS r"), ("overall", "overall")]
    if any("sst2" in scores for scores in results.values()):
        cols.insert(0, ("sst2", "SST-2 acc"))
    lines = ["| split | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for split, scores in results.items():
        cells = [f"{scores[k]:.4f}" if k in scores else "-" for k, _ in cols]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
