"""Command-line entry points: minbert-train (train_multitask.py) and minbert-evaluate (evaluate.py).

User mistakes (bad flags, bad files, missing packages) end with one line on stderr and a non-zero exit status,
never a traceback. Set MINBERT_DEBUG=1 to see the traceback anyway.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from minbert.io import finite_or_null, json_text
from minbert.io.settings import add_arguments
from minbert.tasks.data import DEFAULT_TASKS, TASKS
from minbert.tasks.metrics import format_scores  # noqa: F401  (re-exported: it lived here)
from minbert.training.config_file import apply_config_file  # noqa: F401  (re-exported: --config, as train_main reads it)
from minbert.training.run_config import ConfigError, RunConfig


def train_parser() -> argparse.ArgumentParser:
    """train_multitask.py's flags, derived from the settings dataclasses that RunConfig composes (each flag's name,
    default, help, choices and reader are declared once, on its field: minbert.io.settings)."""
    p = argparse.ArgumentParser(
        prog="train_multitask.py",
        description="Fine-tune a BERT encoder on SST, QQP and STS at once; write checkpoints, the six CS224N "
                    "prediction files and the dev scores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p, RunConfig)
    return p


def check_train_args(p: argparse.ArgumentParser, args: argparse.Namespace,
                     from_file: dict[str, str] | None = None) -> RunConfig:
    """The validated RunConfig of parsed flags (``from_file``: the keys a --config file set); a wrong setting
    ends like a flag mistake (argparse's usage and one error line, exit 2), or with one line naming the config
    file and key (exit 2)."""
    try:
        return RunConfig.from_namespace(args, from_file).validate()
    except ConfigError as e:
        if e.from_file:
            p.exit(2, f"error: {e}\n")
        p.error(str(e))


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)


def _run_user_command(fn, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    from minbert.tasks.data import DataError
    from minbert.model.embedded import EmbeddedModelError

    try:
        fn()
    except (DataError, EmbeddedModelError, ValueError, OSError, MemoryError, *user_errors) as e:
        if os.environ.get("MINBERT_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a TrainingInterrupted says where the run stopped and how to resume
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    return 0


def train_main(argv: list[str] | None = None) -> int:
    p = train_parser()
    from_file = apply_config_file(p, argv)
    config = check_train_args(p, p.parse_args(argv), from_file)
    _setup_logging()
    from minbert.training.run import run
    from minbert.training.trainer import NonFiniteError

    return _run_user_command(lambda: run(config), user_errors=(NonFiniteError,))


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description="Score CS224N prediction files against the gold labels. "
                                "STS Pearson r of constant predictions is undefined: it is counted as r = 0, with a "
                                "warning naming the file. The overall score (the leaderboard's (SST + QQP + (r + 1) / "
                                "2) / 3) is printed only when SST, QQP and STS are all scored; with fewer tasks there "
                                "is no overall, in the table, --json, --ci or --compare.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--predictions", required=True,
                   help=f"folder holding the prediction files ({TASKS[DEFAULT_TASKS[0]].prediction_file('dev')} and "
                        "friends, e.g. RUN/predictions)")
    g.add_argument("--data_dir", default="data", help="folder holding the task files (gold labels)")
    g.add_argument("--task_spec", metavar="FILE.json", default=None, help="tasks of your own to score (default: the "
                   "spec stored in the run's args.json beside PREDICTIONS, if any; docs/tasks.md)")
    g.add_argument("--skip_bad_rows", action="store_true",
                   help="skip malformed gold rows (each named in a warning) instead of stopping")
    g.add_argument("--allow_partial", action="store_true",
                   help="score only the ids present (runs made with --max_eval_samples)")
    g = p.add_argument_group("uncertainty (minbert/tasks/significance.py)")
    g.add_argument("--ci", action="store_true",
                   help="add a 95%% bootstrap confidence interval to every dev score (each task's dev examples "
                        "resampled, fixed seed, 2000 resamples); a task needs 2 dev rows at least, and below 30 "
                        "(significance.MIN_RELIABLE) a warning says its interval is unreliable. The predictions of a "
                        "run's best epoch were chosen on these dev rows, so their score and its interval are "
                        "optimistic (results.json keeps the last epoch's as dev_last); a one-epoch run, like the "
                        "experiments' rows, had no such choice")
    g.add_argument("--compare", metavar="B", default=None,
                   help="a second prediction folder over the same dev examples: the paired difference "
                        "PREDICTIONS - B of every dev score, its 95%% paired-bootstrap interval and p-value")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true",
                   help="print the scores as JSON instead of a Markdown table (with --ci also \"dev_ci\": "
                        "{score: [low, high]}; with --compare also \"compare\": {score: {diff, ci, p, a, b}})")
    return p


def evaluate_main(argv: list[str] | None = None) -> int:
    p = evaluate_parser()
    args = p.parse_args(argv)
    from minbert.tasks.predict import score_prediction_dir

    def go():
        from minbert.tasks.user_tasks import declare, read_task_spec, stored_task_spec

        declare(read_task_spec(args.task_spec) if args.task_spec else stored_task_spec(Path(args.predictions).parent))
        results = score_prediction_dir(args.predictions, args.data_dir, args.allow_partial, args.skip_bad_rows)
        extra = {}
        if args.ci or args.compare:
            from minbert.tasks import significance as sig

            dev = sig.read_dev_predictions(args.predictions, args.data_dir, args.allow_partial, args.skip_bad_rows)
            if not dev:
                raise ValueError(f"--{'ci' if args.ci else 'compare'}: {args.predictions} has no dev predictions "
                                 "with gold labels")
            for message in sig.check_sample_sizes(dev, "--ci" if args.ci else "--compare"):
                print(f"warning: {message}", file=sys.stderr)
            if args.ci:
                extra["dev_ci"] = sig.confidence_intervals(dev)
            if args.compare:
                # B passes A's checks too. Partial folders are first checked to cover the same examples, so that
                # a mismatch is one line rather than B's partial-scoring warnings and then the error.
                if not args.allow_partial:
                    score_prediction_dir(args.compare, args.data_dir, False, args.skip_bad_rows)
                other = sig.read_dev_predictions(args.compare, args.data_dir, args.allow_partial, args.skip_bad_rows)
                sig.check_same_examples(dev, other, args.predictions, args.compare)
                if args.allow_partial:
                    score_prediction_dir(args.compare, args.data_dir, True, args.skip_bad_rows)
                extra["compare"] = sig.paired_comparison(dev, other, args.predictions, args.compare)
        if args.json:
            print(json_text(finite_or_null({**results, **extra})))
            return
        print(format_scores(results) if results else "prediction files are valid; no gold labels to score them against")
        if "dev_ci" in extra:
            print("\n" + sig.format_intervals(results["dev"], extra["dev_ci"]))
        if "compare" in extra:
            print("\n" + sig.format_comparison(extra["compare"], args.predictions, args.compare))

    return _run_user_command(go)
