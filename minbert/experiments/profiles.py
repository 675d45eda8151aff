"""The report's dev table as train_multitask.py flags: its rows, and the profiles that set everything else.

A row's command is ``profile flags + architecture flags (unless the row sets them) + the row's flags`` plus the
step cap, ``--bf16`` where allowed, the seed and the output folder (:func:`row_argv`).

Profiles:

* ``full``: the report's protocol (§5.3): learning rate 1e-5, 10 epochs, batch size 8, so one epoch is 755 steps
  (6,040 STS training pairs / 8; the smallest task) and 3 x 755 for the "3x iterations" rows; the report's
  architecture; all training data (the two unlabeled QQP rows skipped). The encoder is the embedded
  all-MiniLM-L6-v2 (d = 384), the only pretrained encoder here; the report fine-tuned BERT-base (d = 768).
  Schedule, weight decay and dropout are this package's defaults (the report does not state them). Meant for a GPU.
  bf16 autocast where the device computes it natively (:func:`use_bf16`), like the main job; ``--bf16 off`` for
  the report's float32.
* ``quick``: the same rows in 71.5 minutes on one core of an Intel Xeon with AMX, in bf16 (docs/results.md): the
  report's architecture, minilm-l6, batch 16, learning rate 1e-4 for the encoder and 1e-3 for the heads, one
  epoch of 45 steps (135 for the 3x rows) drawn from all the training data, bf16 autocast where allowed
  (:func:`use_bf16`), dev and test cut to their first 400 rows per task. SST and QQP stay at the majority class in almost every row: it cannot
  rank the strategies.
* ``cpu``: a CPU table in which the rows can separate. What it keeps from the report: each row's strategy, that
  is its combiner (individual / sum / pcgrad / gse), its STS head, SMART, its iterations (the 3x rows train three
  times the steps) and its pooling where the row sets one. What it changes: everything a row does not set is the
  package's default architecture (mean pooling, the [u; v; |u-v|; u*v] paraphrase head, the 5 cos(u, v) STS head;
  the report used the pooler output of [CLS], [u; v] heads and a linear STS head, which do not leave the majority
  class in short runs on this encoder), the encoder is minilm-l6 (the report: BERT-base), batch 32 with learning
  rate 1e-4 for the encoder and 1e-3 for the heads (the report: batch 8 at 1e-5 for 10 epochs), and one epoch of
  CPU_STEPS steps (3 x CPU_STEPS for the 3x rows; the report: 10 epochs of 755) drawn from all the training data.
  Dev is not cut: every dev row is scored; test is not predicted (``--skip_test_predictions``). bf16 autocast where allowed (:func:`use_bf16`: only on
  hardware with native bfloat16; on an AVX2-only CPU bf16 is far slower than float32). Because mean pooling is the
  default, the row "Cosine Similarity (2d+1 features) + Mean Pooling" is the same run as "Cosine Similarity (2d+1
  features)" here; the runner trains it once (:class:`minbert.experiments.runner.PaperRun`). Measured cost and
  the command: docs/results.md.
* ``smoke``: bert-tiny (random weights) on 16 training and 8 dev/test rows per task, 1 epoch of 1 step (3 for the
  3x rows): checks that every row runs, in well under a minute. Its scores mean nothing.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from minbert.training.precision import DEFAULT_BF16

QUICK_STEPS = 45
QUICK_EVAL = 400
CPU_STEPS = 40  # measured cost per row: docs/results.md ("The report's table over seeds, `cpu` profile")

# Every row of every profile encodes the two sentences of a pair separately: the report's heads compare two sentence
# embeddings (and the package's default may become cross-encoding).
PAIR_ENCODING: tuple[str, ...] = ("--pair_encoding", "bi")

# The report's architecture: pooler output of [CLS], a linear layer on [u; v] for paraphrase and for STS.
REPORT_ARCHITECTURE = ("--pooling", "cls", "--para_head", "uv", "--sts_head", "linear") + PAIR_ENCODING
# The package's default architecture (train_multitask.py's defaults), spelled out so that the cpu profile does not
# change when a default does.
DEFAULT_ARCHITECTURE = ("--pooling", "mean", "--para_head", "sbert", "--sts_head", "cosine_regression") + PAIR_ENCODING
COMMON = REPORT_ARCHITECTURE  # the name the results files and older code use

PROFILES: dict[str, tuple[str, ...]] = {
    # The report uses one learning rate for the encoder and the heads.
    "full": ("--model_name_or_path", "minilm-l6", "--learning_rate", "1e-5", "--head_learning_rate", "1e-5",
             "--num_train_epochs", "10",
             "--per_device_train_batch_size", "8", "--skip_bad_rows"),
    # Short runs need the heads to move fast: the heads get 1e-3 (the encoder 1e-4).
    "quick": ("--model_name_or_path", "minilm-l6", "--learning_rate", "1e-4", "--head_learning_rate", "1e-3",
              "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
              "--max_eval_samples", str(QUICK_EVAL), "--skip_bad_rows"),
    # The package's defaults for everything but the length of the run (given explicitly, see DEFAULT_ARCHITECTURE).
    "cpu": ("--model_name_or_path", "minilm-l6", "--learning_rate", "1e-4", "--head_learning_rate", "1e-3",
            "--weight_decay", "0.01", "--warmup_ratio", "0.1", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "32", "--skip_bad_rows", "--skip_test_predictions"),
    "smoke": ("--model_name_or_path", "bert-tiny", "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
              "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_eval_batch_size", "8",
              "--skip_bad_rows"),
}
ARCHITECTURES = {"full": REPORT_ARCHITECTURE, "quick": REPORT_ARCHITECTURE, "cpu": DEFAULT_ARCHITECTURE,
                 "smoke": REPORT_ARCHITECTURE}
# Steps per epoch of a 1x row, where the profile caps it (the 3x rows get three times as many).
STEP_CAPS = {"full": None, "quick": QUICK_STEPS, "cpu": CPU_STEPS, "smoke": 1}


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
BASELINE = "baseline"  # the row every other row is compared with, seed by seed


class _Refused(Exception):
    pass


@functools.cache
def smart_accepts_bf16() -> bool:
    """Whether train_multitask.py accepts ``--smart --bf16`` (parsed and checked as a real run would be).

    SMART's perturbation used to be below bfloat16's resolution, so the checks refused the pair; whether they
    still do is read from the checks themselves rather than assumed here."""
    from minbert.cli import check_train_args, train_parser

    parser = train_parser()

    def refuse(message: str):
        raise _Refused(message)

    parser.error = refuse  # argparse would print and exit
    try:  # a preset model and an existing --data_dir: nothing else in these flags can be refused
        check_train_args(parser, parser.parse_args(["--smart", "--bf16", "--model_name_or_path", "bert-tiny",
                                                    "--data_dir", os.curdir]))
    except (_Refused, SystemExit):
        return False
    return True


def bf16_native(device: str = "auto") -> bool:
    """Whether bfloat16 runs natively where the rows train (:func:`minbert.training.precision.native_bf16`): elsewhere (e.g.
    an AVX2-only CPU) --bf16 makes training many times slower, not 2x faster (docs/results.md)."""
    import torch

    from minbert.training.precision import native_bf16

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return native_bf16(torch.device(device))


def use_bf16(row: Row, profile: str, device: str, mode: str = DEFAULT_BF16) -> bool:
    """--bf16 for this row? ``mode`` auto (the default, as in train_multitask.py): in every profile where the device
    computes bf16 natively and train_multitask.py accepts it (SMART rows only if it accepts ``--smart --bf16``), like
    the main job (about 2x faster on CPUs with AVX512-BF16/AMX, same scores: docs/results.md); on: wherever
    train_multitask.py accepts it; off: never."""
    accepted = "--smart" not in row.flags or smart_accepts_bf16()
    if mode == "on":
        return accepted
    return mode == "auto" and accepted and bf16_native(device)


def row_argv(row: Row, profile: str, data_dir: str, output_dir: Path, device: str, seed: int | None = None,
             bf16: str = DEFAULT_BF16) -> list[str]:
    """The train_multitask.py arguments of one row under one profile: in ``output_dir/<row>``, or in
    ``output_dir/<row>/seed<S>`` with ``--seed S`` when a seed is given; ``bf16``: see :func:`use_bf16`."""
    arch = ARCHITECTURES[profile]
    defaults = [(arch[i], arch[i + 1]) for i in range(0, len(arch), 2) if arch[i] not in row.flags]
    argv = [*PROFILES[profile], *(x for pair in defaults for x in pair), *row.flags]  # a row's flag wins
    if row.iterations != 1:
        argv += ["--iterations_multiplier", str(row.iterations)]
    if STEP_CAPS[profile] is not None:
        argv += ["--max_steps_per_epoch", str(STEP_CAPS[profile] * row.iterations)]
    # explicit either way, so that a row does not change when train_multitask.py's --bf16 default does
    argv += ["--bf16", "on" if use_bf16(row, profile, device, bf16) else "off"]
    directory = output_dir / row.key
    if seed is not None:
        argv += ["--seed", str(seed)]
        directory = directory / f"seed{seed}"
    argv += ["--data_dir", data_dir, "--output_dir", str(directory), "--device", device]
    return argv


def same_run_key(argv: list[str]) -> str:
    """A row's parsed arguments without its output folder: two rows with the same key train the same model
    (flag order does not matter)."""
    from minbert.cli import train_parser

    values = vars(train_parser().parse_args(argv))
    values.pop("output_dir")
    return json.dumps(values, sort_keys=True, default=str)
