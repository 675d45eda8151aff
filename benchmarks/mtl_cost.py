"""Seconds per training step and peak memory of every --combiner on the `cpu` profile's batches (issue 21).

    /work/bin/cpu-slot python benchmarks/mtl_cost.py [--steps 2] [--methods pcgrad,upgrad,...] [--max_train_samples 2000]

Each combiner runs in its own process (so its peak RSS is its own): the cpu profile's model and flags (minilm-l6,
mean pooling, sbert QQP head, cosine-regression STS head, batch 32, bf16 where the CPU has it natively), the same
seed and so the same batches for every method; one untimed step, then ``--steps`` timed steps (process CPU time,
one thread). Peak RSS is the process's maximum resident set (ru_maxrss) after the steps: model, optimizer,
activations and, for the aggregators, the tasks' Jacobian of the encoder (3 x 22.7M float32 = 272 MB).
``--max_train_samples`` only shortens tokenizing; the batches are drawn the same way. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CPU_FLAGS = ["--model_name_or_path", "minilm-l6", "--pooling", "mean", "--para_head", "sbert", "--sts_head",
             "cosine_regression", "--per_device_train_batch_size", "32", "--skip_bad_rows", "--learning_rate", "1e-4",
             "--head_learning_rate", "1e-3", "--weight_decay", "0.01", "--seed", "1"]


def one(name: str, steps: int, samples: int, data_dir: str, bf16: str) -> dict:
    import torch

    from minbert.cli import train_parser
    from minbert.tasks.data import tensorize
    from minbert.experiments.mtl import MTL_ARGS
    from minbert.model.tokenizer import load_tokenizer
    from minbert.training.run import build_model, load_datasets
    from minbert.training.run_config import RunConfig
    from minbert.training.trainer import Trainer

    torch.set_num_threads(1)
    extra = ["--combiner_args", json.dumps(MTL_ARGS[name])] if name in MTL_ARGS else []
    config = RunConfig.from_namespace(train_parser().parse_args(
        CPU_FLAGS + ["--combiner", name, *extra, "--bf16", bf16, "--data_dir", data_dir, "--max_train_samples",
                     str(samples), "--output_dir", "/tmp/mtl_cost/out"]))
    tok = load_tokenizer(config.model.model_name_or_path)
    tensors = {k: tensorize(d, tok) for k, d in load_datasets(config, tok, ("train",)).items()}
    train = {t: tensors[(t, "train")] for t in config.data.tasks}
    torch.manual_seed(0)
    model = build_model(config)
    trainer = Trainer(config, model, train, {}, torch.device("cpu"), tok, None, None)
    model.train()
    seconds = []
    for step in range(1 + steps):
        c0 = time.process_time()
        trainer.train_step(step)
        if step:
            seconds.append(time.process_time() - c0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"name": name, "s_per_step": sum(seconds) / len(seconds), "peak_rss_mb": rss_mb}


def main() -> int:
    from minbert.methods.mtl_methods import METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(["sum", "pcgrad", *METHODS]))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max_train_samples", type=int, default=2000)
    p.add_argument("--data_dir", default=str(ROOT / "data"))
    p.add_argument("--bf16", choices=["on", "off"], default="on")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.steps, a.max_train_samples, a.data_dir, a.bf16)), flush=True)
        return 0
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in a.methods.split(","):
        r = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(a.steps), "--max_train_samples",
                            str(a.max_train_samples), "--data_dir", a.data_dir, "--bf16", a.bf16],
                           capture_output=True, text=True, env=env)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[7:]))
        print(f"{name}: {rows[-1]['s_per_step']:.2f} s/step, {rows[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr,
              flush=True)
    ref = next((r for r in rows if r["name"] == "pcgrad"), None)
    print("| --combiner | s/step | x pcgrad | peak RSS MB | vs pcgrad MB |\n|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['s_per_step'] / ref['s_per_step']:.2f}" if ref else "-"
        dmem = f"{r['peak_rss_mb'] - ref['peak_rss_mb']:+.0f}" if ref else "-"
        print(f"| `{r['name']}` | {r['s_per_step']:.2f} | {ratio} | {r['peak_rss_mb']:.0f} | {dmem} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
