"""Training and inference throughput of minbert against transformers.BertModel and a pad-to-128 pipeline.

Three pipelines on the CPU (or a GPU with ``--device cuda``), on real rows of data/ids-sst-train.csv and data/quora-train.csv (training) and of the
dev files (inference), tokenized with minbert's tokenizer:

  (a) ours    minbert itself: ``Trainer.train_step`` (length-bucketed batches from the task streams, our encoder,
              fused AdamW, gradient clipping: the real training step) and ``predict_task`` (length-sorted batches,
              eval mode, ``torch.inference_mode``: the real prediction path).
  (b) hf      ``transformers.BertModel`` holding the same weights, with the same pooling and heads, on identical
              batches (same examples, same padding), the same AdamW and clipping, train mode for training and
              eval mode + ``torch.inference_mode`` for inference.
  (a') and (b') the same two on QQP read as one sequence (``--pair_encoding cross``): identical joint sequences
              ``[CLS] a [SEP] b [SEP]`` with token types, length-bucketed, through (a') minbert's Trainer and
              predict_task with the cross-encoding head and (b') transformers.BertModel with the same weights and head.
  (c) pad128  a run_glue-style pipeline: every sequence padded to 128 tokens (a QQP pair is one
              ``[CLS] a [SEP] b [SEP]`` sequence, as run_glue encodes it), random batches of the same examples,
              ``transformers.BertModel`` + dropout + linear on the pooled output (BertForSequenceClassification's
              computation), the same AdamW and clipping. Training only.

Examples/s count one SST sentence or one QQP pair as an example; each training step trains SST and then QQP on
one batch each (the ``individual`` schedule). The batches are real: one bucketed pass of each task's training
stream (and the length-sorted dev batches for inference) is sorted by padded width and a few batches at evenly
spaced quantiles of width are taken, so a few batches stand for the whole epoch's padding. Batch collation
(padding the token lists) is timed in every pipeline; tokenization is not (all three tokenize once up front).

The pipelines are timed in turn, in a rotating order, for ``--repeats`` rounds after one untimed warmup round,
so drift on a shared machine affects all of them alike; the ratios are medians of the per-round ratios:

  train_vs_hf    (a) / (b) training examples/s: our encoder against transformers on identical batches
  infer_vs_hf    (a) / (b) inference examples/s
  e2e_vs_pad128  (a) / (c) training examples/s: our whole training pipeline (bucketing + encoder) against
                 run_glue-style padding to 128
  cross_train_vs_hf, cross_infer_vs_hf   (a') / (b'): the same two comparisons on cross-encoded QQP pairs

    python benchmarks/throughput.py --quick          # under a minute on one idle CPU core
    python benchmarks/throughput.py                  # a few minutes
    python benchmarks/throughput.py --bf16           # bfloat16 autocast in all three pipelines

The last line is ``RATIOS train_vs_hf=X infer_vs_hf=Y e2e_vs_pad128=Z cross_train_vs_hf=U cross_infer_vs_hf=V``
(the first three fields always, in this order). See docs/speed.md.

Beside this file: throughput_batches.py (which real batches are timed, and their padding), throughput_reference.py
(the transformers pipelines (b), (b') and (c)) and throughput_levers.py (``--levers``).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]  # minbert, and this benchmark's own modules beside it
from minbert.model.tokenizer import load_tokenizer, pad_token_id  # noqa: E402
from minbert.tasks.data import load_task, tensorize  # noqa: E402
from minbert.tasks.predict import predict_task  # noqa: E402
from minbert.training.run import build_model, compile_encoder  # noqa: E402
from minbert.training.run_config import RunConfig  # noqa: E402
from minbert.training.trainer import Trainer  # noqa: E402
from throughput_batches import (GLUE_LENGTH, TASKS, FixedStream, eval_subset, glue_inputs,  # noqa: E402
                                padding_table, shuffled_examples, training_batches, width)
from throughput_levers import LEVERS, lever_runs  # noqa: E402
from throughput_reference import GlueStyle, HFMultitask, Pipeline, hf_encoder, max_logit_difference, predict_hf  # noqa: E402

CROSS_TASK = "qqp"  # the pair task of the cross-encoded pipelines (a') and (b')
CHECK_TOLERANCE = 1e-4  # max |logit difference| between (a) and (b) in float32 on the same weights


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="batch 16 (eval 32), 1 training and 1 eval batch per task, 3 rounds: < 1 minute on one core")
    p.add_argument("--model_name_or_path", default="minilm-l6", help="a minbert preset or Hugging Face model directory")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--batch_size", type=int, default=None, help="training batch per task (default 32; 16 with --quick)")
    p.add_argument("--eval_batch_size", type=int, default=None, help="prediction batch (default 128; 32 with --quick)")
    p.add_argument("--train_batches", type=int, default=None, help="training batches per task per round (default 2; 1 with --quick)")
    p.add_argument("--eval_batches", type=int, default=None, help="prediction batches per task per round (default 2; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after the warmup round (default 5; 3 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast in all three pipelines (like with like)")
    p.add_argument("--torch_compile", action="store_true",
                   help="compile our encoder layers (minbert's --torch_compile; transformers stays eager)")
    p.add_argument("--levers", action="store_true",
                   help="also time (a) with one speed lever taken away at a time (more time per round)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, which a core shared with other jobs "
                        "does not inflate (meaningful with --threads 1 only)")
    p.add_argument("--max_rows", type=int, default=None,
                   help="read the first N rows of each file (default all; 2000 with --quick): bucketing sorts "
                        "within chunks of 50 batches, so N well above 50 x batch size keeps its batches realistic")
    p.add_argument("--seed", type=int, default=11711)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where all three pipelines run (cuda: the clock waits for the GPU at the end of each timing)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and (args.levers or args.timer == "cpu"):
        p.error(f"--device cuda: {'--levers' if args.levers else '--timer cpu'} measures CPU levers/time; drop it")
    quick = args.quick
    if args.max_rows is None and quick:
        args.max_rows = 2000
    if args.timer == "cpu" and (args.threads or torch.get_num_threads()) != 1:
        p.error("--timer cpu sums the CPU time of all threads: use it with --threads 1")
    for name, full, fast in (("batch_size", 32, 16), ("eval_batch_size", 128, 32), ("train_batches", 2, 1),
                             ("eval_batches", 2, 1), ("repeats", 5, 3)):
        if getattr(args, name) is None:
            setattr(args, name, fast if quick else full)
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("error: the benchmark compares against transformers.BertModel, which is not installed: "
              "pip install 'transformers>=4.40' (or pip install -e '.[test]')", file=sys.stderr)
        return 1
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    amp = torch.bfloat16 if args.bf16 else None
    device = torch.device(args.device)

    # Data: whole files by default (bucketing then sees a real pass over the training file), tokenized once.
    tokenizer = load_tokenizer(args.model_name_or_path)
    pad_id = pad_token_id(tokenizer)
    raw = {t: load_task(t, "train", args.data_dir, skip_bad_rows=True, max_samples=args.max_rows) for t in TASKS}
    train = {t: tensorize(raw[t], tokenizer) for t in TASKS}
    dev = {t: tensorize(load_task(t, "dev", args.data_dir, skip_bad_rows=True, max_samples=args.max_rows), tokenizer)
           for t in TASKS}
    chosen, pass_width = {}, {}
    for i, t in enumerate(TASKS):
        chosen[t], pass_width[t] = training_batches(train[t], args.batch_size, args.train_batches, args.seed, i)
    evals = {t: eval_subset(dev[t], args.eval_batch_size, args.eval_batches) for t in TASKS}

    # (a) minbert's own Trainer, its streams replaced by the chosen batches.
    flags = ["--model_name_or_path", args.model_name_or_path, "--data_dir", args.data_dir, "--tasks", ",".join(TASKS),
             "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size",
             str(args.eval_batch_size), "--seed", str(args.seed), "--device", args.device]
    flags += ["--bf16", "on" if args.bf16 else "off"] + ["--torch_compile"] * args.torch_compile  # like (b) and (c)
    config = RunConfig.from_flags(flags)
    ours = build_model(config)
    ours.to(device)
    # (b) and (c) start from the same weights (the heads of (b) too), before (a) takes any step.
    hf = HFMultitask(hf_encoder(transformers, ours.encoder), copy.deepcopy(ours.heads), ours.config.pooling).to(device)
    glue = GlueStyle(copy.deepcopy(hf.encoder), {"sst": 5, "qqp": 2}, ours.encoder.config.hidden_dropout_prob).to(device)
    check = max_logit_difference(ours, hf, train, chosen, pad_id)
    if not check <= CHECK_TOLERANCE:
        print(f"error: ours and transformers.BertModel disagree on the same weights: max |logit difference| "
              f"{check:.2e} > {CHECK_TOLERANCE:g}", file=sys.stderr)
        return 1
    # (a') and (b'): QQP read as one sequence; the pairs tokenized jointly, the same weights on both sides.
    cross_config = RunConfig.from_flags(flags + ["--tasks", CROSS_TASK, "--pair_encoding", "cross"])
    cross_train = tensorize(raw[CROSS_TASK], tokenizer, "cross")
    cross_chosen, cross_width = training_batches(cross_train, args.batch_size, args.train_batches, args.seed, 1)
    cross_eval = eval_subset(tensorize(load_task(CROSS_TASK, "dev", args.data_dir, skip_bad_rows=True,
                                                 max_samples=args.max_rows), tokenizer, "cross"),
                             args.eval_batch_size, args.eval_batches)
    ours_x = build_model(cross_config).to(device)
    hf_x = HFMultitask(hf_encoder(transformers, ours_x.encoder), copy.deepcopy(ours_x.heads), ours_x.config.pooling)
    check = max(check, max_logit_difference(ours_x, hf_x, {CROSS_TASK: cross_train}, {CROSS_TASK: cross_chosen},
                                            pad_id, (CROSS_TASK,)))
    if not check <= CHECK_TOLERANCE:
        print(f"error: ours and transformers.BertModel disagree on the same joint sequences: max |logit difference| "
              f"{check:.2e} > {CHECK_TOLERANCE:g}", file=sys.stderr)
        return 1
    if args.torch_compile:
        compile_encoder(ours, device)
        compile_encoder(ours_x, device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, ours, train, {}, device, tokenizer, tmp, metrics=None)
        trainer_x = Trainer(cross_config, ours_x, {CROSS_TASK: cross_train}, {}, device, tokenizer, tmp, metrics=None)
    trainer.streams = {t: FixedStream(train[t], chosen[t]) for t in TASKS}
    trainer_x.streams = {CROSS_TASK: FixedStream(cross_train, cross_chosen)}
    hf_x_pipe = Pipeline(hf_x, cross_config, amp)
    hf_pipe = Pipeline(hf, config, amp)
    glue_pipe = Pipeline(glue, config, amp)

    # (c)'s examples: the same training examples as (a) and (b), in random batches, padded to 128.
    glue_batches = {}
    for t in TASKS:
        idx = shuffled_examples(chosen[t], torch.Generator().manual_seed(args.seed))
        inputs = glue_inputs([raw[t].examples[i] for i in idx], tokenizer, pad_id)
        inputs["labels"] = train[t].labels[idx]
        glue_batches[t] = [{k: v[s:s + args.batch_size] for k, v in inputs.items()}
                           for s in range(0, len(idx), args.batch_size)]
    n_train = sum(len(b) for t in TASKS for b in chosen[t])
    n_infer = sum(len(d) for d in evals.values())
    n_cross_train, n_cross_infer = sum(len(b) for b in cross_chosen), len(cross_eval)

    def a_train():
        ours.train()
        for i in range(args.train_batches):
            trainer.train_step(i)

    def b_train():
        hf.train()
        for i in range(args.train_batches):
            hf_pipe.train_step({t: train[t].batch(chosen[t][i], pad_id) for t in TASKS})

    def c_train():
        glue.train()
        for i in range(args.train_batches):
            # default_data_collator's work: stack the pre-padded rows of the batch
            glue_pipe.train_step({t: {k: v.clone() for k, v in glue_batches[t][i].items()} for t in TASKS})

    def a_infer():
        for t in TASKS:
            predict_task(ours, evals[t], args.eval_batch_size, device, pad_id, amp_dtype=amp)

    def b_infer():
        for t in TASKS:
            predict_hf(hf, evals[t], args.eval_batch_size, pad_id, amp)

    def ax_train():
        ours_x.train()
        for i in range(args.train_batches):
            trainer_x.train_step(i)

    def bx_train():
        hf_x.train()
        for i in range(args.train_batches):
            hf_x_pipe.train_step({CROSS_TASK: cross_train.batch(cross_chosen[i], pad_id)})

    def ax_infer():
        predict_task(ours_x, cross_eval, args.eval_batch_size, device, pad_id, amp_dtype=amp)

    def bx_infer():
        predict_hf(hf_x, cross_eval, args.eval_batch_size, pad_id, amp)

    runs = {"a_train": a_train, "b_train": b_train, "c_train": c_train, "a_infer": a_infer, "b_infer": b_infer,
            "ax_train": ax_train, "bx_train": bx_train, "ax_infer": ax_infer, "bx_infer": bx_infer}
    if args.levers:
        runs.update(lever_runs(args, config, ours, hf, trainer, train, chosen, evals, a_train, a_infer, b_train, b_infer,
                               device, pad_id, amp))
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    t_bench = time.perf_counter()
    for r in range(args.repeats + 1):  # round 0 is the warmup
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = clock()
            runs[name]()
            if device.type == "cuda":  # kernels run asynchronously: time them, not their launches
                torch.cuda.synchronize()
            if r:
                times[name].append(clock() - t0)
    t_bench = time.perf_counter() - t_bench

    def examples(name: str) -> int:
        if name.startswith(("ax_", "bx_")):
            return n_cross_train if "train" in name else n_cross_infer
        return n_train if "train" in name else n_infer

    rate = {name: [examples(name) / s for s in ts] for name, ts in times.items()}
    per_round = {
        "train_vs_hf": [b / a for a, b in zip(times["a_train"], times["b_train"])],
        "infer_vs_hf": [b / a for a, b in zip(times["a_infer"], times["b_infer"])],
        "e2e_vs_pad128": [c / a for a, c in zip(times["a_train"], times["c_train"])],
        "cross_train_vs_hf": [b / a for a, b in zip(times["ax_train"], times["bx_train"])],
        "cross_infer_vs_hf": [b / a for a, b in zip(times["ax_infer"], times["bx_infer"])],
    }
    ratios = {k: statistics.median(v) for k, v in per_round.items()}

    enc = ours.encoder.config
    widths = {t: [width(train[t], b) for b in chosen[t]] for t in TASKS}
    print(f"throughput of {args.model_name_or_path} ({enc.num_hidden_layers} layers, hidden {enc.hidden_size}); "
          f"torch {torch.__version__}, transformers {transformers.__version__} "
          f"(attention: {hf.encoder.config._attn_implementation}), "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} thread(s)'}, "
          f"{'bf16 autocast in (a), (b) and (c)' if amp else 'float32'}"
          f"{', (a) compiled with torch.compile' if args.torch_compile else ''}")
    print(f"check: (a) and (b), (a') and (b') on the same weights, float32 eval: max |logit difference| {check:.1e}")
    print(f"training: batch {args.batch_size} per task, {args.train_batches} step(s) of SST + QQP per round, padded widths "
          + ", ".join(f"{t} {widths[t]} (whole pass: mean {pass_width[t]:.1f})" for t in TASKS)
          + f", (c) {GLUE_LENGTH}; "
          f"cross-encoded {CROSS_TASK} (a'), (b'): padded widths {[width(cross_train, b) for b in cross_chosen]} "
          f"(whole pass: mean {cross_width:.1f}); "
          f"inference: batch {args.eval_batch_size}, {n_infer} dev examples ({n_cross_infer} cross-encoded); "
          f"{args.repeats} timed rounds after 1 warmup round ({args.timer} time), {t_bench:.0f} s wall")
    print()
    print("\n".join(padding_table(train, args.batch_size, args.seed)))
    print()
    print("| pipeline | train examples/s | inference examples/s |")
    print("|---|---|---|")
    med = {name: statistics.median(v) for name, v in rate.items()}
    print(f"| (a) minbert (bucketed batches) | {med['a_train']:.1f} | {med['a_infer']:.1f} |")
    print(f"| (b) transformers.BertModel, same batches | {med['b_train']:.1f} | {med['b_infer']:.1f} |")
    print(f"| (c) run_glue-style, padded to {GLUE_LENGTH} | {med['c_train']:.1f} | - |")
    print(f"| (a') minbert, {CROSS_TASK} cross-encoded (bucketed joint sequences) | {med['ax_train']:.1f} | "
          f"{med['ax_infer']:.1f} |")
    print(f"| (b') transformers.BertModel, same joint sequences | {med['bx_train']:.1f} | {med['bx_infer']:.1f} |")
    print()
    if args.levers:
        print("| lever | training speed-up from it | inference speed-up from it |")
        print("|---|---|---|")
        for name, (what, base) in LEVERS.items():
            cells = []
            for kind in ("train", "infer"):
                key = f"{name}_{kind}"
                if key in times:
                    r = [v / a for a, v in zip(times[f"{base}_{kind}"], times[key])]
                    cells.append(f"{statistics.median(r):.3f}x ({min(r):.2f}..{max(r):.2f})")
                else:
                    cells.append("-")
            print(f"| {what} | {cells[0]} | {cells[1]} |")
        print()
    for k, v in per_round.items():
        print(f"{k}: median {ratios[k]:.3f} over {len(v)} rounds (min {min(v):.3f}, max {max(v):.3f})")
    print(f"RATIOS train_vs_hf={ratios['train_vs_hf']:.3f} infer_vs_hf={ratios['infer_vs_hf']:.3f} "
          f"e2e_vs_pad128={ratios['e2e_vs_pad128']:.3f} cross_train_vs_hf={ratios['cross_train_vs_hf']:.3f} "
          f"cross_infer_vs_hf={ratios['cross_infer_vs_hf']:.3f}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
