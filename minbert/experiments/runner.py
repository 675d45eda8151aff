"""Run the rows of a table through the normal training path, once per seed, and collect their scores.

Every run is a train_multitask.py command: parsed by the same argument parser, checked by the same checks and
run by the same training entry point (:func:`train_entry_point`), in its own folder. A folder that already holds a
finished run is not trained again (its results.json is read), an interrupted run is resumed, so an interrupted
table is continued by starting the same command again; ``overwrite`` re-runs everything.
"""
from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from minbert.experiments.profiles import BASELINE, PROFILES, ROWS, STEP_CAPS, ARCHITECTURES, Row, row_argv, same_run_key
from minbert.experiments.reuse import RunnerError, check_reusable, preflight, read_run_results, row_config
from minbert.experiments.stats import mean_std, paired_difference
from minbert.experiments.tables import paper_markdown
from minbert.io import atomic_write_text, finite_or_null, json_text, first_line
from minbert.tasks.metrics import overall_score
from minbert.tasks.registry import LEADERBOARD_TASKS, OVERALL
from minbert.training.metrics_log import peak_rss_mb
from minbert.training.precision import DEFAULT_BF16

log = logging.getLogger("minbert")
METRICS = (*LEADERBOARD_TASKS, OVERALL)


def train_entry_point():
    """The function that trains one run from its checked RunConfig; the one place it is imported."""
    from minbert.training.run import run

    return run


def _has_unfinished_run(directory: Path) -> bool:
    return any((directory / name).exists() for name in ("last", "args.json", "metrics.jsonl"))


def run_directory(argv: list[str]) -> Path:
    """The output folder of the run of these arguments (the runner always passes --output_dir)."""
    return Path(argv[argv.index("--output_dir") + 1])


def is_finished(argv: list[str]) -> bool:
    """The run of these arguments has finished (its results.json is written last, atomically)."""
    return (run_directory(argv) / "results.json").is_file()


def run_row(row: Row, argv: list[str], overwrite: bool) -> dict:
    """Train one run (or read its finished results); never raises for a failed run, records the error instead."""
    from minbert.cli import check_train_args, train_parser

    parser = train_parser()
    directory = run_directory(argv)
    if not overwrite and is_finished(argv):
        check_reusable(row.key, directory, row_config(row.key, argv))  # its settings are this row's
        results = read_run_results(directory)  # strictly: a damaged file is one line, not a number in the table
        log.info("%s: reusing the finished run in %s", row.key, directory)
        return {"dev": results["dev"], "wall_seconds": results["wall_seconds"], "peak_rss_mb": results["peak_rss_mb"],
                "reused": True}
    if overwrite:
        argv = argv + ["--overwrite_output_dir"]
    elif _has_unfinished_run(directory):
        argv = argv + ["--resume"]
    config = check_train_args(parser, parser.parse_args(argv))  # trained as checked: its combiner is built once
    log.info("%s (%s): train_multitask.py %s", row.key, row.name, shlex.join(argv))
    t0 = time.perf_counter()
    try:
        scores = train_entry_point()(config)
    except (ValueError, RuntimeError, MemoryError, OSError) as e:  # e.g. out of memory: record it, go on
        msg = first_line(e)
        log.error("%s failed: %s", row.key, msg)
        return {"dev": None, "error": f"{type(e).__name__}: {msg}", "wall_seconds": round(time.perf_counter() - t0, 1)}
    return {"dev": scores, "wall_seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak_rss_mb()}


def summarize_runs(runs: list[dict]) -> dict:
    """Mean and sample std of each score over a row's finished runs; the row's first error, its total wall time
    and the largest peak RSS of its runs (None where no run recorded one)."""
    done = [r["dev"] for r in runs if r.get("dev")]
    peaks = [r["peak_rss_mb"] for r in runs if r.get("peak_rss_mb") is not None and not r.get("same_run_as")]
    out: dict = {"n_runs": len(done), "dev": None, "std": None,
                 "error": next((r["error"] for r in runs if r.get("error")), None),
                 "wall_seconds": round(sum(r.get("wall_seconds") or 0 for r in runs if not r.get("same_run_as")), 1),
                 "peak_rss_mb": max(peaks) if peaks else None}
    if done:
        stats = {k: mean_std([d[k] for d in done]) for k in METRICS if all(k in d for d in done)}
        out["dev"] = {k: m for k, (m, _) in stats.items()}
        out["std"] = {k: s for k, (_, s) in stats.items()}
    return out


def overall_by_seed(row: dict) -> dict[int, float]:
    return {r["seed"]: r["dev"]["overall"] for r in row["runs"] if r.get("dev")}


@dataclass
class PaperRun:
    """The report's table under one profile; ``seeds`` None: one run per row with train_multitask.py's default seed,
    in ``output_dir/<row>`` (the layout of single-seed tables); else ``output_dir/<row>/seed<S>`` per seed."""
    profile: str
    output_dir: Path
    data_dir: str = "data"
    device: str = "auto"
    rows: tuple[Row, ...] = ROWS
    overwrite: bool = False
    seeds: tuple[int, ...] | None = None
    bf16: str = DEFAULT_BF16  # profiles.use_bf16
    collect_only: bool = False  # read the finished runs back and write the table; train nothing
    results: list[dict] = field(default_factory=list)

    def commands(self) -> list[tuple[Row, int | None, list[str]]]:
        return [(row, seed, row_argv(row, self.profile, self.data_dir, self.output_dir, self.device, seed, self.bf16))
                for row in self.rows for seed in (self.seeds or (None,))]

    def same_runs(self) -> dict[tuple[str, int | None], str]:
        """{(row, seed): the earlier row whose run has the same flags}: such a run is trained once (run)."""
        first: dict[str, str] = {}
        out = {}
        for row, seed, argv in self.commands():
            out_key = first.setdefault(same_run_key(argv), row.key)
            if out_key != row.key:
                out[(row.key, seed)] = out_key
        return out

    def run(self) -> list[dict]:
        from minbert.cli import train_parser

        default_seed = train_parser().get_default("seed")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results = [self._row_record(row) for row in self.rows]
        by_key = {r["key"]: r for r in self.results}
        trained: dict[str, tuple[str, dict]] = {}  # same_run_key -> (row key, outcome): rows that are one run
        for row, seed, argv in self.commands():
            same = same_run_key(argv)
            if self.collect_only and same not in trained and not is_finished(argv):
                continue  # not finished (yet): the row shows fewer runs
            if same in trained:  # e.g. the cpu profile's "+ Mean Pooling" row, mean pooling being the default there
                first, outcome = trained[same]
                outcome = {**outcome, "same_run_as": first, "reused": True}
                log.info("%s: the same run as %s (identical flags), not trained again", row.key, first)
            else:
                outcome = run_row(row, argv, self.overwrite)
                if outcome["dev"] and "overall" not in outcome["dev"]:
                    outcome["dev"]["overall"] = overall_score(outcome["dev"])
                trained[same] = (row.key, outcome)
            record = by_key[row.key]
            record["runs"].append({"seed": default_seed if seed is None else seed,
                                   "command": "python train_multitask.py " + shlex.join(argv), **outcome})
            self._summarize(record)
            self.write()  # after every run, so a long table's progress is on disk
        return self.results

    @staticmethod
    def _row_record(row: Row) -> dict:
        report = dict(zip(METRICS, row.report)) if row.report else None
        return {"key": row.key, "name": row.name, "note": row.note, "report": report, "runs": []}

    def _summarize(self, record: dict) -> None:
        record.update(summarize_runs(record["runs"]))
        record["command"] = record["runs"][0]["command"]
        if record["runs"][0].get("same_run_as"):
            record["same_run_as"] = record["runs"][0]["same_run_as"]
        base = next((r for r in self.results if r["key"] == BASELINE), None)
        for r in self.results:  # a new baseline run changes every row's comparison
            if r["runs"]:
                r["vs_baseline"] = (paired_difference(overall_by_seed(r), overall_by_seed(base))
                                    if base is not None and r["key"] != BASELINE else None)

    def table(self) -> str:
        return paper_markdown(self.results, self.seeds)

    def write(self) -> None:
        seeds = ", ".join(map(str, self.seeds)) if self.seeds else "the default seed"
        header = (f"# The report's dev table, profile `{self.profile}`, seeds: {seeds}\n\n"
                  f"Each score: mean ± sample std over seeds; the report's number after the slash (§5.4). STS is "
                  f"Pearson r; overall = (SST + QQP + (r + 1) / 2) / 3. Δ overall: this row minus Baseline, "
                  f"paired seed by seed, with a 95% t-interval over the per-seed differences; * marks an "
                  f"interval that excludes 0.\n\n")
        atomic_write_text(self.output_dir / "results.md", header + self.table() + "\n")
        payload = {"experiment": "paper", "profile": self.profile, "profile_flags": list(PROFILES[self.profile]),
                   "common_flags": list(ARCHITECTURES[self.profile]), "steps_per_epoch_cap": STEP_CAPS[self.profile],
                   "seeds": list(self.seeds) if self.seeds else None, "baseline": BASELINE, "rows": self.results}
        atomic_write_text(self.output_dir / "results.json", json_text(finite_or_null(payload)) + "\n")


def execute(experiment, print_commands: bool) -> int:
    """Print the runs' commands, or run them all and print the table; exit status 1 if a run failed."""
    if print_commands:
        same = experiment.same_runs() if hasattr(experiment, "same_runs") else {}
        for row, seed, row_args in experiment.commands():
            label = row.name if seed is None else f"{row.name}, seed {seed}"
            if (row.key, seed) in same:
                label += f" (the same run as {same[(row.key, seed)]}: trained once)"
            print(f"# {label}\npython train_multitask.py {shlex.join(row_args)}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        # No lock on the table folder: one runner per core on disjoint --rows is the documented way to use both
        # cores (docs/results.md). Each run locks its own folder (train_multitask.py), and the table files are
        # written atomically; a last --collect_only reads every finished run back.
        preflight(experiment.commands(), experiment.overwrite)  # nothing trained if a run folder cannot be used
        experiment.run()
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(experiment.table())
    print(f"\nwritten: {experiment.output_dir / 'results.json'}, {experiment.output_dir / 'results.md'}")
    runs = [run for r in experiment.results for run in r.get("runs", [r])]
    return 1 if any(r.get("error") for r in runs) else 0
