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

Code layout: the optimizer here; what a checkpoint holds of it (state_dict and
load_state_dict) in mfac_checkpoint.py, the window storages in mfac_window.py,
the memory preflight in mfac_memory.py, the sharding over ranks in mfac_shards.py.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch.optim import Optimizer

from minbert.methods.optim.mfac_checkpoint import MFACCheckpoint
from minbert.methods.optim.mfac_memory import MFACMemoryError, check_window_fits, free_memory_bytes
from minbert.methods.optim.mfac_shards import ShardLayout
from minbert.methods.optim.mfac_window import make_window, parse_window_dtype, resolve_sparsity_k

__all__ = ["MFAC", "MFACMemoryError", "free_memory_bytes"]


class MFAC(MFACCheckpoint, Optimizer):
    r"""Dense M-FAC (Frantar et al., 2021) with an optional compressed window.

    Keeps the last ``num_grads`` flattened gradients of *all* parameters (the
    preconditioner is global, as in the paper) and steps with

    .. math::
        u = F^{-1} g,\quad F = \lambda I + \tfrac{1}{m}\textstyle\sum_{i=1}^{m} g_i g_i^\top,

    optionally followed by momentum on ``u`` and ``p -= lr * u``. By default as
    IST-DASLab/M-FAC ``optim.py`` (commit 835320e): weight decay is added to the
    gradient before the window (``g = grad + weight_decay * p``) and momentum is
    damped, ``v = momentum * v + (1 - momentum) * u``. Options: minbert's forms
    before 2026-12, ``decoupled_weight_decay=True`` (``p -= lr * wd * p``, outside
    F) and ``dampening`` (torch SGD's ``v = momentum * v + (1 - dampening) * u``;
    None = ``momentum``; 0 = plain heavy ball). ``lr``, ``momentum``,
    ``dampening`` and ``weight_decay`` may differ per param group; the rest is global.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate.
        num_grads: window size m (number of past gradients kept).
        damp: dampening lambda > 0 of the empirical Fisher (paper Eq. 1). May be
            changed between steps (``opt.damp = ...``); the Gram matrix does not
            depend on it.
        momentum: momentum applied to the preconditioned update.
        weight_decay: weight decay, added to the gradient (the reference's) or
            decoupled (``decoupled_weight_decay=True``).
        dampening: momentum's dampening (None: equal to ``momentum``, as the reference).
        decoupled_weight_decay: decay the weights AdamW-style, outside F.
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
        dampening: Optional[float] = None,
        decoupled_weight_decay: bool = False,
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
        if dampening is not None and not 0.0 <= dampening <= 1.0:
            raise ValueError(f"invalid dampening {dampening}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening))
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
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
        self.window_dtype = parse_window_dtype(window_dtype) or first.dtype
        if not self.window_dtype.is_floating_point:
            raise ValueError(f"window_dtype must be a floating point dtype, got {self.window_dtype}")

        self._shards = ShardLayout(self._params, process_group, shard_window)
        self.sparsity_k = resolve_sparsity_k(sparsity_k, self.dim)
        self._shard_ks = self._shards.split_k(self.sparsity_k)  # top-k entries kept per rank
        local_k = self._shard_ks[self._shards.rank] if self._shard_ks else None
        self._storage = make_window(
            num_grads, self._shards.piece_sizes, self.window_dtype, self.compute_dtype, self.device, local_k
        )
        if check_memory:
            check_window_fits(
                needed=lambda m: sum(self._memory_needed(m)), free=free_memory_bytes(self.device),
                num_grads=num_grads, dim=self.dim, local_dim=self._shards.local_dim, local_k=local_k,
                window_dtype=self.window_dtype, device=self.device, shards=self._shards,
            )
        self._storage.allocate()
        # Gram matrix K = G G^T, kept in float64: all m x m algebra is float64.
        self._gram = torch.zeros(num_grads, num_grads, dtype=torch.float64, device=self.device)
        self._u, self._u_local = self._shards.update_buffers(self.compute_dtype)
        self._u_views = self._views(self._u)
        self._momentum_buffer: Optional[torch.Tensor] = None
        self._pos = 0  # ring position of the next gradient
        self._step = 0  # number of gradients seen
        self._consolidated: Optional[dict] = None  # full "mfac" entry on rank `to`, until the next step

    @property
    def sharded(self) -> bool:
        """True when the window is split over the ranks of a process group."""
        return self._shards.sharded

    def _memory_needed(self, m: int) -> tuple[int, int]:
        """Bytes on this rank's device for (window with m rows, everything else)."""
        window, window_buffers = self._storage.memory_bytes(m)
        vectors = self.dim  # u: every rank applies the whole update
        if self.sharded:
            vectors += self._shards.shard_len  # this rank's slice of u before the all_gather
        if any(g["momentum"] > 0 for g in self.param_groups):
            vectors += self.dim
        return window, window_buffers + vectors * self.compute_dtype.itemsize + 2 * m * m * 8

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views (parameter shapes) into a flat length-d vector."""
        return [v.view_as(p) for v, p in zip(flat.split(self._numels), self._params)]

    def add_param_group(self, param_group):
        if hasattr(self, "_params"):
            raise RuntimeError("MFAC preconditions all parameters jointly; add all param groups at construction")
        super().add_param_group(param_group)

    # The window's buffers under the names tests and benchmarks/mfac_step.py read.
    _window = property(lambda self: self._storage.rows)
    _values = property(lambda self: self._storage.values)
    _indices = property(lambda self: self._storage.indices)

    def _topk_indices(self, scores: torch.Tensor) -> torch.Tensor:
        return self._storage.topk_indices(scores)

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
        if any(p.grad is not None and p.grad.is_sparse for p in self._params):
            raise RuntimeError("MFAC does not support sparse gradients")

        m, j = self.num_grads, self._pos
        filled = min(self._step + 1, m)  # rows in use after this insert (ring fills 0..m-1 first)

        # 1) Write the newest gradient (compressed: c) into row j. G[:filled] @ row_j is
        #    both the new row/column j of K and the Woodbury right-hand side; sharded,
        #    each rank has the dot products of its columns, so they are summed.
        self._storage.insert(j, self._window_grads())
        dots = self._shards.sum_over_ranks(self._storage.dots(j, filled))
        self._gram[j, :filled] = dots
        self._gram[:filled, j] = dots

        # 2) y = m * (m*lambda*I + K)^{-1} e_j in float64 (K is SPD: Cholesky, no LU needed).
        y = self._solve_unit(filled, j).mul_(m)

        # 3) u = F^{-1} c = G^T y; sharded, each rank forms its slice and the slices are gathered.
        self._storage.combine(y, filled, out=self._u_local[: self._shards.local_dim])
        self._shards.gather_update(self._u_local)

        self._pos = (j + 1) % m
        self._step += 1
        self._consolidated = None
        self._apply_update()
        return loss

    def _window_grads(self) -> list:
        """This rank's gradient pieces, with ``weight_decay * p`` added unless the decay is decoupled (the
        reference's ``tmp = p.grad + self.weight_decay * p``; a parameter without a gradient stays without)."""
        grads = self._shards.local_grads()
        decay = {id(p): g["weight_decay"] for g in self.param_groups for p in g["params"]}
        if self.decoupled_weight_decay or not any(decay.values()):
            return grads
        return [g if g is None or not decay[id(p)] else g + decay[id(p)] * p.reshape(-1)[a:b]
                for g, (p, a, b) in zip(grads, self._shards.pieces)]

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

    def _apply_update(self):
        """Momentum, decoupled weight decay (if chosen) and p -= lr * u, per param group.

        Sharded, every rank applies the whole (gathered) update: identical inputs
        give identical parameters, and momentum stays as in one process."""
        if self._momentum_buffer is None and any(g["momentum"] > 0 for g in self.param_groups):
            self._new_momentum_buffer()
        start = 0
        for group in self.param_groups:
            params = group["params"]
            updates = self._u_views[start : start + len(params)]
            if group["momentum"] > 0:
                bufs = self._momentum_views[start : start + len(params)]
                dampening = group["momentum"] if group["dampening"] is None else group["dampening"]
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, updates, alpha=1.0 - dampening)
                updates = bufs
            start += len(params)
            if group["weight_decay"] != 0 and self.decoupled_weight_decay:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])

    def _new_momentum_buffer(self) -> None:
        """Zero momentum (and its per-parameter views), allocated at the first step that uses it."""
        self._momentum_buffer = torch.zeros_like(self._u)
        self._momentum_views = self._views(self._momentum_buffer)
