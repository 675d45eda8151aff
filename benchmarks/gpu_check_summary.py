"""What benchmarks/gpu_check.py records beside its steps: the environment (torch, CUDA, the GPUs), and the
summary it writes, DIR/gpu_check.json and DIR/gpu_check.md."""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

from minbert.io import atomic_write_text


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "gpus": []}
    for pkg in ("transformers", "pytest"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[pkg] = importlib.metadata.version(pkg)
    if env["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                "capability": f"{p.major}.{p.minor}"})
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
    return env


def describe(res: dict) -> str:
    """One table cell: the step's main figures."""
    f = res.get("figures") or {}
    if "passed" in f:
        return f"{f['passed']} passed, {f['failed']} failed, {f['skipped']} skipped"
    if "ratios" in f:
        return f["ratios"] or ""
    if "dev" in f:
        dev = ", ".join(f"{k} {v:.4f}" for k, v in f["dev"].items())
        parts = [dev, f"{f.get('steps_per_s', '?')} steps/s", f"{f.get('train_examples_per_s', '?')} ex/s"]
        if "peak_allocated_gib" in f:
            parts.append(f"peak {f['peak_allocated_gib']:.2f} GiB allocated ({f['peak_reserved_gib']:.2f} reserved)")
        return "; ".join(parts)
    return ""


def render_markdown(summary: dict) -> str:
    env = summary["environment"]
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in env.get("gpus", [])) or "no CUDA device"
    lines = [f"# GPU check, {summary['started']}", "",
             f"{gpus}; torch {env.get('torch')} (CUDA {env.get('cuda')}), transformers {env.get('transformers', '-')}, "
             f"Python {env.get('python')}; budget {summary['budget_s']} s, used {summary['elapsed_s']} s.", "",
             "| step | status | seconds | figures |", "|---|---|---|---|"]
    for s in summary["steps"]:
        status = s["status"] + (f": {s['reason']}" if s.get("reason") else "")
        lines.append(f"| {s['name']} | {status} | {s.get('seconds', '-')} | {describe(s)} |")
    c = summary["counts"]
    lines += ["", f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped."]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict) -> tuple[Path, Path]:
    """DIR/gpu_check.json (everything) and DIR/gpu_check.md (the table), written atomically."""
    summary["counts"] = {k: sum(s["status"] == k for s in summary["steps"]) for k in ("passed", "failed", "skipped")}
    paths = out / "gpu_check.json", out / "gpu_check.md"
    atomic_write_text(paths[0], json.dumps(summary, indent=2) + "\n")
    atomic_write_text(paths[1], render_markdown(summary))
    return paths
