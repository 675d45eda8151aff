"""Command-line entry points: minbert-train (train_multitask.py) and minbert-evaluate (evaluate.py).

User mistakes (bad flags, bad files, missing packages) end with one line on stderr and a non-zero exit status,
never a traceback. Set MINBERT_DEBUG=1 to see the traceback anyway.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import PRESETS
from .data import TASKS

POOLINGS = ("cls", "mean", "max")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task {', '.join(bad) or text!r} (choose from {', '.join(TASKS)})")
    return list(dict.fromkeys(tasks))


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_multitask.py",
        description="Fine-tune a BERT encoder on SST, QQP and STS at once; write checkpoints, the six CS224N "
                    "prediction files and the dev scores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", default="minilm-l6",
                   help=f"a preset ({', '.join(PRESETS)}; only minilm-l6 has pretrained weights) or a Hugging Face "
                        "model directory (config.json + model.safetensors or pytorch_model.bin + vocab)")
    g.add_argument("--pooling", choices=POOLINGS, default="mean", help="sentence embedding for every task")
    g.add_argument("--sts_head", default="linear", help="STS head (linear)")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="data", help="folder holding the CS224N task files")
    g.add_argument("--tasks", type=_tasks, default=list(TASKS), help="comma-separated tasks: sst,qqp,sts")
    g.add_argument("--max_seq_length", type=_positive_int, default=128, help="truncate longer inputs")
    g.add_argument("--max_train_samples", type=_positive_int, default=None, help="first N training rows per task")
    g.add_argument("--max_eval_samples", type=_positive_int, default=None,
                   help="first N dev/test rows per task (prediction files then hold only those)")
    g.add_argument("--skip_bad_rows", action="store_true", help="skip malformed rows (counted and reported) instead of stopping")
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=11711)
    g.add_argument("--per_device_train_batch_size", type=_positive_int, default=32)
    g.add_argument("--per_device_eval_batch_size", type=_positive_int, default=128)
    g.add_argument("--learning_rate", type=_nonneg_float, default=1e-4)
    g.add_argument("--num_train_epochs", type=_positive_int, default=3)
    g.add_argument("--max_steps_per_epoch", type=_positive_int, default=None, help="cap the steps of an epoch (quick runs)")
    g.add_argument("--weight_decay", type=_nonneg_float, default=0.01)
    g.add_argument("--warmup_ratio", type=_nonneg_float, default=0.1)
    g.add_argument("--max_grad_norm", type=_nonneg_float, default=1.0, help="clip the gradient norm (0: off)")
    g.add_argument("--max_bad_steps", type=int, default=10, help="stop after more than N non-finite steps in a row")
    g.add_argument("--logging_steps", type=_positive_int, default=50)
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g = p.add_argument_group("multitask")
    g.add_argument("--combiner", default="individual", help="individual (round-robin per-task steps), sum")
    g.add_argument("--iterations_multiplier", type=_positive_int, default=1,
                   help="an epoch has K x (smallest task's batches) steps")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optim", default="adamw", type=str.lower, help="adamw or mfac")
    g.add_argument("--optim_args", default=None,
                   help="optimizer options, JSON or 'key: value, ...' (e.g. 'lr: 1e-4, num_grads: 1024, damp: 1e-6')")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="runs/default")
    g.add_argument("--overwrite_output_dir", action="store_true", help="replace a finished run in --output_dir")
    g.add_argument("--predict_only", action="store_true", help="no training: predict with --checkpoint")
    g.add_argument("--checkpoint", default=None, help="a minbert checkpoint directory (e.g. runs/default/best)")
    return p


def check_train_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.predict_only and not args.checkpoint:
        p.error("--predict_only needs --checkpoint DIR")
    if not os.path.isdir(args.data_dir):
        p.error(f"--data_dir {args.data_dir}: no such directory")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        p.error(f"--device {args.device}: choose auto, cpu or cuda")
    from .combiners import COMBINERS
    from .heads import STS_HEADS

    if args.combiner not in COMBINERS:
        p.error(f"--combiner {args.combiner}: choose from {', '.join(COMBINERS)}")
    if args.sts_head not in STS_HEADS:
        p.error(f"--sts_head {args.sts_head}: choose from {', '.join(STS_HEADS)}")
    name = args.model_name_or_path
    if name not in PRESETS and not os.path.isdir(name):
        p.error(f"--model_name_or_path {name}: not a preset ({', '.join(PRESETS)}) nor a directory")


def format_scores(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per split, columns SST / QQP / STS / overall."""
    cols = [("sst", "SST acc"), ("qqp", "QQP acc"), ("sts", "STS r"), ("overall", "overall")]
    lines = ["| split | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for split, scores in results.items():
        cells = [f"{scores[k]:.4f}" if k in scores else "-" for k, _ in cols]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)


def _run_user_command(fn) -> int:
    from .data import DataError
    from .embedded import EmbeddedModelError

    try:
        fn()
    except (DataError, EmbeddedModelError, ValueError, OSError, MemoryError) as e:
        if os.environ.get("MINBERT_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def train_main(argv: list[str] | None = None) -> int:
    p = train_parser()
    args = p.parse_args(argv)
    check_train_args(p, args)
    _setup_logging()
    from .train import run

    return _run_user_command(lambda: run(args))


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description="Score CS224N prediction files against the gold labels.")
    p.add_argument("--predictions", required=True, help="folder holding sst-dev-output.csv and friends")
    p.add_argument("--data_dir", default="data", help="folder holding the task files (gold labels)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--allow_partial", action="store_true",
                   help="score only the ids present (runs made with --max_eval_samples)")
    return p


def evaluate_main(argv: list[str] | None = None) -> int:
    p = evaluate_parser()
    args = p.parse_args(argv)
    from .predict import score_prediction_dir

    def go():
        results = score_prediction_dir(args.predictions, args.data_dir, args.allow_partial)
        print(json.dumps(results, indent=2) if args.json else format_scores(results) if results
              else "prediction files are valid; no gold labels to score them against")

    return _run_user_command(go)
