"""Markdown tables of the experiments' results (the same text is printed and written to results.md)."""
from __future__ import annotations

from minbert.experiments.stats import format_difference, format_mean_std
from minbert.tasks.registry import LEADERBOARD_TASKS, OVERALL, TASKS

SCORES = (*((t, TASKS[t].table_label) for t in LEADERBOARD_TASKS), (OVERALL, OVERALL))


def _score_cell(row: dict, key: str) -> str:
    ours = format_mean_std((row.get("dev") or {}).get(key), (row.get("std") or {}).get(key))
    report = (row.get("report") or {}).get(key)
    return f"{ours} / {report:.3f}" if report is not None else f"{ours} / N/A"


def paper_markdown(results: list[dict], seeds: tuple[int, ...] | None) -> str:
    """One line per row: each score as mean ± std over seeds / the report's, the paired difference in overall
    score against Baseline with its 95% interval (* where it excludes 0), the runs finished and the wall time."""
    lines = ["| model | runs | " + " | ".join(name for _, name in SCORES)
             + " | Δ overall vs Baseline [95% CI] | wall s |", "|---" * 8 + "|"]
    for r in results:
        cells = [_score_cell(r, key) for key, _ in SCORES]
        if r.get("error"):
            cells[-1] += f" (failed: {r['error']})"
        name = r["name"] + (f" (same run as `{r['same_run_as']}`)" if r.get("same_run_as") else "")
        if r["key"] == "baseline":
            diff = "(reference)"
        elif "vs_baseline" not in r:
            diff = "-"
        else:
            diff = format_difference(r["vs_baseline"]) if r["vs_baseline"] else "no Baseline run with these seeds"
        runs = f"{r.get('n_runs', 0)}/{len(seeds) if seeds else 1}"
        wall = f"{r['wall_seconds']:.0f}" if r.get("wall_seconds") is not None else "-"
        lines.append(f"| {name} | {runs} | " + " | ".join(cells) + f" | {diff} | {wall} |")
    return "\n".join(lines)


def cards_markdown(summary: dict, walls: dict[str, list[float]], paired: dict | None, paired_metric: str | None) -> str:
    """Adam vs M-FAC: mean ± std of each score (x 100), then the paired line M-FAC − Adam on ``paired_metric``."""
    metrics = list(next(iter(summary.values())).keys()) if summary else []
    lines = ["| optimizer | runs | " + " | ".join(f"dev {m} (%)" for m in metrics) + " | mean wall s |",
             "|---" * (len(metrics) + 3) + "|"]
    for opt, stats in summary.items():
        n = next(iter(stats.values()))[2]
        cells = [format_mean_std(mu, sd, scale=100, digits=2) for mu, sd, _ in stats.values()]
        wall = walls.get(opt) or []
        mean_wall = f"{sum(wall) / len(wall):.0f}" if wall else "-"
        lines.append(f"| {opt} | {n} | " + " | ".join(cells) + f" | {mean_wall} |")
    if paired_metric is not None:
        d = paired.get(paired_metric) if paired else None
        if d is None:
            lines.append(f"\nM-FAC − Adam, dev {paired_metric} (points): no seed with both runs finished")
        else:
            lines.append(f"\nM-FAC − Adam, dev {paired_metric} (points, paired over seeds "
                         f"{', '.join(map(str, d['seeds']))}; 95% t-interval; * excludes 0): "
                         f"{format_difference(d, scale=100, digits=2)}")
    return "\n".join(lines)
