"""Training curves and experiment tables as images (needs matplotlib: ``pip install 'minbert[plot]'``).

    python -m minbert.plot runs/a runs/b --out curves.png           # losses vs step, dev scores per epoch
    python -m minbert.plot --experiments results.json --out bars.png  # overall score of each experiment row
                                                                      # (error bars: std over seeds)

Curves come from each run's metrics.jsonl (minbert.training.metrics_log.MetricsLog): training records carry ``step`` and
``loss_<task>`` (mean over the last --logging_steps steps) and ``lr``; epoch records carry ``dev`` scores.
"""
from __future__ import annotations

import argparse
import json
import math
import textwrap
from pathlib import Path
from typing import NamedTuple

from minbert.io import atomic_path
from minbert.tasks.data import TASKS
from minbert.tasks.metrics import metric_name

PIP_HINT = "pip install matplotlib (or pip install 'minbert[plot]')"


def _figure_class():
    """matplotlib's Figure; it renders without pyplot, so no display or global backend state is touched."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError(f"plotting needs matplotlib: {PIP_HINT}") from None
    return Figure


# ----------------------------------------------------------------------------------------------------------
# reading


def read_metrics(run: str | Path) -> list[dict]:
    """The records of ``run``/metrics.jsonl (``run`` may also be the file itself) as one run would have
    written them without interruption.

    MetricsLog appends: a ``--resume``d run first writes ``{"resumed_from_step": N}`` and then logs again
    the steps after N that the killed run had logged, so those earlier records are dropped; likewise when
    the step goes back down. After a ``final`` record, a new run starts.
    """
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected a run folder holding metrics.jsonl)")
    records: list[dict] = []
    finished = False
    max_step = -math.inf  # the largest step in `records`

    def drop_from(step: float) -> list[dict]:
        nonlocal max_step
        kept = [r for r in records if not isinstance(r.get("step"), (int, float)) or r["step"] < step]
        max_step = max((r["step"] for r in kept if isinstance(r.get("step"), (int, float))), default=-math.inf)
        return kept

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            if finished:
                records, finished, max_step = [], False, -math.inf
            resumed, step = record.get("resumed_from_step"), record.get("step")
            if isinstance(resumed, (int, float)):
                records = drop_from(resumed + 1)
                continue
            if isinstance(step, (int, float)):
                if step < max_step:  # an epoch's dev record shares the step of that epoch's last train record
                    records = drop_from(step + 1 if "dev" in record else step)
                max_step = max(max_step, step)
            records.append(record)
            finished = bool(record.get("final"))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _ordered(names, first) -> list[str]:
    """``first`` (those present, in that order), then the rest alphabetically."""
    names = set(names)
    return [n for n in first if n in names] + sorted(names - set(first))


def curves(records: list[dict]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{"train": {"loss_sst": (steps, values), ..., "lr": ...}, "dev": {"sst": (epochs, scores), ...}}."""
    train: dict[str, tuple[list, list]] = {}
    dev: dict[str, tuple[list, list]] = {}
    for r in records:
        if r.get("final"):
            continue
        if isinstance(r.get("dev"), dict) and "epoch" in r:
            for name, score in r["dev"].items():
                if isinstance(score, (int, float)):
                    xs, ys = dev.setdefault(name, ([], []))
                    xs.append(r["epoch"])
                    ys.append(score)
        elif "step" in r:
            for name, value in r.items():
                if (name.startswith("loss_") or name == "lr") and isinstance(value, (int, float)):
                    xs, ys = train.setdefault(name, ([], []))
                    xs.append(r["step"])
                    ys.append(value)
    order = [f"loss_{t}" for t in TASKS]
    train = {k: train[k] for k in _ordered([k for k in train if k != "lr"], order) + (["lr"] if "lr" in train else [])}
    dev = {k: dev[k] for k in _ordered(dev, [*TASKS, "overall"])}
    return {"train": train, "dev": dev}


def _score(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


class ExperimentRow(NamedTuple):
    name: str
    overall: float  # the mean over seeds where the row ran several
    reference: float | None  # the published overall score (the report's), if the file has one
    std: float | None = None  # sample std of the overall score over seeds; None for a single run
    runs: int = 1


def read_experiment_rows(path: str | Path) -> list[ExperimentRow]:
    """The rows of a ``python -m minbert.experiments`` results file: name, overall score, reference score, and
    the std over seeds where the row ran several (``"std": {"overall": ...}`` and ``"n_runs"``).

    Tolerant of the layout: a list of rows, or an object holding one under "rows"/"results"/"experiments";
    a row is an object with a "name" and an "overall" score (or "dev": {"overall": ...}), and optionally
    "report": {"overall": ...}, the published number to compare with. Other rows (a failed experiment, a
    note) are skipped. Single-seed files (no "std") give rows without a spread.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--experiments {path}: cannot read: {e}") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("rows", "results", "experiments") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list):
        raise ValueError(f"--experiments {path}: expected a list of rows (objects with name and overall)")
    rows = []
    for row in data:
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            continue
        overall = row.get("overall")
        if overall is None and isinstance(row.get("dev"), dict):
            overall = row["dev"].get("overall")
        reference = row["report"].get("overall") if isinstance(row.get("report"), dict) else None
        std = _score(row["std"].get("overall")) if isinstance(row.get("std"), dict) else None
        runs = row.get("n_runs") if isinstance(row.get("n_runs"), int) else 1
        if _score(overall) is not None:
            rows.append(ExperimentRow(row["name"], _score(overall), _score(reference),
                                      std if runs > 1 else None, runs))
    if not rows:
        raise ValueError(f"--experiments {path}: no row has a name and a numeric overall score")
    return rows


# ----------------------------------------------------------------------------------------------------------
# drawing


def _panel_title(name: str) -> str:
    if name == "lr":
        return "learning rate"
    if name.startswith("loss_"):
        return f"train loss: {name[5:]}"
    metric = {"accuracy": "accuracy", "pearson": "Pearson r"}.get(metric_name(name) or "", "score")
    return f"dev {name} ({metric})" if name != "overall" else "dev overall score"


def _run_labels(runs: list[str | Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def plot_runs(runs: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Top row: each training loss and the learning rate vs step; bottom row: each dev score vs epoch.
    One color per run."""
    Figure = _figure_class()
    from matplotlib.ticker import MaxNLocator
    data = [curves(read_metrics(r)) for r in runs]
    for run, d in zip(runs, data):
        if not d["train"] and not d["dev"]:
            raise ValueError(f"{run}: metrics.jsonl has no training or per-epoch dev records (a --predict_only run?)")
    top = list(dict.fromkeys(k for d in data for k in d["train"]))
    bottom = list(dict.fromkeys(k for d in data for k in d["dev"]))
    rows = [row for row in (top, bottom) if row]
    ncols = max(len(row) for row in rows)
    fig = Figure(figsize=(3.4 * ncols, 3.0 * len(rows) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    labels = _run_labels(runs)
    for i, row in enumerate(rows):
        part = "train" if row is top else "dev"
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(row):
                ax.set_visible(False)
                continue
            name = row[j]
            for k, (d, label) in enumerate(zip(data, labels)):
                if name in d[part]:
                    xs, ys = d[part][name]
                    # Dev scores are few points; a training curve of a single logged step needs a marker to show.
                    marker = "o" if part == "dev" or len(xs) == 1 else None
                    ax.plot(xs, ys, color=f"C{k % 10}", label=label, marker=marker, markersize=4, linewidth=1.4)
            ax.set_title(_panel_title(name), fontsize=10)
            ax.set_xlabel("step" if part == "train" else "epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps and epochs are counts
            if name == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            ax.grid(alpha=0.3)
    if len(runs) > 1:
        seen = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(label, handle)
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(len(seen), 5), frameon=False)
    fig.suptitle(title or (labels[0] if len(runs) == 1 else "training curves"))
    return _save(fig, out)


def plot_experiments(path: str | Path, out: str | Path, title: str | None = None) -> Path:
    """A horizontal bar per experiment row: its overall score (CS224N: mean of SST acc, QQP acc, (STS r+1)/2),
    the mean over seeds with an error bar of one sample std where the row ran several seeds, and the row's
    reference score (the report's) as a black mark where the file has one."""
    Figure = _figure_class()
    rows = read_experiment_rows(path)
    longest = max(len(r.name) for r in rows)  # the row names sit left of the bars
    fig = Figure(figsize=(5.6 + 0.07 * longest, 0.45 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    scores = [r.overall for r in rows]
    y = list(range(len(rows)))
    spread = any(r.std is not None for r in rows)
    seeds = sorted({r.runs for r in rows if r.std is not None})
    label = f"ours: mean ± std over {'/'.join(map(str, seeds))} seeds" if spread else "ours"
    errors = [r.std or 0.0 for r in rows] if spread else None
    bars = ax.barh(y, scores, color="C0", label=label, xerr=errors,
                   error_kw={"ecolor": "0.25", "capsize": 3, "elinewidth": 1.2})
    texts = [f"{r.overall:.4f}" + (f" ± {r.std:.4f}" if r.std is not None else "") for r in rows]
    ax.bar_label(bars, labels=texts, padding=3 + (12 if spread else 0), fontsize=9)
    references = [(i, r.reference) for i, r in enumerate(rows) if r.reference is not None]
    if references:
        ax.plot([r for _, r in references], [i for i, _ in references], "kD", markersize=5, label="the report's")
    if references or spread:
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    ax.set_yticks(y, [r.name for r in rows])
    ax.invert_yaxis()  # the table's first row on top
    ax.set_xlim(0, max(1.0, max(s + (r.std or 0) for s, r in zip(scores, rows)) * 1.25))
    ax.set_xlabel("overall dev score")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(textwrap.fill(title or Path(path).name, 80), fontsize=11)
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    fmt = out.suffix[1:].lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ValueError(f"--out {out}: unsupported image type .{fmt} (use .png, .pdf or .svg)")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    return out


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minbert.plot",
        description="Draw training curves (train losses vs step, dev scores per epoch) of one or more runs from "
                    "their metrics.jsonl, or a bar chart of a python -m minbert.experiments results file. "
                    f"Needs matplotlib: {PIP_HINT}.",
    )
    g = p.add_argument_group("data")
    g.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders (--output_dir of train_multitask.py)")
    g.add_argument("--experiments", metavar="RESULTS.json", default=None,
                   help="plot the overall score of each row of this experiments table instead of curves (with "
                        "error bars of one std over seeds where the rows ran several seeds)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="FILE.png", help="image to write (.png, .pdf or .svg)")
    g.add_argument("--title", default=None, help="figure title (default: the run folder or file name)")
    return p


def main(argv: list[str] | None = None) -> int:
    from minbert.cli import _run_user_command

    p = plot_parser()
    args = p.parse_args(argv)
    if bool(args.runs) == bool(args.experiments):
        p.error("give run folders or --experiments RESULTS.json (one of the two)")

    def go():
        if args.experiments:
            out = plot_experiments(args.experiments, args.out, args.title)
        else:
            out = plot_runs(args.runs, args.out, args.title)
        print(f"wrote {out}")

    return _run_user_command(go)


if __name__ == "__main__":
    raise SystemExit(main())
