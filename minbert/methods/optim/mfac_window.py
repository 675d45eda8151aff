"""Gradient windows for M-FAC: where the last m gradients live, and the two passes over them.

A window holds m rows G = [g_1; ...; g_m] (a ring buffer; unfilled rows are zero)
over this rank's columns of the flat parameter vector (all of them in one
process, see mfac_shards.py). Every storage has the same interface, used once
per step by ``MFAC.step()``:

    insert(j, grads)          write the newest gradient into ring slot j
    dots(j, filled)           G[:filled] @ G[j] in float64: row/column j of the
                              Gram matrix K = G G^T, and the Woodbury right-hand side
    combine(y, filled, out)   out = G[:filled]^T y: coefficients -> direction

plus ``memory_bytes(m)`` for the preflight, ``allocate()``, and ``state()`` /
``load_state()`` for checkpoints.

Three storages:
    DenseWindow         m x d in the compute dtype; each pass is one torch.mv.
    LowPrecisionWindow  m x d in another dtype (bf16: half the memory); the passes
                        up-cast column blocks so K and y are never rounded.
    TopKWindow          top-k values + indices per row, with error feedback
                        (Modoranu et al. 2023, arXiv:2306.06098).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "GradientWindow", "DenseWindow", "LowPrecisionWindow", "TopKWindow",
    "make_window", "parse_window_dtype", "resolve_sparsity_k",
]

# Scratch size (elements) for the chunked kernels (compressed window, or a window
# dtype that differs from the compute dtype). Small on CPU to stay in cache,
# larger on CUDA to amortize kernel launches.
_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 24}

_DTYPE_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_window_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """A torch dtype from ``window_dtype`` ('bf16', 'float32', torch.bfloat16, ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown window_dtype {dtype!r}; use one of {sorted(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[key]


def resolve_sparsity_k(sparsity_k: Union[None, int, float], dim: int) -> Optional[int]:
    """The number of entries a top-k window keeps of ``dim``: an int count or a float fraction in (0, 1]."""
    if sparsity_k is None:
        return None
    if isinstance(sparsity_k, bool):
        raise ValueError(f"sparsity_k must be an int or a float fraction, got {sparsity_k!r}")
    if isinstance(sparsity_k, float):
        if not 0.0 < sparsity_k <= 1.0:
            raise ValueError(f"fractional sparsity_k must be in (0, 1], got {sparsity_k}")
        return max(1, min(dim, round(sparsity_k * dim)))
    if isinstance(sparsity_k, int) and sparsity_k >= 1:
        return min(dim, sparsity_k)
    raise ValueError(f"sparsity_k must be a positive int or a float in (0, 1], got {sparsity_k!r}")


class GradientWindow(ABC):
    """The last ``num_grads`` gradients over ``sum(piece_sizes)`` columns.

    ``grads`` passed to ``insert`` is a list aligned with ``piece_sizes``: one flat
    gradient piece per entry, or None for a parameter without a gradient (zeros).
    Sizes are fixed at construction; buffers appear in ``allocate()``, so the
    preflight can ask ``memory_bytes`` first.
    """

    def __init__(self, num_grads: int, piece_sizes: Sequence[int], dtype: torch.dtype,
                 compute_dtype: torch.dtype, device: torch.device):
        self.num_grads = num_grads
        self.piece_sizes = list(piece_sizes)
        self.dim = sum(self.piece_sizes)
        self.dtype = dtype  # storage dtype of the window
        self.compute_dtype = compute_dtype  # dtype of dot products, scratch and the direction
        self.device = device
        self.chunk = _CHUNK_ELEMS.get(device.type, _CHUNK_ELEMS["cuda"])

    @abstractmethod
    def memory_bytes(self, m: int) -> tuple[int, int]:
        """Bytes for (an m-row window, this storage's other buffers)."""

    @abstractmethod
    def allocate(self) -> None:
        """Create the (zero) window and its scratch buffers on ``device``."""

    @abstractmethod
    def insert(self, j: int, grads: list[Optional[torch.Tensor]]) -> None:
        """Store the newest gradient as row j (compressed storages store what defines F)."""

    @abstractmethod
    def dots(self, j: int, filled: int) -> torch.Tensor:
        """float64 dot products of rows 0..filled-1 with row j."""

    @abstractmethod
    def combine(self, y: torch.Tensor, filled: int, out: torch.Tensor) -> None:
        """out = G[:filled]^T y for float64 coefficients y (``out``: compute dtype, length ``dim``)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """The window's tensors for a checkpoint, by name (references, not copies)."""

    def load_state(self, saved: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's tensors in place (keeps dtype, device and views)."""
        for name, buffer in self.state().items():
            buffer.copy_(saved[name])


class DenseWindow(GradientWindow):
    """m x d rows stored in the compute dtype: each window pass is one torch.mv."""

    def memory_bytes(self, m: int) -> tuple[int, int]:
        return m * self.dim * self.dtype.itemsize, 0

    def allocate(self) -> None:
        self.rows = torch.zeros(self.num_grads, self.dim, dtype=self.dtype, device=self.device)

    def insert(self, j, grads):
        pieces = [g if g is not None else self.rows.new_zeros(n) for g, n in zip(grads, self.piece_sizes)]
        torch.cat(pieces, out=self.rows[j])  # one fused copy (and cast) into the window

    def dots(self, j, filled):
        return torch.mv(self.rows[:filled], self.rows[j]).to(torch.float64)

    def combine(self, y, filled, out):
        torch.mv(self.rows[:filled].t(), y.to(self.compute_dtype), out=out)

    def state(self):
        return {"window": self.rows}


class LowPrecisionWindow(DenseWindow):
    """m x d rows in a dtype other than the compute dtype (bf16 halves the memory).

    Both passes up-cast column blocks into a scratch buffer, so the dot products
    (hence K) and the combination are accumulated in the compute dtype, and the
    coefficients y are never rounded to bf16. The vector being preconditioned is
    the stored (rounded) row, so the update stays consistent with F.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cols_per_chunk = max(1, min(self.dim, self.chunk // self.num_grads))
        self.scratch_elems = self.cols_per_chunk * self.num_grads

    def memory_bytes(self, m: int) -> tuple[int, int]:
        return m * self.dim * self.dtype.itemsize, self.scratch_elems * self.compute_dtype.itemsize

    def allocate(self) -> None:
        super().allocate()
        self.scratch = torch.empty(self.scratch_elems, dtype=self.compute_dtype, device=self.device)

    def _blocks(self, filled: int):
        """(first column, last column, up-cast block of rows[:filled]) for each column block."""
        for c0 in range(0, self.dim, self.cols_per_chunk):
            c1 = min(self.dim, c0 + self.cols_per_chunk)
            block = self.scratch[: filled * (c1 - c0)].view(filled, c1 - c0)
            block.copy_(self.rows[:filled, c0:c1])
            yield c0, c1, block

    def dots(self, j, filled):
        dots = torch.zeros(filled, dtype=torch.float64, device=self.device)
        for _, _, block in self._blocks(filled):
            dots += torch.mv(block, block[j]).to(torch.float64)
        return dots

    def combine(self, y, filled, out):
        y = y.to(self.compute_dtype)
        for c0, c1, block in self._blocks(filled):
            torch.mv(block.t(), y, out=out[c0:c1])


class TopKWindow(GradientWindow):
    """Each row stored as its top-k values (window dtype) and int32 indices, with error feedback.

    Modoranu et al. 2023: ``a = g + e; c = topk(a); e = a - c``. F is built from,
    and applied to, the compressed c, which is again the row just stored, so the
    collapsed Woodbury form of mfac.py holds unchanged. The passes are sparse:
    dots scatters c into a dense scratch vector and gathers it at each row's
    indices; combine is a scatter-add. Both run over row chunks of a scratch buffer.
    """

    def __init__(self, num_grads, piece_sizes, dtype, compute_dtype, device, k: int):
        super().__init__(num_grads, piece_sizes, dtype, compute_dtype, device)
        self.k = k
        self.index_dtype = torch.int32 if self.dim < 2**31 else torch.int64
        self.rows_per_chunk = max(1, min(num_grads, self.chunk // k))
        self.scratch_elems = self.rows_per_chunk * k

    def memory_bytes(self, m: int) -> tuple[int, int]:
        window = m * self.k * (self.dtype.itemsize + self.index_dtype.itemsize)
        return window, (2 * self.dim + self.scratch_elems) * self.compute_dtype.itemsize  # error, dense, scratch

    def allocate(self) -> None:
        m, k, d, cdt, dev = self.num_grads, self.k, self.dim, self.compute_dtype, self.device
        self.values = torch.zeros(m, k, dtype=self.dtype, device=dev)
        self.indices = torch.zeros(m, k, dtype=self.index_dtype, device=dev)  # local to these columns
        self.error = torch.zeros(d, dtype=cdt, device=dev)
        self.dense = torch.zeros(d, dtype=cdt, device=dev)  # scratch: |a|, then c densely
        self.topk_vals = torch.empty(k, dtype=cdt, device=dev)
        self.topk_idx = torch.empty(k, dtype=torch.int64, device=dev)
        self.sort_perm = torch.empty(k, dtype=torch.int64, device=dev)
        self.scratch = torch.empty(self.scratch_elems, dtype=cdt, device=dev)

    def insert(self, j, grads):
        e = self.error
        # Error feedback: a = g + e (accumulated in place in e).
        present = [(g, v) for g, v in zip(grads, e.split(self.piece_sizes)) if g is not None]
        if present:
            torch._foreach_add_([v for _, v in present], [g for g, _ in present])
        torch.abs(e, out=self.dense)
        idx, vals = self.topk_indices(self.dense), self.topk_vals
        torch.index_select(e, 0, idx, out=vals)
        self.indices[j].copy_(idx)
        self.values[j].copy_(vals)
        if self.dtype != self.compute_dtype:
            vals.copy_(self.values[j])  # the stored (rounded) values define c
        e.index_add_(0, idx, vals, alpha=-1.0)  # e = a - c

    def dots(self, j, filled):
        # Row j densely (c, as stored), then gathered at every stored row's indices.
        idx, vals, dense, k = self.topk_idx, self.topk_vals, self.dense, self.k
        idx.copy_(self.indices[j])
        vals.copy_(self.values[j])
        dense.zero_()
        dense.index_copy_(0, idx, vals)
        dots = torch.empty(filled, dtype=torch.float64, device=self.device)
        for r0 in range(0, filled, self.rows_per_chunk):
            r1 = min(filled, r0 + self.rows_per_chunk)
            gathered = self.scratch[: (r1 - r0) * k].view(r1 - r0, k)
            torch.index_select(dense, 0, self.indices[r0:r1].reshape(-1), out=gathered.view(-1))
            gathered.mul_(self.values[r0:r1])
            dots[r0:r1] = gathered.sum(dim=1, dtype=torch.float64)
        return dots

    def combine(self, y, filled, out):
        y, k = y.to(self.compute_dtype), self.k
        out.zero_()
        for r0 in range(0, filled, self.rows_per_chunk):
            r1 = min(filled, r0 + self.rows_per_chunk)
            scaled = self.scratch[: (r1 - r0) * k].view(r1 - r0, k)
            torch.mul(self.values[r0:r1], y[r0:r1, None], out=scaled)
            out.index_add_(0, self.indices[r0:r1].reshape(-1), scaled.view(-1))

    def state(self):
        return {"values": self.values, "indices": self.indices, "error": self.error}

    def topk_indices(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the k largest scores, in ascending order (written to ``topk_idx``).

        A full top-k over d entries is slow; instead take a threshold from a
        strided sample that keeps ~2k candidates, then run the exact top-k on
        those. If fewer than k candidates survive, fall back to the full top-k,
        so the result is always the exact top-k. Sorting the indices makes the
        later gathers / scatters walk memory in order.
        """
        k, d, out = self.k, self.dim, self.topk_idx
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
        torch.sort(top, out=(out, self.sort_perm))
        return out


def make_window(num_grads: int, piece_sizes: Sequence[int], dtype: torch.dtype, compute_dtype: torch.dtype,
                device: torch.device, k: Optional[int] = None) -> GradientWindow:
    """The storage for these options: top-k when k is given, else dense (up-cast blocks if dtypes differ)."""
    if k is not None:
        return TopKWindow(num_grads, piece_sizes, dtype, compute_dtype, device, k)
    cls = DenseWindow if dtype == compute_dtype else LowPrecisionWindow
    return cls(num_grads, piece_sizes, dtype, compute_dtype, device)
