"""Peak memory of bf16 training and evaluation relative to float32, on the main job's model and batch sizes.

Each variant runs in its own child process (launched by this script, so that one variant's allocations cannot
hide another's): train_multitask.py's own ``train_main`` with the main job's defaults (minilm-l6, batch 32 per
task, eval batch 128, all three tasks) cut to ``--steps`` training steps on the first ``--train_samples`` rows
of each task and one dev pass over ``--eval_samples`` rows per task. The child records its peak RSS
(``ru_maxrss``) before training (model and data loaded), after the training steps and after the dev pass, and the
mean time of a training step after the first. The parent prints one line per variant and the ratios to float32.

Variants (``--variants``, comma-separated):

* ``fp32``: ``--bf16 off``.
* ``bf16``: ``--bf16 on`` as the trainer runs it (oneDNN's primitive cache off: minbert.training.precision.bound_onednn_cache).
* ``bf16_primcache``: ``--bf16 on`` with oneDNN's primitive cache at its default size (1024), as before issue #24.
* ``bf16_primcache64``: ``--bf16 on`` with a cache of 64 primitives.
* ``bf16_nocache``: ``--bf16 on`` with autocast's cache of bf16 weight copies disabled (``cache_enabled=False``).
* ``bf16_eval32``: ``--bf16 on`` for training, float32 for the dev pass.
* ``bf16_noprimcache``: ``--bf16 on`` with oneDNN's primitive cache off (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``).
* ``fp32_mmap``, ``bf16_mmap``: glibc's malloc with a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``:
  large blocks are mapped and unmapped, not kept in the heap as the dynamic threshold lets them be).

    python benchmarks/bf16_memory.py                      # fp32 and bf16, 24 steps each: a few minutes on one core
    python benchmarks/bf16_memory.py --variants fp32,bf16,bf16_primcache --steps 40 --train_samples 2048 \
        --eval_samples 1024                               # docs/speed.md, "bf16 memory"
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VARIANTS = ("fp32", "bf16", "bf16_primcache", "bf16_primcache64", "bf16_nocache", "bf16_eval32", "bf16_noprimcache", "fp32_mmap", "bf16_mmap")
ENV = {"bf16_noprimcache": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}, "bf16_primcache": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"},
       "bf16_primcache64": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"},
       "fp32_mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "bf16_mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(variant: str, argv: list[str]) -> dict:
    """Run train_main with ``argv`` under ``variant``; the peaks and step times it recorded."""
    sys.path.insert(0, ROOT)
    import torch

    import minbert.training.trainer as trainer
    from minbert.cli import train_main

    record = {"variant": variant, "loaded_mb": None, "train_mb": None, "step_s": []}
    if variant == "bf16_nocache":
        torch.autocast = functools.partial(torch.autocast, cache_enabled=False)
    step = trainer.Trainer.train_step

    def timed_step(self, *a, **k):
        if record["loaded_mb"] is None:
            record["loaded_mb"] = peak_mb()
        t = time.perf_counter()
        out = step(self, *a, **k)
        record["step_s"].append(time.perf_counter() - t)
        return out

    trainer.Trainer.train_step = timed_step
    predict = trainer.predict_task

    def first_eval(*a, **k):
        if record["train_mb"] is None:
            record["train_mb"] = peak_mb()
        if variant == "bf16_eval32":
            k["amp_dtype"] = None
        return predict(*a, **k)

    trainer.predict_task = first_eval
    code = train_main(argv)
    record.update(code=code, total_mb=peak_mb(), threads=torch.get_num_threads())
    times = record.pop("step_s")[1:]  # the first step pays for one-time setup
    record["step_s"] = sum(times) / max(len(times), 1)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=24, help="training steps per variant (each: one batch per task)")
    p.add_argument("--train_samples", type=int, default=1024, help="training rows per task")
    p.add_argument("--eval_samples", type=int, default=512, help="dev rows per task (4 batches of 128)")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, rest)), flush=True)
        return
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants {','.join(unknown)}: choose from {','.join(VARIANTS)}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.steps} steps, {args.train_samples} train / "
          f"{args.eval_samples} dev rows per task, the main job's model and batch sizes")
    results = {}
    for variant in variants:
        with tempfile.TemporaryDirectory() as out:
            argv = ["--skip_bad_rows", "--output_dir", os.path.join(out, "run"), "--data_dir", args.data_dir,
                    "--bf16", "off" if variant.startswith("fp32") else "on", "--num_train_epochs", "1",
                    "--max_steps_per_epoch", str(args.steps), "--max_train_samples", str(args.train_samples),
                    "--max_eval_samples", str(args.eval_samples), "--skip_test_predictions", "--logging_steps", "1000"]
            env = {**os.environ, **ENV.get(variant, {})}
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant, *argv], env=env,
                               capture_output=True, text=True)
            lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
            if r.returncode != 0 or not lines:
                sys.exit(f"{variant}: the child failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
            results[variant] = res = json.loads(lines[-1][len("RESULT "):])
        print(f"{variant:17s} loaded {res['loaded_mb']:7.0f} MB  after training {res['train_mb']:7.0f} MB  "
              f"after dev {res['total_mb']:7.0f} MB  step {res['step_s']:.2f} s", flush=True)
    if "fp32" in results:
        base = results["fp32"]
        for variant, res in results.items():
            if variant != "fp32":
                print(f"{variant}/fp32: peak after training {res['train_mb'] / base['train_mb']:.2f}x "
                      f"(+{res['train_mb'] - base['train_mb']:.0f} MB), after dev {res['total_mb'] / base['total_mb']:.2f}x "
                      f"(+{res['total_mb'] - base['total_mb']:.0f} MB), step time {res['step_s'] / base['step_s']:.2f}x")


if __name__ == "__main__":
    main()
