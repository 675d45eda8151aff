"""Re-run the CS224N report's dev table (Cortes, Hsieh, Fu: "An Exploration of Fine-Tuning Techniques on minBERT
Optimizations", §5.4) through the normal training path.

    python -m minbert.experiments paper --profile quick --output_dir runs/paper-quick

Each row of the table is a set of train_multitask.py flags; it is parsed by the same argument parser, checked by
the same checks and run by the same :func:`minbert.train.run`, in its own subdirectory of ``--output_dir``. The
results are printed as a Markdown table beside the report's numbers and written to ``results.json`` and
``results.md``. A row whose subdirectory already holds a finished run is not trained again (its results.json is
read), and an interrupted row is resumed, so an interrupted table can simply be started again;
``--overwrite_output_dir`` re-runs everything. ``--print_commands`` prints the equivalent train_multitask.py
command of every row without running anything.

The M-FAC cards' comparison (docs/mfac.md), Adam vs M-FAC over five seeds, mean ± std:

    python -m minbert.experiments mfac --setting sst2 --profile quick        # (a) SST-2, single task
    python -m minbert.experiments mfac --setting multitask --profile quick   # (b) the three CS224N tasks

Profiles (the settings common to every row; the rows add their own flags):

* ``full``: the report's protocol (§5.3): learning rate 1e-5, 10 epochs, batch size 8, so one epoch is 755 steps
  (6,040 STS training pairs / 8; the smallest task) and 3 x 755 for the "3x iterations" rows; [CLS] pooling
  (the pooler output), the [u; v] paraphrase layer; all training data (the two unlabeled QQP rows skipped). The
  encoder is the embedded all-MiniLM-L6-v2 (d = 384), the only pretrained encoder here; the report fine-tuned
  BERT-base (d = 768). Schedule, weight decay and dropout are this package's defaults (the report does not state
  them). Meant for a GPU.
* ``quick``: the same rows on this CPU in 71.5 minutes on one core (docs/results.md): minilm-l6, batch 16, learning rate 1e-4 for the
  encoder and 1e-3 for the heads (at 15 steps an epoch with one learning rate 1e-4, SST and QQP never left the
  majority class: docs/results.md), one epoch of 45 steps (``--max_steps_per_epoch 45``; 135 for the 3x rows)
  drawn from all the training data (no ``--max_train_samples``: no task is cycled, every batch is new), bf16
  autocast except in the SMART rows (SMART's 1e-5 perturbation is below bfloat16's resolution), dev and test cut
  to their first 400 rows per task (``--max_eval_samples 400``; the scores are on those dev rows).
* ``smoke``: bert-tiny (random weights) on 16 training and 8 dev/test rows per task, 1 epoch of 1 step (3 for the
  3x rows): checks that every row runs, in well under a minute. Its scores mean nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .io import atomic_write_text
from .metrics import overall_score

log = logging.getLogger("minbert")

QUICK_STEPS = 45
QUICK_EVAL = 400

# Flags shared by every row: the report's architecture (pooler output of [CLS], a linear layer on [u; v] for
# paraphrase, a linear layer on [u; v] for STS) unless a row changes it.
COMMON = ("--pooling", "cls", "--para_head", "uv", "--sts_head", "linear")

PROFILES: dict[str, tuple[str, ...]] = {
    # The report uses one learning rate for the encoder and the heads.
    "full": ("--model_name_or_path", "minilm-l6", "--learning_rate", "1e-5", "--head_learning_rate", "1e-5",
             "--num_train_epochs", "10",
             "--per_device_train_batch_size", "8", "--skip_bad_rows"),
    # Short runs need the heads to move fast: the heads get 1e-3 (the encoder 1e-4). One epoch of QUICK_STEPS
    # batches of 16, with bf16 autocast (BF16_PROFILES) except in the SMART rows.
    "quick": ("--model_name_or_path", "minilm-l6", "--learning_rate", "1e-4", "--head_learning_rate", "1e-3",
              "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
              "--max_eval_samples", str(QUICK_EVAL), "--skip_bad_rows"),
    "smoke": ("--model_name_or_path", "bert-tiny", "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
              "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_eval_batch_size", "8",
              "--skip_bad_rows"),
}
# Profiles trained with --bf16 (about 1.5x faster on this CPU), except rows with --smart: SMART's 1e-5
# perturbation is below bfloat16's resolution, so those rows run in float32.
BF16_PROFILES = {"quick"}
# Steps per epoch of a 1x row, where the profile caps it (the 3x rows get three times as many).
STEP_CAPS = {"full": None, "quick": QUICK_STEPS, "smoke": 1}


@dataclass(frozen=True)
class Row:
    key: str  # output subdirectory
    name: str  # the report's row name
    flags: tuple[str, ...]
    report: tuple[float, float, float, float] | None  # the report's dev SST acc, QQP acc, STS r, overall
    iterations: int = 1  # the "3x iterations" rows: --iterations_multiplier 3
    note: str = ""


GSE = ("--combiner", "gse")
# The report's dev table (§5.4). Extension 2 (cosine heads, mean pooling) is built on GSE (§5.3.3). The SMART row
# (§5.3.4 3a) adds the regularizer "to each individual task's loss" of the baseline: the report lists SMART on
# GSE as a separate row (3b, which ran out of memory), so 3a is not on GSE. The 3x rows repeat the three best
# rows (GSE, cosine 2d+1 on GSE, SMART) with three times the iterations per epoch (§5.3.5).
ROWS: tuple[Row, ...] = (
    Row("baseline", "Baseline", ("--combiner", "individual"), (0.512, 0.731, 0.361, 0.641),
        note="each task stepped on its own, in turn"),
    Row("multitask", "Multitask Learning", ("--combiner", "sum"), (0.511, 0.727, 0.341, 0.636)),
    Row("multitask_gs", "Multitask Learning w/ GS", ("--combiner", "pcgrad"), (0.510, 0.718, 0.378, 0.639)),
    Row("multitask_gse", "Multitask Learning w/ GSE", GSE, (0.507, 0.748, 0.353, 0.644)),
    Row("cosine_embedding", "Cosine Embeddings Loss", GSE + ("--sts_head", "cosine_embedding"),
        (0.510, 0.706, 0.103, 0.589)),
    Row("cosine_d", "Cosine Similarity (d features)", GSE + ("--sts_head", "cosine"), (0.508, 0.730, 0.185, 0.610)),
    Row("cosine_2d1", "Cosine Similarity (2d+1 features)", GSE + ("--sts_head", "cosine_2d1"),
        (0.510, 0.737, 0.365, 0.643)),
    Row("cosine_2d1_mean", "Cosine Similarity (2d+1 features) + Mean Pooling",
        GSE + ("--sts_head", "cosine_2d1", "--pooling", "mean"), (0.499, 0.747, 0.357, 0.641)),
    Row("smart", "SMART Loss", ("--combiner", "individual", "--smart"), (0.487, 0.750, 0.376, 0.642),
        note="SMART on the baseline's per-task steps"),
    Row("smart_gse", "SMART Loss w/ GSE", GSE + ("--smart",), None, note="the report's run ran out of memory"),
    Row("gse_3x", "GSE w/ 3x Iterations", GSE, (0.489, 0.762, 0.362, 0.644), iterations=3),
    Row("cosine_2d1_3x", "Cosine Similarity (2d+1 features) w/ 3x Iterations", GSE + ("--sts_head", "cosine_2d1"),
        (0.499, 0.761, 0.379, 0.650), iterations=3),
    Row("smart_3x", "SMART Loss w/ 3x Iterations", ("--combiner", "individual", "--smart"),
        (0.507, 0.758, 0.376, 0.651), iterations=3),
)
ROW_KEYS = tuple(r.key for r in ROWS)


def row_argv(row: Row, profile: str, data_dir: str, output_dir: Path, device: str) -> list[str]:
    """The train_multitask.py arguments of one row under one profile."""
    common = [(COMMON[i], COMMON[i + 1]) for i in range(0, len(COMMON), 2) if COMMON[i] not in row.flags]
    argv = [*PROFILES[profile], *(x for pair in common for x in pair), *row.flags]  # a row's flag replaces COMMON's
    if row.iterations != 1:
        argv += ["--iterations_multiplier", str(row.iterations)]
    if STEP_CAPS[profile] is not None:
        argv += ["--max_steps_per_epoch", str(STEP_CAPS[profile] * row.iterations)]
    if profile in BF16_PROFILES and "--smart" not in row.flags:
        argv += ["--bf16"]
    argv += ["--data_dir", data_dir, "--output_dir", str(output_dir / row.key), "--device", device]
    return argv


def _has_unfinished_run(directory: Path) -> bool:
    return any((directory / name).exists() for name in ("last", "args.json", "metrics.jsonl"))


def run_row(row: Row, argv: list[str], overwrite: bool) -> dict:
    """Train one row (or read its finished results); never raises for a failed row, records the error instead."""
    from .cli import check_train_args, train_parser
    from .train import run

    parser = train_parser()
    directory = Path(argv[argv.index("--output_dir") + 1])
    if not overwrite and (directory / "results.json").is_file():
        results = json.loads((directory / "results.json").read_text(encoding="utf-8"))
        log.info("%s: reusing the finished run in %s", row.key, directory)
        return {"dev": results["dev"], "wall_seconds": results.get("wall_seconds"), "reused": True}
    if overwrite:
        argv = argv + ["--overwrite_output_dir"]
    elif _has_unfinished_run(directory):
        argv = argv + ["--resume"]
    args = parser.parse_args(argv)
    check_train_args(parser, args)
    log.info("%s (%s): train_multitask.py %s", row.key, row.name, shlex.join(argv))
    t0 = time.perf_counter()
    try:
        scores = run(args)
    except (ValueError, RuntimeError, MemoryError, OSError) as e:  # e.g. out of memory: record it, go on
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.error("%s failed: %s", row.key, msg)
        return {"dev": None, "error": f"{type(e).__name__}: {msg}", "wall_seconds": round(time.perf_counter() - t0, 1)}
    return {"dev": scores, "wall_seconds": round(time.perf_counter() - t0, 1)}


def _cell(ours: float | None, report: float | None) -> str:
    a = f"{ours:.3f}" if ours is not None else "-"
    b = f"{report:.3f}" if report is not None else "N/A"
    return f"{a} / {b}"


def markdown_table(results: list[dict]) -> str:
    """One line per row: ours / the report's, for SST accuracy, QQP accuracy, STS Pearson r and the overall score."""
    lines = ["| model | SST acc | QQP acc | STS r | overall | wall s |", "|---|---|---|---|---|---|"]
    for r in results:
        report = r["report"] or {}
        ours = r["dev"] or {}
        cells = [_cell(ours.get(k), report.get(k)) for k in ("sst", "qqp", "sts", "overall")]
        if r.get("error"):
            cells[-1] += f" (failed: {r['error']})"
        wall = f"{r['wall_seconds']:.0f}" if r.get("wall_seconds") is not None else "-"
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


@dataclass
class PaperRun:
    profile: str
    output_dir: Path
    data_dir: str = "data"
    device: str = "auto"
    rows: tuple[Row, ...] = ROWS
    overwrite: bool = False
    results: list[dict] = field(default_factory=list)

    def commands(self) -> list[tuple[Row, list[str]]]:
        return [(row, row_argv(row, self.profile, self.data_dir, self.output_dir, self.device)) for row in self.rows]

    def run(self) -> list[dict]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results = []
        for row, argv in self.commands():
            outcome = run_row(row, argv, self.overwrite)
            report = dict(zip(("sst", "qqp", "sts", "overall"), row.report)) if row.report else None
            if outcome["dev"] and "overall" not in outcome["dev"]:
                outcome["dev"]["overall"] = overall_score(outcome["dev"])
            self.results.append({"key": row.key, "name": row.name, "note": row.note,
                                 "command": "python train_multitask.py " + shlex.join(argv),
                                 "report": report, **outcome})
            self.write()  # after every row, so a long table's progress is on disk
        return self.results

    def table(self) -> str:
        return markdown_table(self.results)

    def write(self) -> None:
        table = self.table()
        header = (f"# The report's dev table, profile `{self.profile}`\n\n"
                  f"Each cell: ours / the report's (§5.4). STS is Pearson r; overall = (SST + QQP + (r + 1) / 2) / 3."
                  f"\n\n")
        atomic_write_text(self.output_dir / "results.md", header + table + "\n")
        payload = {"experiment": "paper", "profile": self.profile, "profile_flags": list(PROFILES[self.profile]),
                   "common_flags": list(COMMON), "steps_per_epoch_cap": STEP_CAPS[self.profile],
                   "rows": self.results}
        atomic_write_text(self.output_dir / "results.json", json.dumps(payload, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# The M-FAC model cards' comparison (../shared/seeds cards; Frantar, Kurtic, Alistarh 2021): Adam vs M-FAC,
# five seeds each, mean ± std. The cards fine-tune BERT-mini with HF run_glue and swap only the optimizer:
# batch 32, learning rate 1e-4, max length 128, linear decay without warmup or weight decay (run_glue's defaults),
# M-FAC with num_grads 1024 and damp 1e-6.

CARD_SEEDS = (1234, 1235, 1236, 1237, 1238)  # the SST-2 card's seed, then the next four
# num_grads 1024 over all 22.7M parameters of the embedded encoder needs 93 GB as a dense window: stored top-1%
# sparse with error feedback (Modoranu et al. 2023) it needs 1.9 GB (docs/mfac.md).
CARD_MFAC_ARGS = '{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6, "sparsity_k": 0.01}'
CARD_OPTIMIZERS = {"adam": ("--optim", "adamw"), "mfac": ("--optim", "mfac", "--optim_args", CARD_MFAC_ARGS)}

CARD_SETTINGS: dict[str, dict[str, tuple[str, ...]]] = {
    # (a) SST-2 single task, as on the SST-2 card: the pooler output of [CLS] into a linear layer, one learning rate.
    "sst2": {
        "common": ("--tasks", "sst2", "--model_name_or_path", "minilm-l6", "--pooling", "cls",
                   "--learning_rate", "1e-4", "--head_learning_rate", "1e-4", "--per_device_train_batch_size", "32",
                   "--max_seq_length", "128", "--weight_decay", "0", "--warmup_ratio", "0", "--skip_bad_rows"),
        "full": ("--num_train_epochs", "3"),
        "quick": ("--num_train_epochs", "1"),
        "smoke": ("--model_name_or_path", "bert-tiny", "--max_train_samples", "32", "--max_eval_samples", "16",
                  "--per_device_train_batch_size", "8", "--num_train_epochs", "1"),
    },
    # (b) the multitask benchmark: the main job's model (README defaults) with one step on the summed loss, so each
    # M-FAC window row is one full multitask gradient.
    "multitask": {
        "common": ("--model_name_or_path", "minilm-l6", "--combiner", "sum", "--learning_rate", "1e-4",
                   "--per_device_train_batch_size", "32", "--skip_bad_rows"),
        "full": ("--num_train_epochs", "3"),
        "quick": ("--num_train_epochs", "1", "--max_steps_per_epoch", "60", "--max_eval_samples", "1000"),
        "smoke": ("--model_name_or_path", "bert-tiny", "--max_train_samples", "32", "--max_eval_samples", "16",
                  "--per_device_train_batch_size", "8", "--num_train_epochs", "1"),
    },
}


def card_rows(setting: str, profile: str, seeds: tuple[int, ...]) -> tuple[Row, ...]:
    flags = CARD_SETTINGS[setting]["common"] + CARD_SETTINGS[setting][profile]
    return tuple(Row(f"{opt}-seed{seed}", f"{opt} seed {seed}", flags + opt_flags + ("--seed", str(seed)), None)
                 for seed in seeds for opt, opt_flags in CARD_OPTIMIZERS.items())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1), as "mean ± std over 5 runs" is usually reported."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


@dataclass
class CardsRun:
    setting: str
    profile: str
    output_dir: Path
    seeds: tuple[int, ...] = CARD_SEEDS
    data_dir: str = "data"
    device: str = "auto"
    overwrite: bool = False
    results: list[dict] = field(default_factory=list)

    def commands(self) -> list[tuple[Row, list[str]]]:
        out = []
        for row in card_rows(self.setting, self.profile, self.seeds):
            argv = [*row.flags, "--data_dir", self.data_dir, "--output_dir", str(self.output_dir / row.key),
                    "--device", self.device]
            out.append((row, argv))
        return out

    def run(self) -> list[dict]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results = []
        for row, argv in self.commands():
            outcome = run_row(row, argv, self.overwrite)
            optimizer, seed = row.key.split("-seed")
            self.results.append({"key": row.key, "optimizer": optimizer, "seed": int(seed),
                                 "command": "python train_multitask.py " + shlex.join(argv), **outcome})
            self.write()
        return self.results

    def summary(self) -> dict[str, dict[str, tuple[float, float, int]]]:
        """{optimizer: {metric: (mean, std, runs)}} over the finished runs."""
        out: dict[str, dict[str, tuple[float, float, int]]] = {}
        for opt in CARD_OPTIMIZERS:
            runs = [r["dev"] for r in self.results if r["optimizer"] == opt and r.get("dev")]
            if runs:
                keys = [k for k in runs[0] if not (k == "overall" and len(runs[0]) == 2)]  # one task: overall = it
                out[opt] = {k: (*mean_std([d[k] for d in runs]), len(runs)) for k in keys}
        return out

    def table(self) -> str:
        summary = self.summary()
        metrics = next(iter(summary.values())).keys() if summary else []
        lines = ["| optimizer | runs | " + " | ".join(f"dev {m} (%)" for m in metrics) + " | mean wall s |",
                 "|---" * (len(metrics) + 3) + "|"]
        for opt, stats in summary.items():
            walls = [r["wall_seconds"] for r in self.results if r["optimizer"] == opt and r.get("dev")]
            n = next(iter(stats.values()))[2]
            cells = [f"{100 * mu:.2f} ± {100 * sd:.2f}" for mu, sd, _ in stats.values()]
            lines.append(f"| {opt} | {n} | " + " | ".join(cells) + f" | {sum(walls) / len(walls):.0f} |")
        return "\n".join(lines)

    def write(self) -> None:
        header = (f"# Adam vs M-FAC, setting `{self.setting}`, profile `{self.profile}`\n\n"
                  f"Mean ± sample std over seeds {', '.join(map(str, self.seeds))} (STS is Pearson r x 100).\n\n")
        atomic_write_text(self.output_dir / "results.md", header + self.table() + "\n")
        payload = {"experiment": "mfac", "setting": self.setting, "profile": self.profile,
                   "flags": list(CARD_SETTINGS[self.setting]["common"] + CARD_SETTINGS[self.setting][self.profile]),
                   "optimizers": {k: list(v) for k, v in CARD_OPTIMIZERS.items()},
                   "summary": {o: {k: {"mean": m, "std": s, "runs": n} for k, (m, s, n) in st.items()}
                               for o, st in self.summary().items()},
                   "runs": self.results}
        atomic_write_text(self.output_dir / "results.json", json.dumps(payload, indent=2) + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minbert.experiments",
                                description="Re-run the CS224N report's dev table (see docs/multitask.md) or the M-FAC "
                                            "cards' Adam vs M-FAC comparison (see docs/mfac.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiment", choices=["paper", "mfac"],
                   help="paper: every row of the report's dev table (section 5.4); mfac: Adam vs M-FAC over seeds")
    p.add_argument("--profile", choices=list(PROFILES), default="quick",
                   help="full: the report's protocol (GPU); quick: under an hour on a 2-core CPU; "
                        "smoke: under a minute")
    p.add_argument("--output_dir", default=None,
                   help="default: runs/paper-PROFILE or runs/mfac-SETTING-PROFILE; one subdirectory per run")
    p.add_argument("--data_dir", default="data", help="folder holding the CS224N task files")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--rows", default=",".join(ROW_KEYS),
                   help="paper: comma-separated subset of the rows, in table order")
    p.add_argument("--setting", choices=list(CARD_SETTINGS), default="sst2",
                   help="mfac: sst2 (single task, the SST-2 card) or multitask (the three CS224N tasks)")
    p.add_argument("--seeds", default=",".join(map(str, CARD_SEEDS)), help="mfac: comma-separated seeds")
    p.add_argument("--overwrite_output_dir", action="store_true", help="re-run rows that already finished")
    p.add_argument("--print_commands", action="store_true",
                   help="print each row's train_multitask.py command and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would write the tables and pick rows on its own
        p.error("run python -m minbert.experiments as one process, not under torchrun (the rows run one by one)")
    wanted = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in ROW_KEYS]
    if unknown or not wanted:
        p.error(f"--rows: unknown row {', '.join(unknown) or args.rows!r} (choose from {', '.join(ROW_KEYS)})")
    if not Path(args.data_dir).is_dir():
        p.error(f"--data_dir {args.data_dir}: no such directory")
    if args.experiment == "mfac":
        return cards_main(p, args)
    paper = PaperRun(args.profile, Path(args.output_dir or f"runs/paper-{args.profile}"), args.data_dir, args.device,
                     tuple(r for r in ROWS if r.key in wanted), args.overwrite_output_dir)
    return execute(paper, args.print_commands)


def execute(experiment: "PaperRun | CardsRun", print_commands: bool) -> int:
    """Print the runs' commands, or run them all and print the table; exit status 1 if a run failed."""
    if print_commands:
        for row, row_args in experiment.commands():
            print(f"# {row.name}\npython train_multitask.py {shlex.join(row_args)}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    experiment.run()
    print(experiment.table())
    print(f"\nwritten: {experiment.output_dir / 'results.json'}, {experiment.output_dir / 'results.md'}")
    return 1 if any(r.get("error") for r in experiment.results) else 0


def cards_main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        seeds = tuple(dict.fromkeys(int(x) for x in args.seeds.split(",") if x.strip()))
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if not seeds:
        p.error("--seeds: no seed given")
    out = Path(args.output_dir or f"runs/mfac-{args.setting}-{args.profile}")
    cards = CardsRun(args.setting, args.profile, out, seeds, args.data_dir, args.device, args.overwrite_output_dir)
    return execute(cards, args.print_commands)


if __name__ == "__main__":
    raise SystemExit(main())
