"""Whether the runner may reuse what a run folder holds, checked for every run before anything is trained.

A finished run is read back (and an interrupted one resumed) only if its recorded settings (its args.json) equal
the settings its row would run with now (:func:`minbert.training.output_dir.setting_differences`): re-running a table into
the same --output_dir with another --data_dir or --profile, or a run copied into another row's folder, is one
line naming the run and the differing setting, never the old scores under the new settings. A finished run's
results.json is read strictly (:func:`read_run_results`): damaged JSON or a score outside its range is one line,
never a traceback or a number in an average.
"""
from __future__ import annotations

import math
from pathlib import Path

from minbert.io import first_line, read_json_file
from minbert.tasks.registry import OVERALL, OVERALL_RANGE, TASKS


def score_ranges() -> dict[str, tuple[float, float]]:
    """The range of each score a results.json may hold (accuracies and the overall score in [0, 1], Pearson r in
    [-1, 1]), of the tasks in the registry when asked (tasks of the user's own join it at run time)."""
    return {**{t: spec.metric_range for t, spec in TASKS.items()}, OVERALL: OVERALL_RANGE}


class RunnerError(ValueError):
    """A run folder cannot be used by the runner (one line naming it)."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_run_results(directory: Path) -> dict:
    """A finished run's results.json: {"dev": {score: value}, "wall_seconds": ..., "peak_rss_mb": ...}, every value
    checked."""
    path = Path(directory) / "results.json"
    try:
        results = read_json_file(path)
    except (OSError, ValueError) as e:
        raise RunnerError(f"cannot read {path}: {first_line(e)}") from None
    dev = results.get("dev") if isinstance(results, dict) else None
    if not isinstance(dev, dict) or not dev:
        raise RunnerError(f"{path}: not a run's results (expected an object with a \"dev\" object of scores)")
    ranges = score_ranges()
    for key, value in dev.items():
        if key not in ranges:
            raise RunnerError(f"{path}: dev.{key}: not a score of this package ({', '.join(ranges)})")
        low, high = ranges[key]
        if not _number(value) or not low <= value <= high:
            raise RunnerError(f"{path}: dev.{key}: {value!r} is not a score in [{low:g}, {high:g}]")
    wall = results.get("wall_seconds")
    if wall is not None and not (_number(wall) and wall >= 0):
        raise RunnerError(f"{path}: wall_seconds: {wall!r} is not a number of seconds")
    peak = results.get("peak_rss_mb")  # absent in runs written before 2026-12-03
    if peak is not None and not (_number(peak) and peak > 0):
        raise RunnerError(f"{path}: peak_rss_mb: {peak!r} is not a number of megabytes")
    return {"dev": dict(dev), "wall_seconds": wall, "peak_rss_mb": peak}


def check_reusable(name: str, directory: Path, config) -> None:
    """The run in ``directory`` (finished, or with an args.json to resume) was made with ``config``'s settings."""
    from minbert.training.output_dir import setting_differences

    args = Path(directory) / "args.json"
    if not args.exists():
        if (Path(directory) / "results.json").exists():
            raise RunnerError(f"{name}: {directory} holds a finished run without its args.json: its settings cannot "
                              "be checked; pass --overwrite_output_dir to re-train it")
        return
    try:
        saved = read_json_file(args)
    except (OSError, ValueError) as e:
        raise RunnerError(f"{name}: cannot read {args}: {first_line(e)}") from None
    if not isinstance(saved, dict):
        raise RunnerError(f"{name}: {args}: not a run's settings (expected a JSON object)")
    diffs = setting_differences(saved, config)
    if diffs:
        raise RunnerError(f"{name}: {directory} holds a run made with other settings ({diffs[0]}"
                          f"{f' and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); pass --overwrite_output_dir "
                          "to re-train it, or choose another --output_dir")


def row_config(name: str, argv: list[str]):
    """The validated RunConfig of a row's train_multitask.py arguments; a refusal is a RunnerError naming the
    row (in the runner's own words, not under train_multitask.py's usage)."""
    from minbert.cli import train_parser
    from minbert.training.run_config import ConfigError, RunConfig

    parser = train_parser()

    def refuse(message: str):
        raise RunnerError(f"{name}: {message}")

    parser.error = refuse  # argparse would print train_multitask.py's usage and exit
    try:
        return RunConfig.from_namespace(parser.parse_args(argv)).validate()
    except ConfigError as e:
        raise RunnerError(f"{name}: {e}") from None


def preflight(commands, overwrite: bool) -> None:
    """Before anything is created or trained: every run's arguments are valid and, unless ``overwrite``, every
    folder that holds a run holds one of these settings, with a readable results.json if it finished."""
    for row, seed, argv in commands:
        name = row.key if seed is None else f"{row.key} seed {seed}"
        config = row_config(name, argv)
        if overwrite:
            continue
        directory = Path(config.output.output_dir)
        check_reusable(name, directory, config)
        if (directory / "results.json").exists():
            read_run_results(directory)
