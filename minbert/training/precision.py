"""bfloat16 autocast where the hardware computes in bfloat16 natively: ``--bf16 auto|on|off``.

``on`` runs forward passes and losses under ``torch.autocast(dtype=torch.bfloat16)`` (weights, gradients and
optimizer state stay float32); ``off`` is float32 throughout; ``auto`` is ``on`` where the device has native
bfloat16 arithmetic (see :func:`native_bf16`) and ``off`` elsewhere, where autocast would emulate bfloat16 and
be slower than float32. A run resolves ``auto`` once, before it writes args.json, so args.json and results.json
say what the run did.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from minbert.io.settings import flag_reader

BF16_MODES = ("auto", "on", "off")
# What --bf16 means when not given, in training, --predict_only, minbert-predict, minbert.load and the experiments
# runner: bfloat16 where the device computes it natively, float32 elsewhere. The main job scored the same to three
# decimals in both precisions with the same seed, at 2.2x the training speed in bf16 (issue #24, docs/results.md).
DEFAULT_BF16 = "auto"
# /proc/cpuinfo flags of native bfloat16 arithmetic: x86 AVX512-BF16 and AMX-BF16, Arm's BF16 extension.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# oneDNN's primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024 by default). On CPU, bfloat16 matmuls run through
# oneDNN (float32 ones do not), and every new input shape (dynamic padding: a new sequence length per batch and
# task) adds primitives that stay cached. In the main job's training that cache is where bf16's extra peak memory
# went: benchmarks/bf16_memory.py, 40 steps on one core of an AMD EPYC (Zen 4, AVX512-BF16), 2026-12-03: float32
# 2177 MB, bf16 2885 MB, bf16 with the cache off 2148 MB at the same step time (2.23 s vs 2.28 s; float32 3.48 s).
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = "0"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (x86 ``flags``, Arm ``Features``); empty if unreadable."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16(device: torch.device, cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU with bfloat16 support that is not emulated
    (Ampere and newer), or a CPU with AVX512-BF16, AMX-BF16 or Arm BF16 instructions. torch's own CPU checks
    (cpuinfo, used by its kernels) are asked first; /proc/cpuinfo covers builds or CPUs they miss."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    for check in checks:
        try:
            if check is not None and check():
                return True
        except RuntimeError:  # a torch built without cpuinfo
            pass
    return bool(cpu_flags(cpuinfo) & set(NATIVE_BF16_CPU_FLAGS))


def resolve_bf16(mode: str | bool | None, device: torch.device, smart_ball: bool = False) -> str:
    """``on`` or ``off`` for a --bf16 value on ``device``. ``auto`` stays float32 with SMART's projected form
    (``--smart_projection ball``), whose 1e-5 perturbation is below bfloat16's resolution (an explicit ``on`` with
    it is refused by RunConfig.validate)."""
    if mode in (False, None, "off"):
        return "off"
    if mode == "auto" and (smart_ball or not native_bf16(device)):
        return "off"
    if mode not in (True, "on", "auto"):
        raise ValueError(f"--bf16 {mode}: choose {', '.join(BF16_MODES)}")
    if device.type == "cpu":
        bound_onednn_cache()
    return "on"


def bound_onednn_cache() -> None:
    """Turn oneDNN's primitive cache off for a bfloat16 run on CPU (see ONEDNN_CACHE_CAPACITY), unless the user set
    its size. oneDNN reads the variable when it makes its first primitive, which a run resolving --bf16 has not yet
    done; float32 runs never call this, so they are unchanged."""
    os.environ.setdefault(ONEDNN_CACHE_ENV, ONEDNN_CACHE_CAPACITY)


def parse_bf16(text: str) -> str:
    """--bf16's value: auto, on or off (true/false, as an args.json of an older run holds, mean on/off)."""
    value = str(text).strip().lower()
    value = {"true": "on", "false": "off"}.get(value, value)
    if value not in BF16_MODES:
        raise ValueError(f"{text!r}: choose {', '.join(BF16_MODES)}")
    return value


bf16_flag = flag_reader(parse_bf16)  # --bf16's reader, in every parser that has the flag
