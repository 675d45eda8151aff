"""The table beyond the report: every multitask combiner on the same footing (issue 21).

    python -m minbert.experiments mtl --profile cpu --seeds 1,2,3

Each row is one ``--combiner`` (the report's four, then every torchjd method of :mod:`minbert.methods.mtl_methods` whose
solvers are installed); every other flag is the profile's Baseline row, so the rows share the learning rates,
schedule, data order (the seed), checkpoint selection (best dev epoch) and loss convention (each task's mean loss
over its batch) that Kurin et al. 2022 and Xin et al. 2022 ask a fair comparison to control. Every row trains
``MTL_ITERATIONS`` x the profile's steps (the cpu profile's 40 leave ``sum`` at the majority class on some seeds).
Each row shows mean ± std over seeds, its paired difference in overall score against Baseline and against
``sum`` (95% t-intervals) and its wall time. The runs go through :class:`.runner.PaperRun` (same folders,
resuming, --collect_only); only the rows, the second comparison and the header differ.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from minbert.experiments.profiles import ARCHITECTURES, BASELINE, PROFILES, ROWS, STEP_CAPS, Row
from minbert.experiments.runner import PaperRun, overall_by_seed
from minbert.experiments.stats import format_difference, paired_difference
from minbert.experiments.tables import paper_markdown
from minbert.io import atomic_write_text, finite_or_null, json_text
from minbert.methods.mtl_methods import METHODS, missing_solvers

MTL_ITERATIONS = 3  # x the profile's step cap (cpu: 120 steps), as the report's "3x Iterations" rows
SUM = "sum"
# the options a method cannot run without: the value its paper uses (CAGrad c = 0.4, Liu et al. 2021 §5;
# FairGrad alpha = 1, proportional fairness, Ban & Ji 2024) or a neutral one (equal preferences)
MTL_ARGS = {"cagrad": {"c": 0.4}, "fairgrad": {"alpha": 1.0}, "constant": {"weights": [1.0, 1.0, 1.0]},
            "stch": {"mu": 1.0}, "pbi": {"theta": 5.0, "weights": [1.0, 1.0, 1.0]},
            "cosmos": {"lambda_": 1.0, "weights": [1.0, 1.0, 1.0]}}


def mtl_rows() -> tuple[Row, ...]:
    """Baseline (the profile's, `individual`), sum, pcgrad, gse, then every torchjd method that can run here."""
    base = next(r for r in ROWS if r.key == BASELINE)
    rows = [Row(BASELINE, "Baseline (individual)", base.flags, None, MTL_ITERATIONS)]
    for name in ("sum", "pcgrad", "gse"):
        rows.append(Row(name, name, ("--combiner", name), None, MTL_ITERATIONS))
    for name, method in METHODS.items():
        if missing_solvers(method):
            continue  # the table says which were left out (mtl_skipped)
        args = ("--combiner_args", json.dumps(MTL_ARGS[name])) if name in MTL_ARGS else ()
        rows.append(Row(name, name, ("--combiner", name, *args), None, MTL_ITERATIONS, note=method.paper))
    return tuple(rows)


def mtl_skipped() -> list[str]:
    return [f"{name} (needs {', '.join(missing_solvers(m))})" for name, m in METHODS.items() if missing_solvers(m)]


MTL_ROW_KEYS = tuple(r.key for r in mtl_rows())


@dataclass
class MtlRun(PaperRun):
    """The combiners' table: PaperRun's runs, plus each row's paired difference against ``sum``."""

    def _summarize(self, record: dict) -> None:
        super()._summarize(record)
        ref = next((r for r in self.results if r["key"] == SUM), None)
        for r in self.results:
            if r["runs"]:
                r["vs_sum"] = (paired_difference(overall_by_seed(r), overall_by_seed(ref))
                               if ref is not None and r["key"] != SUM else None)

    def table(self) -> str:
        lines = paper_markdown(self.results, self.seeds).splitlines()
        lines[0] = lines[0].replace(" | wall s |", " | Δ overall vs sum [95% CI] | wall s | peak RSS MB |")
        lines[1] += "---|---|"
        for i, r in enumerate(self.results, start=2):
            if r["key"] == SUM:
                diff = "(reference)"
            elif "vs_sum" not in r:
                diff = "-"
            else:
                diff = format_difference(r["vs_sum"]) if r["vs_sum"] else "no sum run with these seeds"
            head, _, wall = lines[i].rstrip(" |").rpartition(" | ")
            peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
            lines[i] = f"{head} | {diff} | {wall} | {peak} |"
        return "\n".join(lines).replace(" / N/A", "")

    def write(self) -> None:
        seeds = ", ".join(map(str, self.seeds)) if self.seeds else "the default seed"
        skipped = mtl_skipped()
        header = (f"# Every combiner, profile `{self.profile}`, seeds: {seeds}\n\n"
                  f"Each row: one --combiner; everything else the profile's Baseline, {MTL_ITERATIONS}x its steps. "
                  f"Scores: mean ± sample std over seeds (STS: Pearson r; overall = (SST + QQP + (r + 1) / 2) / 3). "
                  f"Δ overall: paired seed by seed against Baseline and against sum, 95% t-interval; * marks an "
                  f"interval that excludes 0. wall s: the row's total run time (training and dev prediction, all seeds); "
                  f"peak RSS MB: the largest of its runs' peak resident memory (a process that trains several runs "
                  f"reports the peak of all so far; one run per process gives each run's own)."
                  + (f" Left out (solvers missing): {', '.join(skipped)}." if skipped else "") + "\n\n")
        atomic_write_text(self.output_dir / "results.md", header + self.table() + "\n")
        payload = {"experiment": "mtl", "profile": self.profile, "profile_flags": list(PROFILES[self.profile]),
                   "common_flags": list(ARCHITECTURES[self.profile]), "iterations": MTL_ITERATIONS,
                   "steps_per_epoch_cap": STEP_CAPS[self.profile], "seeds": list(self.seeds) if self.seeds else None,
                   "baseline": BASELINE, "second_reference": SUM, "left_out": skipped, "rows": self.results}
        atomic_write_text(self.output_dir / "results.json", json_text(finite_or_null(payload)) + "\n")


def mtl_main(p, args, seeds: tuple[int, ...] | None, check_collect_dir) -> int:
    """``python -m minbert.experiments mtl`` (called by .command with its parsed --seeds and its --collect_only
    check): --rows is a subset of the combiners (default: all of them)."""
    from pathlib import Path

    from minbert.experiments.runner import execute

    default_rows = p.get_default("rows")
    wanted = list(MTL_ROW_KEYS) if args.rows == default_rows else [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in MTL_ROW_KEYS]
    if unknown or not wanted:
        p.error(f"--rows: unknown row {', '.join(unknown) or args.rows!r} (choose from {', '.join(MTL_ROW_KEYS)})")
    if not Path(args.data_dir).is_dir():
        p.error(f"--data_dir {args.data_dir}: no such directory")
    if args.collect_only and args.overwrite_output_dir:
        p.error("--collect_only trains nothing; it cannot be combined with --overwrite_output_dir")
    out = Path(args.output_dir or f"runs/mtl-{args.profile}")
    check_collect_dir(p, args, out)
    run = MtlRun(args.profile, out, args.data_dir, args.device, tuple(r for r in mtl_rows() if r.key in wanted),
                 args.overwrite_output_dir, seeds, args.bf16, args.collect_only)
    return execute(run, args.print_commands)
