"""M-FAC: matrix-free second-order optimizer.

Implements the dense M-FAC optimizer of Frantar, Kurtic & Alistarh,
"M-FAC: Efficient Matrix-Free Approximations of Second-Order Information"
(NeurIPS 2021, arXiv:2107.03356), plus an optional compressed gradient window
with error feedback (Modoranu et al. 2023, "Error Feedback Can Accurately
Compress Preconditioners", arXiv:2306.06098).

The preconditioner is the damped empirical Fisher (paper Eq. 1) over a sliding
window of the last m gradients:

    F = lambda * I + (1/m) * sum_i g_i g_i^T = lambda * I + (1/m) G^T G,

with G the m x d window (one flattened gradient per row; rows not filled yet
are zero and contribute nothing). Each step applies u = F^{-1} g to the newest
gradient g. Instead of the paper's recursive coefficients for the sliding
window (its "dynamic algorithm", implemented in the reference code with LU
without pivoting and a custom CUDA kernel) we use the Woodbury identity with
the m x m Gram matrix K = G G^T:

    F^{-1} v = (1/lambda) * (v - G^T (m*lambda*I + K)^{-1} G v).

Because g has just been written to row j of G, G g = K e_j and the identity
collapses to a cancellation-free form

    F^{-1} g = m * G^T y,    (m*lambda*I + K) y = e_j,

so a step costs one pass over the window to refresh row/column j of K (which is
also G g), an m x m Cholesky solve in float64, and one pass to form G^T y:
O(m*d + m^3) time like the paper's sliding-window update, and the two window
reads that are the memory floor of any exact method. The same code runs on
CPU and CUDA.

Under torch.distributed (every rank holding the same, already averaged
gradient) the window is sharded by columns: rank r keeps the contiguous slice
[r*s, min(d, (r+1)*s)), s = ceil(d/N), of every window row, so G = [G_0 ... G_{N-1}]
and the three d-sized products split exactly:

    K[j, :] = G g = sum_r G_r g_r      (one all_reduce of m float64 per step)
    u = m G^T y   = [m G_r^T y]_r      (one all_gather of d entries per step)

The m x m solve is repeated on every rank on identical (all-reduced) data.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch.optim import Optimizer

__all__ = ["MFAC", "MFACMemoryError", "free_memory_bytes"]

# Scratch size (elements) for the chunked kernels (compressed window, or a window
# dtype that differs from the compute dtype). Small on CPU to stay in cache,
# larger on CUDA to amortize kernel launches.
_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 24}


class MFACMemoryError(MemoryError):
    """Raised when the M-FAC gradient window does not fit into free device memory."""


def _gib(nbytes: float) -> str:
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


def _parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    }
    key = str(dtype).lower().removeprefix("torch.")
    if key not in aliases:
        raise ValueError(f"unknown window_dtype {dtype!r}; use one of {sorted(aliases)}")
    return aliases[key]


class MFAC(Optimizer):
    r"""Dense M-FAC (Frantar et al., 2021) with an optional compressed window.

    Keeps the last ``num_grads`` flattened gradients of *all* parameters (the
    preconditioner is global, as in the paper) and steps with

    .. math::
        u = F^{-1} g,\quad F = \lambda I + \tfrac{1}{m}\textstyle\sum_{i=1}^{m} g_i g_i^\top,

    optionally followed by heavy-ball momentum on ``u`` (``b = momentum * b + u``),
    decoupled weight decay (``p -= lr * weight_decay * p``) and ``p -= lr * u``.
    ``lr``, ``momentum`` and ``weight_decay`` may differ per param group;
    ``num_grads``, ``damp``, ``window_dtype`` and ``sparsity_k`` are global.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate.
        num_grads: window size m (number of past gradients kept).
        damp: dampening lambda > 0 of the empirical Fisher (paper Eq. 1). May be
            changed between steps (``opt.damp = ...``); the Gram matrix does not
            depend on it.
        momentum: heavy-ball momentum applied to the preconditioned update.
        weight_decay: decoupled (AdamW-style) weight decay.
        window_dtype: storage dtype of the window (default: parameter dtype).
            ``torch.bfloat16`` halves its memory; the preconditioned vector is
            then the bf16-rounded gradient, so the update stays consistent with F.
        sparsity_k: if set, store each window gradient as its top-k entries
            (values + int32 indices) with error feedback (Modoranu et al., 2023):
            ``a = g + e; c = topk(a); e = a - c``; F is built from, and applied
            to, the compressed ``c``. An ``int`` is the number of entries kept,
            a ``float`` in (0, 1] the kept fraction of all parameters. When the
            window is sharded, each rank keeps the top ``ceil(k * d_r / d)`` of
            its own d_r entries (see ``docs/mfac.md``).
        check_memory: run the free-memory preflight before allocating the window.
        process_group: torch.distributed group to shard the window over. None
            means the default group when torch.distributed is initialized, else
            a single process. Every rank must call ``step()`` with the same,
            already averaged gradient.
        shard_window: False keeps the whole window on every rank (no
            communication; every rank repeats the same computation).

    Raises:
        MFACMemoryError: (a ``MemoryError``) if the window does not fit (on any rank).

    Note:
        ``state_dict()`` returns references to the live window (like torch's
        optimizers do for their state); ``torch.save`` it or deep-copy it before
        stepping again if you need a snapshot. With a sharded window it needs
        ``consolidate_state_dict()`` first; ``shard_state_dict()`` is the per-rank
        alternative.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        num_grads: int = 1024,
        damp: float = 1e-6,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        window_dtype: Union[None, str, torch.dtype] = None,
        sparsity_k: Union[None, int, float] = None,
        check_memory: bool = True,
        process_group=None,
        shard_window: bool = True,
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid lr {lr}")
        if isinstance(num_grads, float) and num_grads.is_integer():
            num_grads = int(num_grads)
        if not isinstance(num_grads, int) or isinstance(num_grads, bool) or num_grads < 1:
            raise ValueError(f"num_grads must be a positive int, got {num_grads!r}")
        if not damp > 0.0:
            raise ValueError(f"damp must be > 0 (F must be positive definite), got {damp}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)

        self.num_grads = num_grads
        self.damp = float(damp)

        # Global flat layout of all parameters (all groups, in order).
        self._params = [p for group in self.param_groups for p in group["params"]]
        first = self._params[0]
        self.device = first.device
        for p in self._params:
            if p.device != self.device:
                raise ValueError(f"MFAC needs all parameters on one device, got {self.device} and {p.device}")
            if not p.is_floating_point():
                raise ValueError(f"MFAC only supports floating point parameters, got {p.dtype}")
        self._numels = [p.numel() for p in self._params]
        self.dim = sum(self._numels)
        # The update u and momentum are kept in at least float32.
        self.compute_dtype = torch.promote_types(first.dtype, torch.float32)
        self.window_dtype = _parse_dtype(window_dtype) or first.dtype
        if not self.window_dtype.is_floating_point:
            raise ValueError(f"window_dtype must be a floating point dtype, got {self.window_dtype}")

        self._setup_shards(process_group, shard_window)
        self.sparsity_k = self._resolve_k(sparsity_k)
        # Per-rank number of kept entries: proportional to the shard, rounded up.
        self._shard_ks = None
        if self.sparsity_k is not None:
            self._shard_ks = [min(n, math.ceil(self.sparsity_k * n / self.dim)) for n in self._shard_dims]
        self._local_k = self._shard_ks[self._rank] if self._shard_ks else None
        self._index_dtype = torch.int32 if self._local_dim < 2**31 else torch.int64
        chunk = _CHUNK_ELEMS.get(self.device.type, _CHUNK_ELEMS["cuda"])
        if self.sparsity_k is not None:
            self._rows_per_chunk = max(1, min(num_grads, chunk // self._local_k))
            self._chunk_elems = self._rows_per_chunk * self._local_k
        elif self.window_dtype != self.compute_dtype:
            self._cols_per_chunk = max(1, min(self._local_dim, chunk // num_grads))
            self._chunk_elems = self._cols_per_chunk * num_grads
        else:
            self._chunk_elems = 0

        if check_memory:
            self._preflight()
        self._allocate()

    # ------------------------------------------------------------------ setup

    def _setup_shards(self, process_group, shard_window: bool):
        """Pick the group to shard over and this rank's contiguous slice [start, stop) of the flat parameters."""
        self._group = None
        if not shard_window:
            if process_group is not None:
                raise ValueError("MFAC got a process_group but shard_window=False")
        elif process_group is not None or (dist.is_available() and dist.is_initialized()):
            group = process_group if process_group is not None else dist.group.WORLD
            if dist.get_world_size(group) > 1:
                self._group = group
        self._world = dist.get_world_size(self._group) if self._group is not None else 1
        self._rank = dist.get_rank(self._group) if self._group is not None else 0
        # Equal padded slices of s = ceil(d/N) (the last one shorter), so one
        # all_gather of N*s entries lays the slices of u end to end.
        self._shard_len = -(-self.dim // self._world)
        if (self._world - 1) * self._shard_len >= self.dim:
            raise ValueError(
                f"MFAC cannot shard {self.dim:,} parameters over {self._world} ranks (a rank would get none); "
                "pass shard_window=False"
            )
        self._shard_dims = [min(self.dim, (r + 1) * self._shard_len) - r * self._shard_len for r in range(self._world)]
        self._start = self._rank * self._shard_len
        self._stop = self._start + self._shard_dims[self._rank]
        self._local_dim = self._stop - self._start
        # (parameter, first, last) flat ranges that make up this rank's slice, in order.
        self._pieces, offset = [], 0
        for p, n in zip(self._params, self._numels):
            a, b = max(self._start, offset), min(self._stop, offset + n)
            if a < b:
                self._pieces.append((p, a - offset, b - offset))
            offset += n

    @property
    def sharded(self) -> bool:
        """True when the window is split over the ranks of a process group."""
        return self._group is not None

    def _resolve_k(self, sparsity_k) -> Optional[int]:
        if sparsity_k is None:
            return None
        if isinstance(sparsity_k, bool):
            raise ValueError(f"sparsity_k must be an int or a float fraction, got {sparsity_k!r}")
        if isinstance(sparsity_k, float):
            if not 0.0 < sparsity_k <= 1.0:
                raise ValueError(f"fractional sparsity_k must be in (0, 1], got {sparsity_k}")
            return max(1, min(self.dim, round(sparsity_k * self.dim)))
        if isinstance(sparsity_k, int) and sparsity_k >= 1:
            return min(self.dim, sparsity_k)
        raise ValueError(f"sparsity_k must be a positive int or a float in (0, 1], got {sparsity_k!r}")

    def _memory_needed(self, m: int) -> tuple[int, int]:
        """Bytes on this rank's device for (window with m rows, everything else)."""
        wbytes, cbytes = self.window_dtype.itemsize, self.compute_dtype.itemsize
        d, local = self.dim, self._local_dim
        vectors = d  # u: every rank applies the whole update
        if self.sharded:
            vectors += self._shard_len  # this rank's slice of u before the all_gather
        if self.sparsity_k is None:
            window = m * local * wbytes
        else:
            window = m * self._local_k * (wbytes + self._index_dtype.itemsize)
            vectors += 2 * local  # error accumulator, dense scratch
        if any(g["momentum"] > 0 for g in self.param_groups):
            vectors += d
        other = vectors * cbytes + 2 * m * m * 8 + self._chunk_elems * cbytes
        return window, other

    def _ranks_sharing_memory(self) -> int:
        """Ranks whose windows come out of the same free memory: torchrun's ranks on this host, on CPU."""
        if not self.sharded or self.device.type != "cpu":
            return 1
        try:
            return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            return 1

    def _preflight(self):
        """Refuse (one-line MemoryError) if the window cannot fit in free memory.

        Sharded, all ranks agree (all_reduce MIN of the largest m that fits on each)
        and raise together: a rank that raised alone would leave the others waiting
        in their first step's all_reduce. The collective also makes every rank read
        its free memory before any rank allocates its shard.
        """
        free = free_memory_bytes(self.device)
        sharing = self._ranks_sharing_memory()

        def needed(m: int) -> int:
            return sharing * sum(self._memory_needed(m))

        lo = self.num_grads  # largest m with needed(m) <= free
        if free is not None and needed(self.num_grads) > free:
            lo, hi = 0, self.num_grads
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if needed(mid) <= free:
                    lo = mid
                else:
                    hi = mid - 1
        if self.sharded:
            largest = torch.tensor([lo], dtype=torch.int64, device=self.device)
            dist.all_reduce(largest, op=dist.ReduceOp.MIN, group=self._group)
            lo = int(largest.item())
        if lo >= self.num_grads:
            return

        dtype = str(self.window_dtype).removeprefix("torch.")
        free_text = _gib(free) if free is not None else "unknown"
        if self.sparsity_k is None:
            hint = "sparsity_k" if self.window_dtype.itemsize <= 2 else "window_dtype=torch.bfloat16 or sparsity_k"
        else:
            hint = "a smaller sparsity_k"
        if not self.sharded:
            if self.sparsity_k is not None:
                layout = f"{self.num_grads} x top-{self.sparsity_k:,} of {self.dim:,} params x ({dtype} + index)"
            else:
                layout = f"{self.num_grads} x {self.dim:,} params x {dtype}"
            raise MFACMemoryError(
                f"MFAC gradient window does not fit on {self.device}: needed {_gib(needed(self.num_grads))} "
                f"({layout}), free {free_text}; largest num_grads that fits: {lo} "
                f"(or compress the window with {hint})"
            )
        shard = f"{self._local_dim:,} of {self.dim:,} params"
        if self.sparsity_k is not None:
            layout = f"{self.num_grads} x top-{self._local_k:,} of its {shard} x ({dtype} + index)"
        else:
            layout = f"{self.num_grads} x {shard} x {dtype}"
        if sharing > 1:
            layout += f", times {sharing} ranks on this host"
        raise MFACMemoryError(
            f"MFAC gradient window does not fit on {self.device} on every rank: rank {self._rank} of {self._world} "
            f"needs {_gib(needed(self.num_grads))} ({layout}), free {free_text}; largest num_grads that fits on all "
            f"ranks: {lo} (or shard over more ranks, or compress the window with {hint})"
        )

    def _allocate(self):
        m, d, dev = self.num_grads, self.dim, self.device
        local, cdt = self._local_dim, self.compute_dtype
        if self.sparsity_k is None:
            self._window = torch.zeros(m, local, dtype=self.window_dtype, device=dev)
        else:
            k = self._local_k
            self._values = torch.zeros(m, k, dtype=self.window_dtype, device=dev)
            self._indices = torch.zeros(m, k, dtype=self._index_dtype, device=dev)  # local to the shard
            self._error = torch.zeros(local, dtype=cdt, device=dev)
            self._dense = torch.zeros(local, dtype=cdt, device=dev)  # scratch: |a|, then c densely
            self._topk_vals = torch.empty(k, dtype=cdt, device=dev)
            self._topk_idx = torch.empty(k, dtype=torch.int64, device=dev)
            self._sort_perm = torch.empty(k, dtype=torch.int64, device=dev)
        self._scratch = torch.empty(self._chunk_elems, dtype=cdt, device=dev)
        # Gram matrix K = G G^T, kept in float64: all m x m algebra is float64.
        self._gram = torch.zeros(m, m, dtype=torch.float64, device=dev)
        if self.sharded:
            # u is gathered into N padded slices of s entries; u_local is this rank's slice.
            self._u_padded = torch.zeros(self._world * self._shard_len, dtype=cdt, device=dev)
            self._u = self._u_padded[:d]
            self._u_slices = list(self._u_padded.split(self._shard_len))
            self._u_local = torch.zeros(self._shard_len, dtype=cdt, device=dev)
        else:
            self._u = torch.zeros(d, dtype=cdt, device=dev)
            self._u_local = self._u
        self._momentum_buffer: Optional[torch.Tensor] = None
        self._pos = 0  # ring position of the next gradient
        self._step = 0  # number of gradients seen
        self._u_views = self._views(self._u)
        self._consolidated: Optional[dict] = None  # full "mfac" entry on rank `to`, until the next step

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views (parameter shapes) into a flat length-d vector."""
        return [v.view_as(p) for v, p in zip(flat.split(self._numels), self._params)]

    def add_param_group(self, param_group):
        if hasattr(self, "_params"):
            raise RuntimeError("MFAC preconditions all parameters jointly; add all param groups at construction")
        super().add_param_group(param_group)

    # -------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for p in self._params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("MFAC does not support sparse gradients")

        m, j = self.num_grads, self._pos
        filled = min(self._step + 1, m)  # rows in use after this insert (ring fills 0..m-1 first)

        # 1) Insert the newest gradient as row j and compute G[:filled] @ row_j,
        #    which is both the new row/column j of K and the Woodbury right-hand side.
        #    Sharded, each rank has the dot products of its columns: sum them.
        if self.sparsity_k is None:
            dots = self._insert_dense(j, filled)
        else:
            dots = self._insert_sparse(j, filled)
        if self.sharded:
            dist.all_reduce(dots, group=self._group)
        self._gram[j, :filled] = dots
        self._gram[:filled, j] = dots

        # 2) y = (m*lambda*I + K)^{-1} e_j in float64 (K is SPD: Cholesky, no LU needed).
        #    Every rank solves the same (all-reduced) system.
        y = self._solve_unit(filled, j)
        y.mul_(m)

        # 3) u = F^{-1} c = m * G^T y, with c the stored (possibly compressed) row j;
        #    sharded, each rank forms its slice of u and the slices are all-gathered.
        if self.sparsity_k is None:
            self._combine_dense(y, filled)
        else:
            self._combine_sparse(y, filled)
        if self.sharded:
            dist.all_gather(self._u_slices, self._u_local, group=self._group)

        self._pos = (j + 1) % m
        self._step += 1
        self._consolidated = None
        self._apply_update()
        return loss

    def _local_grads(self) -> list[torch.Tensor]:
        """This rank's slice of the flat gradient, as flat pieces (zeros for a missing grad)."""
        out = []
        for p, a, b in self._pieces:
            out.append(p.grad.reshape(-1)[a:b] if p.grad is not None else p.new_zeros(b - a))
        return out

    def _insert_dense(self, j: int, filled: int) -> torch.Tensor:
        row = self._window[j]
        torch.cat(self._local_grads(), out=row)  # one fused copy (and cast) into the window
        rows = self._window[:filled]
        if self.window_dtype == self.compute_dtype:
            return torch.mv(rows, row).to(torch.float64)
        # Low-precision window: up-cast column blocks so dot products (and K) are
        # accumulated in the compute dtype, never rounded to bf16.
        dots = torch.zeros(filled, dtype=torch.float64, device=self.device)
        step = self._cols_per_chunk
        for c0 in range(0, self._local_dim, step):
            c1 = min(self._local_dim, c0 + step)
            block = self._scratch[: filled * (c1 - c0)].view(filled, c1 - c0)
            block.copy_(rows[:, c0:c1])
            dots += torch.mv(block, block[j]).to(torch.float64)
        return dots

    def _insert_sparse(self, j: int, filled: int) -> torch.Tensor:
        e, dense, k = self._error, self._dense, self._local_k
        # Error feedback: a = g + e (accumulated in place in e).
        grads, views = [], []
        error_pieces = e.split([b - a for _, a, b in self._pieces])
        for (p, a, b), v in zip(self._pieces, error_pieces):
            if p.grad is not None:
                grads.append(p.grad.reshape(-1)[a:b])
                views.append(v)
        if grads:
            torch._foreach_add_(views, grads)
        torch.abs(e, out=dense)
        idx, vals = self._topk_indices(dense), self._topk_vals
        torch.index_select(e, 0, idx, out=vals)
        self._indices[j].copy_(idx)
        self._values[j].copy_(vals)
        if self.window_dtype != self.compute_dtype:
            vals.copy_(self._values[j])  # the stored (rounded) values define c
        # e = a - c; the dense copy of c feeds the sparse dot products below.
        e.index_add_(0, idx, vals, alpha=-1.0)
        dense.zero_()
        dense.index_copy_(0, idx, vals)

        dots = torch.empty(filled, dtype=torch.float64, device=self.device)
        step = self._rows_per_chunk
        for r0 in range(0, filled, step):
            r1 = min(filled, r0 + step)
            gathered = self._scratch[: (r1 - r0) * k].view(r1 - r0, k)
            torch.index_select(dense, 0, self._indices[r0:r1].reshape(-1), out=gathered.view(-1))
            gathered.mul_(self._values[r0:r1])
            dots[r0:r1] = gathered.sum(dim=1, dtype=torch.float64)
        return dots

    def _topk_indices(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the k largest scores, in ascending order (written to self._topk_idx).

        A full top-k over d entries is slow; instead take a threshold from a
        strided sample that keeps ~2k candidates, then run the exact top-k on
        those. If fewer than k candidates survive, fall back to the full top-k,
        so the result is always the exact top-k. Sorting the indices makes the
        later gathers / scatters walk memory in order. (k and d are this rank's.)
        """
        k, d, out = self._local_k, self._local_dim, self._topk_idx
        candidates = None
        if 8 * k <= d and d >= 1 << 16:
            sample = scores[:: max(1, d // (1 << 14))]
            threshold = torch.quantile(sample, 1.0 - 2.0 * k / d)
            candidates = torch.nonzero(scores >= threshold).squeeze(1)
            if candidates.numel() < k:
                candidates = None
        if candidates is None:
            top = torch.topk(scores, k, sorted=False).indices
        else:
            top = candidates[torch.topk(scores[candidates], k, sorted=False).indices]
        torch.sort(top, out=(out, self._sort_perm))
        return out

    def _solve_unit(self, filled: int, j: int) -> torch.Tensor:
        """Solve (m*lambda*I + K[:filled, :filled]) y = e_j in float64."""
        if self.device.type == "cpu" and filled <= 512 and torch.get_num_threads() > 1:
            # Small factorizations are latency-bound; MKL's threaded potrf costs
            # milliseconds (even for 8 x 8) when cores are busy, one thread ~microseconds.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return self._solve_unit_impl(filled, j)
            finally:
                torch.set_num_threads(threads)
        return self._solve_unit_impl(filled, j)

    def _solve_unit_impl(self, filled: int, j: int) -> torch.Tensor:
        shift = self.num_grads * self.damp
        A = self._gram[:filled, :filled].clone()
        A.diagonal().add_(shift)
        rhs = torch.zeros(filled, 1, dtype=torch.float64, device=self.device)
        rhs[j] = 1.0
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, L).squeeze(1)
        # Only reachable through round-off on a nearly singular K: its exact
        # eigenvalues are >= m*lambda, so clamp to that and solve spectrally.
        evals, evecs = torch.linalg.eigh(A)
        return evecs @ ((evecs[j] / evals.clamp_min(shift)))

    def _combine_dense(self, y: torch.Tensor, filled: int):
        rows, u = self._window[:filled], self._u_local[: self._local_dim]
        if self.window_dtype == self.compute_dtype:
            torch.mv(rows.t(), y.to(self.compute_dtype), out=u)
            return
        y = y.to(self.compute_dtype)  # coefficients must not be rounded to bf16
        step = self._cols_per_chunk
        for c0 in range(0, self._local_dim, step):
            c1 = min(self._local_dim, c0 + step)
            block = self._scratch[: filled * (c1 - c0)].view(filled, c1 - c0)
            block.copy_(rows[:, c0:c1])
            torch.mv(block.t(), y, out=u[c0:c1])

    def _combine_sparse(self, y: torch.Tensor, filled: int):
        u, k = self._u_local[: self._local_dim], self._local_k
        y = y.to(self.compute_dtype)
        u.zero_()
        step = self._rows_per_chunk
        for r0 in range(0, filled, step):
            r1 = min(filled, r0 + step)
            scaled = self._scratch[: (r1 - r0) * k].view(r1 - r0, k)
            torch.mul(self._values[r0:r1], y[r0:r1, None], out=scaled)
            u.index_add_(0, self._indices[r0:r1].reshape(-1), scaled.view(-1))

    def _apply_update(self):
        """Momentum, decoupled weight decay and p -= lr * u, per param group.

        Sharded, every rank applies the whole (gathered) update: identical inputs
        give identical parameters, and momentum stays as in one process."""
        if self._momentum_buffer is None and any(g["momentum"] > 0 for g in self.param_groups):
            self._momentum_buffer = torch.zeros_like(self._u)
            self._momentum_views = self._views(self._momentum_buffer)
        start = 0
        for group in self.param_groups:
            n = len(group["params"])
            params = group["params"]
            updates = self._u_views[start : start + n]
            if group["momentum"] > 0:
                bufs = self._momentum_views[start : start + n]
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, updates)
                updates = bufs
            start += n
            if group["weight_decay"] != 0:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])

    # ------------------------------------------------------------ checkpoints
    #
    # A full "mfac" entry (one process, consolidate_state_dict(), or
    # merge_shard_state_dicts()) holds the whole window and does not depend on
    # the world size: load_state_dict() takes each rank's columns from it. A
    # shard entry (shard_state_dict() on a sharded rank) holds one rank's columns
    # plus a "shard" record, and loads only into the same rank of the same layout.
    # Top-k windows are selected per shard, so they resume only with the same
    # per-rank k (i.e. the same number of ranks).

    def _shard_record(self, rank: int) -> dict:
        start = rank * self._shard_len
        return {"rank": rank, "world_size": self._world, "start": start, "stop": start + self._shard_dims[rank]}

    def _mfac_state(self) -> dict:
        state = {
            "num_grads": self.num_grads,
            "dim": self.dim,
            "sparsity_k": self.sparsity_k,
            "pos": self._pos,
            "step": self._step,
            "gram": self._gram,
            "momentum_buffer": self._momentum_buffer,
        }
        if self.sparsity_k is None:
            state["window"] = self._window
        else:
            state.update(values=self._values, indices=self._indices, error=self._error, shard_ks=self._shard_ks)
        if self.sharded:
            state["shard"] = self._shard_record(self._rank)
        return state

    def state_dict(self) -> dict:
        """torch.optim state dict plus an ``"mfac"`` entry with the window, the
        Gram matrix, the error accumulator, momentum, ring position and step.

        Sharded: only on rank ``to`` after ``consolidate_state_dict(to)`` (and no
        step since); the entry then holds the whole window on CPU.
        """
        state_dict = super().state_dict()
        if not self.sharded:
            state_dict["mfac"] = self._mfac_state()
        elif self._consolidated is not None:
            state_dict["mfac"] = self._consolidated
        else:
            raise RuntimeError(
                f"MFAC's window is sharded over {self._world} ranks: call consolidate_state_dict(to=...) on every "
                "rank and then state_dict() on that rank, or save shard_state_dict() on every rank"
            )
        return state_dict

    def shard_state_dict(self) -> dict:
        """This rank's checkpoint without communication: the "mfac" entry holds this
        rank's columns of the window (references) and a "shard" record. Equal to
        ``state_dict()`` when the window is not sharded."""
        state_dict = super().state_dict()
        state_dict["mfac"] = self._mfac_state()
        return state_dict

    @torch.no_grad()
    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective (call on every rank): gather all shards of the window, on CPU,
        on rank ``to`` (a rank of the process group), whose ``state_dict()`` then
        returns a world-size independent checkpoint. Rank ``to`` needs host memory
        for the whole window. Nothing to do when the window is not sharded."""
        if not self.sharded:
            return
        if not 0 <= to < self._world:
            raise ValueError(f"consolidate_state_dict: to={to} is not a rank of the {self._world}-rank group")
        mine = self._mfac_state()
        names = ["window"] if self.sparsity_k is None else ["values", "indices", "error"]
        if self._rank != to:
            for name in names:
                dist.send(mine[name].contiguous(), dst=dist.get_global_rank(self._group, to), group=self._group)
            self._consolidated = None
            return

        def shards():  # one rank's shard at a time, so at most one shard beside the full window
            for rank in range(self._world):
                state = dict(mine, shard=self._shard_record(rank))
                if rank != to:
                    for name in names:
                        cols = self._shard_dims[rank] if name in ("window", "error") else self._shard_ks[rank]
                        shape = (cols,) if name == "error" else (self.num_grads, cols)
                        buf = torch.empty(shape, dtype=mine[name].dtype, device=self.device)
                        dist.recv(buf, src=dist.get_global_rank(self._group, rank), group=self._group)
                        state[name] = buf
                yield {"mfac": state}

        self._consolidated = self.merge_shard_state_dicts(shards())["mfac"]

    @staticmethod
    @torch.no_grad()
    def merge_shard_state_dicts(shards: Iterable[dict]) -> dict:
        """One full (world-size independent) state dict, on CPU, from the
        ``shard_state_dict()`` of every rank (any order). Top-k windows keep their
        per-shard layout (``shard_ks``) with global indices."""
        full, seen, merged = None, set(), None
        for shard_state in shards:
            saved = shard_state["mfac"]
            record = saved.get("shard")
            if record is None:
                raise ValueError("merge_shard_state_dicts: got a state dict that is not a shard")
            if full is None:
                world, m, d = record["world_size"], saved["num_grads"], saved["dim"]
                merged = {key: shard_state[key] for key in shard_state if key != "mfac"}
                full = {key: saved[key] for key in ("num_grads", "dim", "sparsity_k", "pos", "step")}
                full["gram"] = saved["gram"].to("cpu", copy=True)
                momentum = saved["momentum_buffer"]
                full["momentum_buffer"] = None if momentum is None else momentum.to("cpu", copy=True)
                if saved["sparsity_k"] is None:
                    full["window"] = torch.empty(m, d, dtype=saved["window"].dtype)
                else:
                    ks = list(saved["shard_ks"])
                    full["shard_ks"] = ks
                    full["values"] = torch.empty(m, sum(ks), dtype=saved["values"].dtype)
                    full["indices"] = torch.empty(m, sum(ks), dtype=torch.int32 if d < 2**31 else torch.int64)
                    full["error"] = torch.empty(d, dtype=saved["error"].dtype)
            if (record["world_size"], saved["step"], saved["dim"]) != (world, full["step"], full["dim"]):
                raise ValueError("merge_shard_state_dicts: shards come from different runs or steps")
            rank, start, stop = record["rank"], record["start"], record["stop"]
            if "window" in full:
                full["window"][:, start:stop].copy_(saved["window"])
            else:
                c0 = sum(full["shard_ks"][:rank])
                c1 = c0 + full["shard_ks"][rank]
                full["values"][:, c0:c1].copy_(saved["values"])
                full["indices"][:, c0:c1].copy_(saved["indices"].to(torch.int64) + start)
                full["error"][start:stop].copy_(saved["error"])
            seen.add(rank)
        if full is None or seen != set(range(world)):
            missing = sorted(set(range(world)) - seen) if full is not None else "all"
            raise ValueError(f"merge_shard_state_dicts: missing the shards of ranks {missing}")
        merged["mfac"] = full
        return merged

    def load_state_dict(self, state_dict: dict):
        """Load a full state dict (any world size; each rank takes its columns) or
        this rank's own ``shard_state_dict()``."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("mfac", None)
        if saved is None:
            raise ValueError("not an MFAC state dict: missing the 'mfac' entry")
        for key in ("num_grads", "dim", "sparsity_k"):
            if saved[key] != getattr(self, key):
                raise ValueError(
                    f"MFAC state dict has {key}={saved[key]} but this optimizer has {key}={getattr(self, key)}"
                )
        record = saved.get("shard")
        if record is not None and (record["start"], record["stop"]) != (self._start, self._stop):
            raise ValueError(
                f"MFAC state dict holds columns {record['start']}:{record['stop']} (rank {record['rank']} of "
                f"{record['world_size']}) but this rank has {self._start}:{self._stop}; load a consolidated state "
                "dict (consolidate_state_dict or merge_shard_state_dicts) to change the number of ranks"
            )
        if self.sparsity_k is not None:
            saved_ks = list(saved.get("shard_ks") or [saved["sparsity_k"]])
            if record is not None:
                saved_ks = saved_ks[record["rank"] : record["rank"] + 1]
                mine_ks = [self._local_k]
            else:
                mine_ks = self._shard_ks
            if saved_ks != mine_ks:
                raise ValueError(
                    f"MFAC top-k window was saved with per-rank k {saved_ks} but this run has {mine_ks}: top-k "
                    "entries are selected per shard, so resume a sparse window with the same number of ranks"
                )
        super().load_state_dict(state_dict)
        # Copy in place: keeps the preallocated (device, dtype) buffers and their views.
        self._gram.copy_(saved["gram"])
        if record is not None:  # this rank's own shard
            for key in ("window", "values", "indices", "error"):
                if key in saved:
                    getattr(self, "_" + key).copy_(saved[key])
        elif self.sparsity_k is None:
            self._window.copy_(saved["window"][:, self._start : self._stop])
        else:
            c0 = sum(self._shard_ks[: self._rank])
            c1 = c0 + self._local_k
            self._values.copy_(saved["values"][:, c0:c1])
            self._indices.copy_(saved["indices"][:, c0:c1] - self._start)
            self._error.copy_(saved["error"][self._start : self._stop])
        if saved["momentum_buffer"] is not None:
            if self._momentum_buffer is None:
                self._momentum_buffer = torch.zeros_like(self._u)
                self._momentum_views = self._views(self._momentum_buffer)
            self._momentum_buffer.copy_(saved["momentum_buffer"])
        else:
            self._momentum_buffer = None
        self._pos = int(saved["pos"])
        self._step = int(saved["step"])
        self._consolidated = None
