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

from .combiners import PCGRAD_REDUCTIONS
from .config import PRESETS
from .config_file import apply_config_file  # noqa: F401  (re-exported: --config, as train_main reads it)
from .data import DEFAULT_TASKS, TASKS
from .flag_types import (_bf16, _nonneg_float, _nonneg_int, _pair_encoding, _positive_int,  # noqa: F401
                         _smart_projection, _tasks)
from .io import finite_or_null, json_text
from . import mtl_methods
from .metrics import format_scores  # noqa: F401  (re-exported: it lived here)
from .run_config import MIN_SEQ_LENGTH, OPTIMIZER_NAMES, PARA_HEADS, POOLINGS, REPORT_TO, ConfigError, RunConfig


def train_parser() -> argparse.ArgumentParser:
    from .heads import DEFAULT_PARA_HEAD, DEFAULT_STS_HEAD, STS_HEADS
    from .precision import DEFAULT_BF16
    from .smart import (BREGMAN_BETA, BREGMAN_MU, SMART_ETA, SMART_LAMBDA, SMART_PROJECTION, SMART_PROJECTIONS,
                        SMART_SIGMA, SMART_STEPS)

    p = argparse.ArgumentParser(
        prog="train_multitask.py",
        description="Fine-tune a BERT encoder on SST, QQP and STS at once; write checkpoints, the six CS224N "
                    "prediction files and the dev scores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.json", default=None,
                   help="read flags from a JSON object (keys = flag names without dashes, e.g. a run's args.json); "
                        "flags given on the command line override it")
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", default="minilm-l6",
                   help=f"a preset ({', '.join(PRESETS)}; only minilm-l6 has pretrained weights) or a Hugging Face "
                        "model directory (config.json + model.safetensors or pytorch_model.bin + vocab)")
    g.add_argument("--pooling", choices=POOLINGS, default="mean", help="sentence embedding for every task")
    g.add_argument("--sts_head", default=DEFAULT_STS_HEAD, choices=list(STS_HEADS),
                   help="STS head: linear on [u; v] (the report's baseline), cosine_embedding (CosineEmbeddingLoss, "
                        "no layer), cosine (d->d linear, 5*sigmoid(20*cos)), cosine_2d1 (linear on [u; v; cos]), "
                        "cosine_regression (5*cos, SBERT's regression objective); "
                        "see docs/multitask.md")
    g.add_argument("--para_head", choices=PARA_HEADS, default=DEFAULT_PARA_HEAD,
                   help="paraphrase head features: uv = linear on [u; v] (the report's baseline), "
                        "sbert = linear on [u; v; |u-v|; u*v]")
    g.add_argument("--pair_encoding", type=_pair_encoding, default="bi", metavar="{bi,cross,qqp=..,sts=..}",
                   help="how QQP and STS read a sentence pair: bi (each sentence encoded alone, the head compares the "
                        "two embeddings) or cross (one sequence [CLS] a [SEP] b [SEP], the head reads it pooled, as "
                        "run_glue does; --sts_head/--para_head then do not apply); per task: qqp=cross,sts=bi")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="data", help="folder holding the CS224N task files")
    g.add_argument("--tasks", type=_tasks, default=list(DEFAULT_TASKS),
                   help="comma-separated tasks: sst,qqp,sts (default), or sst2 (SST-2 built from the SST files)")
    g.add_argument("--task_spec", metavar="FILE.json", default=None, help="tasks of your own, trained beside --tasks (docs/tasks.md)")
    g.add_argument("--max_seq_length", type=_positive_int, default=None,
                   help=f"truncate longer inputs, {MIN_SEQ_LENGTH} tokens at least (a pair needs [CLS] a [SEP] b "
                        "[SEP]) and at most the model's max_position_embeddings (default: the tokenizer's own limit: "
                        "128 for the embedded encoder, the training run's with --predict_only)")
    g.add_argument("--max_train_samples", type=_positive_int, default=None, help="first N training rows per task")
    g.add_argument("--max_eval_samples", type=_positive_int, default=None,
                   help="first N dev/test rows per task (prediction files then hold only those)")
    g.add_argument("--skip_bad_rows", action="store_true", help="skip malformed rows (counted and reported) instead of stopping")
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=11711,
                   help="random seed (0 to 2**32-1): new weights, batch order, dropout")
    g.add_argument("--per_device_train_batch_size", type=_positive_int, default=32,
                   help="examples per task in each training step (every step draws a batch of every task)")
    g.add_argument("--per_device_eval_batch_size", type=_positive_int, default=128,
                   help="examples per batch when predicting dev and test")
    g.add_argument("--learning_rate", type=_nonneg_float, default=1e-4,
                   help="peak learning rate of the encoder: linear warmup to it, then linear decay to 0")
    g.add_argument("--head_learning_rate", type=_nonneg_float, default=1e-3,
                   help="peak learning rate of the task heads (same schedule): freshly initialized layers on top "
                        "of a pretrained encoder need larger steps, e.g. to learn the scale of the cosine feature; "
                        "an lr in --optim_args does not change it")
    g.add_argument("--num_train_epochs", type=_positive_int, default=3,
                   help="epochs; dev scores after each, the best epoch is kept")
    g.add_argument("--max_steps_per_epoch", type=_positive_int, default=None, help="cap the steps of an epoch (quick runs)")
    g.add_argument("--weight_decay", type=_nonneg_float, default=0.01,
                   help="decoupled weight decay (not on biases and LayerNorm weights)")
    g.add_argument("--warmup_ratio", type=_nonneg_float, default=0.1,
                   help="fraction of all steps spent warming the learning rate up, in [0, 1]")
    g.add_argument("--max_grad_norm", type=_nonneg_float, default=1.0, help="clip the gradient norm (0: off)")
    g.add_argument("--max_bad_steps", type=_nonneg_int, default=10,
                   help="non-finite loss or gradient: skip the step; stop after more than N such steps in a row")
    g.add_argument("--logging_steps", type=_positive_int, default=50,
                   help="write the mean losses of the last N steps to metrics.jsonl")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--bf16", type=_bf16, nargs="?", const="on", default=DEFAULT_BF16, metavar="{auto,on,off}",
                   help="bfloat16 autocast for forward passes and losses in training and prediction (weights, "
                        "gradients and optimizer state stay float32); about 2x faster on CPUs with AVX512-BF16/AMX "
                        "(docs/speed.md). --bf16 alone = on; auto (the default) = on where the device has native "
                        "bfloat16 (CUDA with bf16, AVX512-BF16/AMX CPUs), off elsewhere and with --smart_projection ball")
    g.add_argument("--torch_compile", action="store_true",
                   help="compile the encoder layers with torch.compile (dynamic shapes); the first steps are slow "
                        "while it compiles, and on CPU it needs a C++ compiler")
    g = p.add_argument_group("multitask")
    g.add_argument("--combiner", default="individual", metavar="COMBINER",
                   help="individual (round-robin per-task steps), sum (one step on the summed loss), pcgrad "
                        "(gradient surgery), gse (a PCGrad step, then a summed-loss step), or your own class with a "
                        "step(ctx) method by its import path (docs/multitask.md); or a torchjd method: "
                        + mtl_methods.help_text())
    g.add_argument("--combiner_args", default=None, metavar="JSON",
                   help='keyword options of your own --combiner class or of a torchjd method, a JSON object, '
                        'e.g. \'{"c": 0.5}\' for cagrad')
    g.add_argument("--iterations_multiplier", type=_positive_int, default=1,
                   help="an epoch has K x (smallest task's batches) steps")
    g.add_argument("--smart", action="store_true",
                   help="add SMART's smoothness-inducing adversarial regularizer to every task loss (Jiang et al. 2020)")
    g.add_argument("--smart_steps", type=_nonneg_int, default=SMART_STEPS, help="SMART: ascent steps on the perturbation")
    g.add_argument("--smart_lambda", type=_nonneg_float, default=SMART_LAMBDA, help="SMART: regularizer weight lambda")
    g.add_argument("--smart_eta", type=_nonneg_float, default=SMART_ETA, help="SMART: ascent step size eta")
    g.add_argument("--smart_projection", type=_smart_projection, choices=SMART_PROJECTIONS, default=SMART_PROJECTION,
                   help="SMART's perturbation: library = the MT-DNN library today (namisan/mt-dnn perturbation.py "
                        "at 676b48b, as archinetai/smart-pytorch): noise, then per token (noise + eta * grad) / "
                        "(max|noise + eta * grad| + epsilon), so |delta| is about 1; library_early = its early form "
                        "(mt-dnn 0d6201e, minbert's default before 2026-12, old name none): x + eta * per-token "
                        "normalized gradient, |delta| about eta; ball = the paper's Algorithm 1 read literally "
                        "(projected into the max-norm ball of radius epsilon); docs/multitask.md")
    g.add_argument("--smart_epsilon", type=_nonneg_float, default=None,
                   help="SMART: with library the normalization's stabiliser (default 1e-5, the report's); with ball "
                        "the max-norm radius (default 1e-5); with library_early the stabiliser (default 1e-30)")
    g.add_argument("--smart_sigma", type=_nonneg_float, default=SMART_SIGMA, help="SMART: initial noise std sigma")
    g.add_argument("--bregman", action="store_true",
                   help="with --smart: add the Bregman proximal-point term against an EMA copy of the model")
    g.add_argument("--bregman_mu", type=_nonneg_float, default=BREGMAN_MU, help="Bregman proximal point: weight mu")
    g.add_argument("--bregman_beta", type=_nonneg_float, default=BREGMAN_BETA,
                   help="Bregman proximal point: EMA momentum beta (theta~ <- beta*theta~ + (1-beta)*theta after each step)")
    g.add_argument("--trust_combiner_code", action="store_true",
                   help="import and run the code a --combiner package.module:Class names (command line only: a "
                        "--config file cannot set it; never with --predict_only)")
    g.add_argument("--pcgrad_reduction", choices=PCGRAD_REDUCTIONS, default="mean",
                   help="pcgrad and gse: the encoder's gradient is the mean (default) or the sum of the PCGrad-"
                        "projected task gradients. mean = WeiChengTseng/Pytorch-PCGrad (e987ac6), the implementation "
                        "CS224N projects copied, and GSE's form since the start; sum = Yu et al. 2020, Algorithm 1")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optim", default="adamw", type=str.lower, choices=OPTIMIZER_NAMES,
                   help="adamw (torch, fused) or mfac (M-FAC, see docs/mfac.md); case-insensitive")
    g.add_argument("--optim_args", nargs="+", default=None, type=str,
                   help="optimizer options, JSON or 'key: value, ...' as in the M-FAC cards, quoted or not "
                        "(e.g. lr: 1e-4, num_grads: 1024, damp: 1e-6); lr replaces --learning_rate (the encoder's; "
                        "the heads keep --head_learning_rate), weight_decay replaces --weight_decay in every group "
                        "that decays, other keys apply to every group (docs/mfac.md)")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="runs/default",
                   help="run folder: args.json, metrics.jsonl, best/ checkpoint, predictions/, results.json (not "
                        "the current directory or a folder holding the data)")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="replace the run (finished or not) in --output_dir")
    g.add_argument("--save_steps", type=_nonneg_int, default=200,
                   help="save the resumable state in OUTPUT_DIR/last every N steps (0: only at epoch ends)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output_dir from OUTPUT_DIR/last (same flags; bit-identical on CPU)")
    g.add_argument("--predict_only", action="store_true", help="no training: predict with --checkpoint")
    g.add_argument("--checkpoint", default=None,
                   help="with --predict_only: a minbert checkpoint directory (e.g. runs/default/best)")
    g.add_argument("--skip_test_predictions", action="store_true",
                   help="do not read the test files nor write their prediction files (a run for its dev scores, "
                        "e.g. the experiments' cpu profile)")
    g.add_argument("--report_to", choices=REPORT_TO, default="none",
                   help="also log metrics.jsonl's numbers as TensorBoard scalars in OUTPUT_DIR/tensorboard "
                        "(needs: pip install tensorboard)")
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
    from .data import DataError
    from .embedded import EmbeddedModelError

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
    from .run import run
    from .trainer import NonFiniteError

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
    g = p.add_argument_group("uncertainty (minbert/significance.py)")
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
    from .predict import score_prediction_dir

    def go():
        from .user_tasks import declare, read_task_spec, stored_task_spec

        declare(read_task_spec(args.task_spec) if args.task_spec else stored_task_spec(Path(args.predictions).parent))
        results = score_prediction_dir(args.predictions, args.data_dir, args.allow_partial, args.skip_bad_rows)
        extra = {}
        if args.ci or args.compare:
            from . import significance as sig

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
