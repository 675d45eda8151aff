"""The GPU check (issue #13 section 5): run everything that needs CUDA once, within a time budget, and write one summary.

Steps, in order (each one a subprocess with its own time limit, so a hang or crash is recorded and the next
step still runs):

  env          torch/CUDA versions, GPUs, bf16 support, nvidia-smi (in this process, no limit needed)
  pytest_cuda  ``pytest -m cuda``: the CUDA-marked tests; passed/failed/skipped counts from its JUnit XML
  train_*      a bert-base-shaped run (random init: only minilm-l6 ships weights) in bf16 on the shipped data,
               ``--max_steps_per_epoch STEPS`` for one epoch, with each combiner (individual, sum, pcgrad, gse),
               one with M-FAC, and one with ``--pair_encoding cross`` where the CLI has that flag. Each must exit 0
               with finite dev scores and losses; recorded: wall time, steps/s and examples/s (metrics.jsonl),
               dev scores (results.json), peak GPU memory (torch.cuda.max_memory_allocated, written by the
               training process itself: it runs minbert.cli.train_main, exactly what train_multitask.py runs)
  torchrun     the same run data-parallel over 2 processes with NCCL (torchrun --nproc_per_node 2), if 2 GPUs exist
  throughput*  benchmarks/throughput.py (ours against transformers) on the GPU, in float32 and in bf16; its last
               line ``RATIOS train_vs_hf=X infer_vs_hf=Y e2e_vs_pad128=Z ...`` is recorded

A step starts only if the budget (``--budget_s``) has at least the step's minimum left; its limit is then cut to
what is left. Skipped steps are recorded with the reason. The exit status is 1 if any step failed.

    python benchmarks/gpu_check.py --dry-run          # on any machine: list the steps and check their commands
    python benchmarks/gpu_check.py --out DIR          # on a CUDA machine: DIR/gpu_check.json and gpu_check.md

See docs/speed.md ("GPU check").
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # minbert, and this script's own modules beside it
from minbert.io import atomic_write_text  # noqa: E402
from gpu_check_summary import environment, write_summary  # noqa: E402

COMBINERS = ("individual", "sum", "pcgrad", "gse")
# 16 gradients of bert-base's ~110M parameters in float32: a 7 GB window (and as much again in last/optimizer.pt),
# which fits beside the model on a 16 GB GPU, so M-FAC's free-memory preflight accepts it on any GPU we may get.
MFAC_NUM_GRADS = 16
CHILD_FLAG = "--_train_child"  # internal: run train_main(argv) and write the peak GPU memory to a file


@dataclass
class Step:
    name: str
    kind: str  # pytest | train | torchrun | throughput
    argv: list[str]
    limit_s: int
    min_s: int  # start the step only if at least this much budget is left
    skip: str | None = None  # a reason known before running (e.g. "1 GPU")
    train_argv: list[str] = field(default_factory=list)  # train steps: the flags handed to train_main
    run_dir: Path | None = None


# ----------------------------------------------------------------------------------------------------------
# The steps


def train_flags(args, name: str, run_dir: Path) -> list[str]:
    """The training flags of one train_* step (``--bf16`` alone: 'on' both before and after `--bf16 auto|on|off`)."""
    return ["--model_name_or_path", args.model, "--data_dir", str(args.data_dir), "--skip_bad_rows", "--bf16",
            "--device", "cuda", "--num_train_epochs", "1", "--max_steps_per_epoch", str(args.steps),
            "--max_train_samples", str(args.max_train_samples), "--max_eval_samples", str(args.max_eval_samples),
            "--logging_steps", "10", "--save_steps", "0", "--output_dir", str(run_dir / name)]


def train_cli_has(flag: str) -> bool:
    from minbert.cli import train_parser

    return flag in train_parser()._option_string_actions


def start(argv: list[str]) -> subprocess.Popen:
    """Start a short helper command (its output read later by ``finish``), so that it runs beside our own work."""
    return subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int | None, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None, proc.communicate()[0]
    return proc.returncode, out


def throughput_help(python: str) -> subprocess.Popen:
    return start([python, str(ROOT / "benchmarks" / "throughput.py"), "--help"])


def pytest_collect(python: str) -> subprocess.Popen:
    return start([python, "-m", "pytest", "-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"])


def build_steps(args, n_gpus: int, run_dir: Path, bench_help: str) -> list[Step]:
    py, here = args.python, str(Path(__file__).resolve())
    steps = [Step("pytest_cuda", "pytest", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                            "--junitxml", str(run_dir / "pytest_cuda.xml"), "tests"], 180, 20)]
    runs = {f"train_{c}": ["--combiner", c] for c in COMBINERS}
    runs["train_mfac"] = ["--optim", "mfac", "--optim_args", f"num_grads: {MFAC_NUM_GRADS}"]
    if train_cli_has("--pair_encoding"):
        runs["train_cross"] = ["--combiner", "sum", "--pair_encoding", "cross"]
    for name, extra in runs.items():
        flags = train_flags(args, name, run_dir) + extra
        steps.append(Step(name, "train", [py, here, CHILD_FLAG, str(run_dir / f"{name}.peak.json"), "--", *flags],
                          150, 45, train_argv=flags, run_dir=run_dir / name))
    flags = train_flags(args, "torchrun", run_dir) + ["--combiner", "sum"]
    steps.append(Step("torchrun", "torchrun", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                               "2", here, CHILD_FLAG, str(run_dir / "torchrun.peak.json"), "--", *flags],
                      180, 60, skip=None if n_gpus >= 2 else f"{n_gpus} GPU", train_argv=flags,
                      run_dir=run_dir / "torchrun"))
    bench = [py, str(ROOT / "benchmarks" / "throughput.py"), "--model_name_or_path", args.model, "--data_dir",
             str(args.data_dir), "--device", "cuda", "--repeats", "3", "--max_rows", "4000"]
    no_device = None if "--device" in bench_help else \
        "benchmarks/throughput.py has no --device flag (it measures on the CPU only)"
    steps.append(Step("throughput_fp32", "throughput", bench, 150, 45, skip=no_device))
    steps.append(Step("throughput_bf16", "throughput", bench + ["--bf16"], 150, 45, skip=no_device))
    return steps


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# ----------------------------------------------------------------------------------------------------------
# Running a step and reading what it wrote


def run_command(argv: list[str], timeout: float, log_path: Path) -> tuple[int | None, float]:
    """Run ``argv`` in its own process group (torchrun's workers die with it on timeout); (exit code or None on
    timeout, seconds). stdout and stderr go to ``log_path``."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait)
                    break
            rc = None
    return rc, time.perf_counter() - t0


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    return ""


def pytest_counts(junit: Path) -> dict[str, int]:
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"], "failed": c["failures"] + c["errors"],
            "skipped": c["skipped"]}


def train_figures(run_dir: Path, peak_files: list[Path]) -> dict:
    """Dev scores, speed and peak memory of a finished run; 'problems' lists whatever is missing or non-finite.
    steps/s = the logged examples/s over the examples of a step (a batch of every task)."""
    fig, problems = {}, []
    try:
        results = json.loads((run_dir / "results.json").read_text())
        run_args = json.loads((run_dir / "args.json").read_text())
        examples_per_step = run_args["per_device_train_batch_size"] * len(run_args["tasks"])
        records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"problems": [f"no results: {e}"]}
    fig["dev"] = results.get("dev", {})
    fig["run_wall_s"] = results.get("wall_seconds")
    steps = [r for r in records if "examples_per_s" in r]
    if steps:
        fig["steps"] = steps[-1]["step"]
        fig["train_examples_per_s"] = round(steps[-1]["examples_per_s"], 1)
        fig["steps_per_s"] = round(steps[-1]["examples_per_s"] / examples_per_step, 2)
    else:
        problems.append("metrics.jsonl has no training records")
    numbers = list(fig["dev"].values()) + [v for r in steps for k, v in r.items() if k.startswith("loss_")]
    if not fig["dev"] or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
        problems.append(f"non-finite or missing dev scores/losses: dev {fig['dev']}")
    peaks = [json.loads(p.read_text()) for p in peak_files if p.is_file()]
    if peaks:
        fig["peak_allocated_gib"] = max(p["max_memory_allocated_gib"] for p in peaks)
        fig["peak_reserved_gib"] = max(p["max_memory_reserved_gib"] for p in peaks)
    fig["problems"] = problems
    return fig


def ratios_line(log_path: Path) -> str | None:
    lines = [l for l in tail(log_path, 5).splitlines() if l.startswith("RATIOS ")]
    return lines[-1] if lines else None


def run_step(step: Step, timeout: float, out: Path) -> dict:
    log_path = out / "logs" / f"{step.name}.log"
    rc, seconds = run_command(step.argv, timeout, log_path)
    res = {"status": "passed", "seconds": round(seconds, 1), "exit_code": rc, "log": str(log_path.relative_to(out))}
    problems = [] if rc == 0 else [f"timed out after {timeout:.0f} s" if rc is None else f"exit code {rc}"]
    if step.kind == "pytest":
        junit = Path(step.argv[step.argv.index("--junitxml") + 1])
        if junit.is_file():
            res["figures"] = pytest_counts(junit)
            if res["figures"]["passed"] == 0:
                problems.append("no CUDA-marked test passed")
    elif step.kind in ("train", "torchrun"):
        peaks = [Path(step.argv[step.argv.index(CHILD_FLAG) + 1])]
        peaks += sorted(peaks[0].parent.glob(peaks[0].name + ".rank*"))
        res["figures"] = train_figures(step.run_dir, peaks)
        problems += res["figures"].pop("problems")
        if step.run_dir.is_dir():  # keep the small files, drop the checkpoints (GBs for bert-base and M-FAC)
            keep = out / "runs" / step.name
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("args.json", "metrics.jsonl", "results.json"):
                if (step.run_dir / name).is_file():
                    shutil.copy(step.run_dir / name, keep / name)
            shutil.rmtree(step.run_dir, ignore_errors=True)
    elif step.kind == "throughput":
        res["figures"] = {"ratios": ratios_line(log_path)}
        if not res["figures"]["ratios"]:
            problems.append("no RATIOS line")
    if problems:
        res.update(status="failed", reason="; ".join(problems), tail=tail(log_path))
    return res


# ----------------------------------------------------------------------------------------------------------
# --dry-run: everything that can be checked without a GPU


def check_step(step: Step, args, bench_help: str, collected: str = "") -> list[str]:
    """Problems with a step's command that show on a CPU (``collected``: the output of ``pytest_collect``)."""
    if step.kind in ("train", "torchrun"):
        from minbert.cli import check_train_args, train_parser

        p, err = train_parser(), io.StringIO()
        try:  # RunConfig.validate checks every setting, --optim_args included, as a real run would
            with contextlib.redirect_stderr(err):
                check_train_args(p, p.parse_args(step.train_argv))
        except SystemExit:
            return [err.getvalue().strip().splitlines()[-1]]
        except ValueError as e:
            return [str(e)]
        if step.kind == "torchrun" and importlib.util.find_spec("torch.distributed.run") is None:
            return ["torch.distributed.run (torchrun) is missing"]
    elif step.kind == "pytest":
        selected = [l for l in collected.splitlines() if "::" in l]
        if not selected:
            return [f"`pytest -m cuda` selects no test ({(collected.strip().splitlines() or ['no output'])[-1]})"]
        print(f"    selects {len(selected)} test(s): {', '.join(sorted({l.split('::')[0] for l in selected}))}")
    elif step.kind == "throughput":
        if not bench_help:
            return ["benchmarks/throughput.py --help failed"]
        flags = [a for a in step.argv if a.startswith("--")]
        missing = [a for a in flags if a not in bench_help and not (a == "--device" and step.skip)]
        if missing:
            return [f"throughput.py does not know {', '.join(missing)}"]
    return []


def check_data(args) -> list[str]:
    from minbert.tasks.data import DEFAULT_TASKS, load_task

    problems = []
    for task in DEFAULT_TASKS:
        for split, n in (("train", args.max_train_samples), ("dev", args.max_eval_samples), ("test", args.max_eval_samples)):
            try:
                d = load_task(task, split, args.data_dir, skip_bad_rows=True, max_samples=n)
                if len(d.examples) < (n if split == "train" else 1):
                    problems.append(f"{task} {split}: only {len(d.examples)} rows")
            except (OSError, ValueError) as e:
                problems.append(f"{task} {split}: {e}")
    return problems


def dry_run(steps: list[Step], args, bench_help: str, collecting: subprocess.Popen) -> int:
    failed = 0
    collected = None
    problems = check_data(args)
    print(f"data: {args.data_dir}: {'ok' if not problems else '; '.join(problems)}")
    failed += bool(problems)
    for step in steps:
        print(f"{step.name}: limit {step.limit_s} s (starts with >= {step.min_s} s of budget left)"
              + (f"; it would be skipped here: {step.skip}" if step.skip else ""))
        print("    " + shlex.join(step.argv))
        if step.kind == "pytest" and collected is None:
            collected = finish(collecting)[1]
        problems = check_step(step, args, bench_help, collected or "")
        print("    check: " + ("ok" if not problems else "PROBLEM: " + "; ".join(problems)))
        failed += bool(problems)
    total = sum(s.limit_s for s in steps)
    print(f"{len(steps) + 1} steps (env first); limits add up to {total} s, budget {args.budget_s} s: "
          f"steps that would start with less than their minimum left are skipped. "
          f"{'all checks passed' if not failed else f'{failed} check(s) failed'}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------


def train_child(peak_file: str, argv: list[str]) -> int:
    """Run minbert's training CLI (what train_multitask.py runs) and write this process's peak GPU memory."""
    import torch

    from minbert.cli import train_main

    rc = train_main(argv)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rank = os.environ.get("RANK")
        dev = torch.cuda.current_device()
        atomic_write_text(peak_file + (f".rank{rank}" if rank not in (None, "0") else ""), json.dumps({
            "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3),
            "max_memory_reserved_gib": round(torch.cuda.max_memory_reserved(dev) / 2**30, 3)}) + "\n")
    return rc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"),
                   help="folder for gpu_check.json, gpu_check.md, logs/ and runs/ (small files only)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="list the steps and check their commands, files and test selection; run nothing on a GPU")
    p.add_argument("--budget_s", type=int, default=540,
                   help="total seconds for all steps (540 leaves a minute of a 10-minute device call for start-up)")
    p.add_argument("--model", default="bert-base", help="--model_name_or_path of the training and throughput runs")
    p.add_argument("--steps", type=int, default=40, help="training steps per train_* run (--max_steps_per_epoch)")
    p.add_argument("--max_train_samples", type=int, default=2048, help="rows per task of each training file")
    p.add_argument("--max_eval_samples", type=int, default=256, help="rows per task of each dev and test file")
    p.add_argument("--data_dir", type=Path, default=ROOT / "data")
    p.add_argument("--tmp_dir", default=None, help="where the runs write their checkpoints (removed after each step)")
    p.add_argument("--python", default=sys.executable, help="the interpreter of every step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        return train_child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    args = parse_args(argv)
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    helping = throughput_help(args.python)
    collecting = pytest_collect(args.python) if args.dry_run else None
    env = environment()
    rc, bench_help = finish(helping)
    bench_help = bench_help if rc == 0 else ""
    n_gpus = len(env["gpus"])
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.tmp_dir))
    try:
        steps = build_steps(args, n_gpus, run_dir, bench_help)
        if args.dry_run:
            print(f"env: torch {env['torch']}, CUDA available: {env['cuda_available']}, {n_gpus} GPU(s)")
            return dry_run(steps, args, bench_help, collecting)
        (args.out / "logs").mkdir(parents=True, exist_ok=True)
        results = [{"name": "env", "kind": "env", "status": "passed" if env["cuda_available"] else "failed",
                    "seconds": round(time.perf_counter() - t0, 1), "figures": {},
                    **({} if env["cuda_available"] else {"reason": "no CUDA device"})}]
        for step in steps:
            left = args.budget_s - (time.perf_counter() - t0)
            res = {"name": step.name, "kind": step.kind, "command": shlex.join(step.argv), "limit_s": step.limit_s}
            reason = ("no CUDA device" if not env["cuda_available"] else step.skip if step.skip else
                      f"budget: {left:.0f} s left, the step needs >= {step.min_s} s" if left < step.min_s else None)
            if reason:
                res.update(status="skipped", reason=reason)
            else:
                print(f"{step.name}: running (limit {min(step.limit_s, left):.0f} s)", flush=True)
                res.update(run_step(step, min(step.limit_s, left), args.out))
            print(f"{step.name}: {res['status']}{': ' + res['reason'] if res.get('reason') else ''}", flush=True)
            results.append(res)
        summary = {"started": started, "budget_s": args.budget_s, "elapsed_s": round(time.perf_counter() - t0, 1),
                   "environment": env, "steps": results}
        json_path, md_path = write_summary(args.out, summary)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(md_path.read_text(), end="")
    print(f"summary: {json_path} and {md_path}")
    return 1 if summary["counts"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
