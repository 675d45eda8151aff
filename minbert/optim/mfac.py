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
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
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
            a ``float`` in (0, 1] the kept fraction of all parameters.
        check_memory: run the free-memory preflight before allocating the window.

    Raises:
        MFACMemoryError: (a ``MemoryError``) if the window does not fit.

    Note:
        ``state_dict()`` returns references to the live window (like torch's
        optimizers do for their state); ``torch.save`` it or deep-copy it before
        stepping again if you need a snapshot.
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

        self.sparsity_k = self._resolve_k(sparsity_k)
        self._index_dtype = torch.int32 if self.dim < 2**31 else torch.int64
        chunk = _CHUNK_ELEMS.get(self.device.type, _CHUNK_ELEMS["cuda"])
        if self.sparsity_k is not None:
            self._rows_per_chunk = max(1, min(num_grads, chunk // self.sparsity_k))
            self._chunk_elems = self._rows_per_chunk * self.sparsity_k
        elif self.window_dtype != self.compute_dtype:
            self._cols_per_chunk = max(1, min(self.dim, chunk // num_grads))
            self._chunk_elems = self._cols_per_chunk * num_grads
        else:
            self._chunk_elems = 0

        if check_memory:
            self._preflight()
        self._allocate()

    # ------------------------------------------------------------------ setup

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
        """Bytes for (window with m rows, everything else) on the device."""
        wbytes, cbytes = self.window_dtype.itemsize, self.compute_dtype.itemsize
        if self.sparsity_k is None:
            window = m * self.dim * wbytes
            vectors = 1  # u
        else:
            window = m * self.sparsity_k * (wbytes + self._index_dtype.itemsize)
            vectors = 3  # u, error accumulator, dense scratch
        if any(g["momentum"] > 0 for g in self.param_groups):
            vectors += 1
        other = vectors * self.dim * cbytes + 2 * m * m * 8 + self._chunk_elems * cbytes
        return window, other

    def _preflight(self):
        """Refuse (one-line MemoryError) if the window cannot fit in free memory."""
        free = free_memory_bytes(self.device)
        if free is None:
            return
        window, other = self._memory_needed(self.num_grads)
        needed = window + other
        if needed <= free:
            return
        lo, hi = 0, self.num_grads  # largest m with memory(m) <= free
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if sum(self._memory_needed(mid)) <= free:
                lo = mid
            else:
                hi = mid - 1
        dtype = str(self.window_dtype).removeprefix("torch.")
        if self.sparsity_k is not None:
            layout = f"{self.num_grads} x top-{self.sparsity_k:,} of {self.dim:,} params x ({dtype} + index)"
            hint = "a smaller sparsity_k"
        else:
            layout = f"{self.num_grads} x {self.dim:,} params x {dtype}"
            hint = "sparsity_k" if self.window_dtype.itemsize <= 2 else "window_dtype=torch.bfloat16 or sparsity_k"
        raise MFACMemoryError(
            f"MFAC gradient window does not fit on {self.device}: needed {_gib(needed)} "
            f"({layout}), free {_gib(free)}; largest num_grads that fits: {lo} "
            f"(or compress the window with {hint})"
        )

    def _allocate(self):
        m, d, dev = self.num_grads, self.dim, self.device
        cdt = self.compute_dtype
        if self.sparsity_k is None:
            self._window = torch.zeros(m, d, dtype=self.window_dtype, device=dev)
        else:
            k = self.sparsity_k
            self._values = torch.zeros(m, k, dtype=self.window_dtype, device=dev)
            self._indices = torch.zeros(m, k, dtype=self._index_dtype, device=dev)
            self._error = torch.zeros(d, dtype=cdt, device=dev)
            self._dense = torch.zeros(d, dtype=cdt, device=dev)  # scratch: |a|, then c densely
            self._topk_vals = torch.empty(k, dtype=cdt, device=dev)
            self._topk_idx = torch.empty(k, dtype=torch.int64, device=dev)
            self._sort_perm = torch.empty(k, dtype=torch.int64, device=dev)
        self._scratch = torch.empty(self._chunk_elems, dtype=cdt, device=dev)
        # Gram matrix K = G G^T, kept in float64: all m x m algebra is float64.
        self._gram = torch.zeros(m, m, dtype=torch.float64, device=dev)
        self._u = torch.zeros(d, dtype=cdt, device=dev)
        self._momentum_buffer: Optional[torch.Tensor] = None
        self._pos = 0  # ring position of the next gradient
        self._step = 0  # number of gradients seen
        self._u_views = self._views(self._u)

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
        if self.sparsity_k is None:
            dots = self._insert_dense(j, filled)
        else:
            dots = self._insert_sparse(j, filled)
        self._gram[j, :filled] = dots
        self._gram[:filled, j] = dots

        # 2) y = (m*lambda*I + K)^{-1} e_j in float64 (K is SPD: Cholesky, no LU needed).
        y = self._solve_unit(filled, j)
        y.mul_(m)

        # 3) u = F^{-1} c = m * G^T y, with c the stored (possibly compressed) row j.
        if self.sparsity_k is None:
            self._combine_dense(y, filled)
        else:
            self._combine_sparse(y, filled)

        self._pos = (j + 1) % m
        self._step += 1
        self._apply_update()
        return loss

    def _flat_grads(self) -> list[torch.Tensor]:
        return [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in self._params]

    def _insert_dense(self, j: int, filled: int) -> torch.Tensor:
        row = self._window[j]
        torch.cat(self._flat_grads(), out=row)  # one fused copy (and cast) into the window
        rows = self._window[:filled]
        if self.window_dtype == self.compute_dtype:
            return torch.mv(rows, row).to(torch.float64)
        # Low-precision window: up-cast column blocks so dot products (and K) are
        # accumulated in the compute dtype, never rounded to bf16.
        dots = torch.zeros(filled, dtype=torch.float64, device=self.device)
        step = self._cols_per_chunk
        for c0 in range(0, self.dim, step):
            c1 = min(self.dim, c0 + step)
            block = self._scratch[: filled * (c1 - c0)].view(filled, c1 - c0)
            block.copy_(rows[:, c0:c1])
            dots += torch.mv(block, block[j]).to(torch.float64)
        return dots

    def _insert_sparse(self, j: int, filled: int) -> torch.Tensor:
        e, dense, k = self._error, self._dense, self.sparsity_k
        # Error feedback: a = g + e (accumulated in place in e).
        grads, views = [], []
        for p, v in zip(self._params, self._views(e)):
            if p.grad is not None:
                grads.append(p.grad)
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
        later gathers / scatters walk memory in order.
        """
        k, d, out = self.sparsity_k, self.dim, self._topk_idx
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
        rows, u = self._window[:filled], self._u
        if self.window_dtype == self.compute_dtype:
            torch.mv(rows.t(), y.to(self.compute_dtype), out=u)
            return
        y = y.to(self.compute_dtype)  # coefficients must not be rounded to bf16
        step = self._cols_per_chunk
        for c0 in range(0, self.dim, step):
            c1 = min(self.dim, c0 + step)
            block = self._scratch[: filled * (c1 - c0)].view(filled, c1 - c0)
            block.copy_(rows[:, c0:c1])
            torch.mv(block.t(), y, out=u[c0:c1])

    def _combine_sparse(self, y: torch.Tensor, filled: int):
        u, k = self._u, self.sparsity_k
        y = y.to(self.compute_dtype)
        u.zero_()
        step = self._rows_per_chunk
        for r0 in range(0, filled, step):
            r1 = min(filled, r0 + step)
            scaled = self._scratch[: (r1 - r0) * k].view(r1 - r0, k)
            torch.mul(self._values[r0:r1], y[r0:r1, None], out=scaled)
            u.index_add_(0, self._indices[r0:r1].reshape(-1), scaled.view(-1))

    def _apply_update(self):
        """Momentum, decoupled weight decay and p -= lr * u, per param group."""
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
            state.update(values=self._values, indices=self._indices, error=self._error)
        return state

    def state_dict(self) -> dict:
        """torch.optim state dict plus an ``"mfac"`` entry with the window, the
        Gram matrix, the error accumulator, momentum, ring position and step."""
        state_dict = super().state_dict()
        state_dict["mfac"] = self._mfac_state()
        return state_dict

    def load_state_dict(self, state_dict: dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop("mfac", None)
        if saved is None:
            raise ValueError("not an MFAC state dict: missing the 'mfac' entry")
        for key in ("num_grads", "dim", "sparsity_k"):
            if saved[key] != getattr(self, key):
                raise ValueError(
                    f"MFAC state dict has {key}={saved[key]} but this optimizer has {key}={getattr(self, key)}"
                )
        super().load_state_dict(state_dict)
        # Copy in place: keeps the preallocated (device, dtype) buffers and their views.
        mine = self._mfac_state()
        for key in ("gram", "window", "values", "indices", "error"):
            if key in mine:
                mine[key].copy_(saved[key])
        if saved["momentum_buffer"] is not None:
            if self._momentum_buffer is None:
                self._momentum_buffer = torch.zeros_like(self._u)
                self._momentum_views = self._views(self._momentum_buffer)
            self._momentum_buffer.copy_(saved["momentum_buffer"])
        else:
            self._momentum_buffer = None
        self._pos = int(saved["pos"])
        self._step = int(saved["step"])
