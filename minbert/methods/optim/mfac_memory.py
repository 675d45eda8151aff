"""Memory preflight for M-FAC: refuse, in one line, a gradient window that does not fit.

A dense window over all parameters of a BERT encoder easily needs more memory
than the machine has (1024 x 22.7M x fp32 = 87 GiB). Instead of failing deep
inside an allocation (or swapping the host to a halt), MFAC checks the free
memory before allocating anything and names the largest ``num_grads`` that fits.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

__all__ = ["MFACMemoryError", "free_memory_bytes", "check_window_fits"]


class MFACMemoryError(MemoryError):
    """Raised when the M-FAC gradient window does not fit into free device memory."""


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Best-effort free memory (bytes) on `device`, or None when unknown.

    CUDA: free memory reported by the driver plus memory PyTorch's caching
    allocator holds but does not use. CPU: MemAvailable from /proc/meminfo,
    capped by a cgroup v2 memory limit if one is set; falls back to sysconf.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    if device.type != "cpu":
        return None

    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    # Containers often see the host's MemAvailable; respect the cgroup limit too.
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            free = min(free, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return free


def ranks_sharing_memory(sharded: bool, device: torch.device) -> int:
    """Ranks whose windows come out of the same free memory: torchrun's ranks on this host, on CPU."""
    if not sharded or device.type != "cpu":
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def largest_fitting(needed: Callable[[int], int], num_grads: int, free: Optional[int]) -> int:
    """The largest m <= num_grads with needed(m) <= free (num_grads when free is unknown)."""
    if free is None or needed(num_grads) <= free:
        return num_grads
    lo, hi = 0, num_grads
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if needed(mid) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_window_fits(
    *,
    needed: Callable[[int], int],
    free: Optional[int],
    num_grads: int,
    dim: int,
    local_dim: int,
    local_k: Optional[int],
    window_dtype: torch.dtype,
    device: torch.device,
    shards,
) -> None:
    """Raise a one-line MFACMemoryError if this rank's window of ``num_grads`` rows does not fit.

    ``needed(m)``: bytes this rank allocates for an m-row window plus everything
    else; ``free``: free bytes on ``device`` (None: unknown, assume it fits);
    ``local_dim`` / ``local_k``: this rank's columns and kept entries per row
    (``local_k`` None for a dense window); ``shards``: the ShardLayout.

    Sharded, all ranks agree (all_reduce MIN of the largest m that fits on each)
    and raise together: a rank that raised alone would leave the others waiting
    in their first step's all_reduce. The collective also makes every rank read
    its free memory before any rank allocates its shard.
    """
    sharing = ranks_sharing_memory(shards.sharded, device)

    def total(m: int) -> int:
        return sharing * needed(m)

    largest = largest_fitting(total, num_grads, free)
    if shards.sharded:
        largest = shards.min_over_ranks(largest)
    if largest >= num_grads:
        return

    dtype = str(window_dtype).removeprefix("torch.")
    free_text = gib(free) if free is not None else "unknown"
    if local_k is None:
        hint = "sparsity_k" if window_dtype.itemsize <= 2 else "window_dtype=torch.bfloat16 or sparsity_k"
    else:
        hint = "a smaller sparsity_k"
    if not shards.sharded:
        if local_k is not None:
            layout = f"{num_grads} x top-{local_k:,} of {dim:,} params x ({dtype} + index)"
        else:
            layout = f"{num_grads} x {dim:,} params x {dtype}"
        raise MFACMemoryError(
            f"MFAC gradient window does not fit on {device}: needed {gib(total(num_grads))} "
            f"({layout}), free {free_text}; largest num_grads that fits: {largest} "
            f"(or compress the window with {hint})"
        )
    shard = f"{local_dim:,} of {dim:,} params"
    if local_k is not None:
        layout = f"{num_grads} x top-{local_k:,} of its {shard} x ({dtype} + index)"
    else:
        layout = f"{num_grads} x {shard} x {dtype}"
    if sharing > 1:
        layout += f", times {sharing} ranks on this host"
    raise MFACMemoryError(
        f"MFAC gradient window does not fit on {device} on every rank: rank {shards.rank} of {shards.world} "
        f"needs {gib(total(num_grads))} ({layout}), free {free_text}; largest num_grads that fits on all "
        f"ranks: {largest} (or shard over more ranks, or compress the window with {hint})"
    )
