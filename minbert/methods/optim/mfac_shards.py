"""Sharding M-FAC's gradient window over a torch.distributed group, and its checkpoints.

Every rank holds the same, already averaged gradient. Rank r keeps the
contiguous slice [r*s, min(d, (r+1)*s)), s = ceil(d/N), of every window row, so
G = [G_0 ... G_{N-1}] and the three d-sized products of a step split exactly:

    K[j, :] = G g = sum_r G_r g_r      (one all_reduce of m float64 per step)
    u = m G^T y   = [m G_r^T y]_r      (one all_gather of d entries per step)

The m x m solve is repeated on every rank on identical (all-reduced) data.

Checkpoints. A full "mfac" entry (one process, ``consolidate``, or
``merge_shard_state_dicts``) holds the whole window and does not depend on the
world size: ``local_columns`` takes each rank's columns from it. A shard entry
(``shard_state_dict()`` on a sharded rank) holds one rank's columns plus a
"shard" record, and loads only into the same rank of the same layout. Top-k
windows are selected per shard, so they resume only with the same per-rank k
(i.e. the same number of ranks).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist

__all__ = ["ShardLayout", "consolidate", "merge_shard_state_dicts", "check_loadable", "local_columns"]


class ShardLayout:
    """This rank's columns of the flat parameter vector, and the collectives of one step.

    With no group of more than one rank (or ``shard_window=False``) this rank
    keeps every column and the collectives do nothing.
    """

    def __init__(self, params: list[torch.Tensor], process_group=None, shard_window: bool = True):
        self.group = None
        if not shard_window:
            if process_group is not None:
                raise ValueError("MFAC got a process_group but shard_window=False")
        elif process_group is not None or (dist.is_available() and dist.is_initialized()):
            group = process_group if process_group is not None else dist.group.WORLD
            if dist.get_world_size(group) > 1:
                self.group = group
        self.world = dist.get_world_size(self.group) if self.group is not None else 1
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.device = params[0].device
        numels = [p.numel() for p in params]
        self.dim = sum(numels)
        # Equal padded slices of s = ceil(d/N) (the last one shorter), so one
        # all_gather of N*s entries lays the slices of u end to end.
        self.shard_len = -(-self.dim // self.world)
        if (self.world - 1) * self.shard_len >= self.dim:
            raise ValueError(
                f"MFAC cannot shard {self.dim:,} parameters over {self.world} ranks (a rank would get none); "
                "pass shard_window=False"
            )
        self.shard_dims = [min(self.dim, (r + 1) * self.shard_len) - r * self.shard_len for r in range(self.world)]
        self.start = self.rank * self.shard_len
        self.stop = self.start + self.shard_dims[self.rank]
        self.local_dim = self.stop - self.start
        # (parameter, first, last) flat ranges that make up this rank's slice, in order.
        self.pieces, offset = [], 0
        for p, n in zip(params, numels):
            a, b = max(self.start, offset), min(self.stop, offset + n)
            if a < b:
                self.pieces.append((p, a - offset, b - offset))
            offset += n

    @property
    def sharded(self) -> bool:
        return self.group is not None

    @property
    def piece_sizes(self) -> list[int]:
        return [b - a for _, a, b in self.pieces]

    def local_grads(self) -> list[Optional[torch.Tensor]]:
        """This rank's slice of the flat gradient, one flat piece per parameter (None: no gradient)."""
        return [p.grad.reshape(-1)[a:b] if p.grad is not None else None for p, a, b in self.pieces]

    def split_k(self, k: Optional[int]) -> Optional[list[int]]:
        """Per-rank number of top-k entries: proportional to the shard, rounded up."""
        if k is None:
            return None
        return [min(n, math.ceil(k * n / self.dim)) for n in self.shard_dims]

    def update_buffers(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, u_local): the full update, and the buffer this rank's slice of it is formed in."""
        if not self.sharded:
            u = torch.zeros(self.dim, dtype=dtype, device=self.device)
            return u, u
        # u is gathered into N padded slices of s entries; u_local is this rank's slice.
        padded = torch.zeros(self.world * self.shard_len, dtype=dtype, device=self.device)
        self._u_slices = list(padded.split(self.shard_len))
        return padded[: self.dim], torch.zeros(self.shard_len, dtype=dtype, device=self.device)

    def sum_over_ranks(self, dots: torch.Tensor) -> torch.Tensor:
        """Each rank's dot products over its columns, summed: G g over all columns."""
        if self.sharded:
            dist.all_reduce(dots, group=self.group)
        return dots

    def gather_update(self, u_local: torch.Tensor) -> None:
        """All ranks' slices of u into the u of ``update_buffers``."""
        if self.sharded:
            dist.all_gather(self._u_slices, u_local, group=self.group)

    def min_over_ranks(self, value: int) -> int:
        if not self.sharded:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def record(self, rank: int) -> dict:
        """The "shard" record of a checkpoint: which columns of which layout it holds."""
        start = rank * self.shard_len
        return {"rank": rank, "world_size": self.world, "start": start, "stop": start + self.shard_dims[rank]}


def _window_keys(entry: dict) -> list[str]:
    """The entries of an "mfac" state that hold window columns (the rest is the same on every rank)."""
    return ["window"] if entry["sparsity_k"] is None else ["values", "indices", "error"]


@torch.no_grad()
def consolidate(mine: dict, layout: ShardLayout, to: int, shard_ks: Optional[list[int]]) -> Optional[dict]:
    """Collective: every rank sends its window columns to rank ``to``, which returns the
    full "mfac" entry on CPU (None on the other ranks). ``mine`` is this rank's entry."""
    if not 0 <= to < layout.world:
        raise ValueError(f"consolidate_state_dict: to={to} is not a rank of the {layout.world}-rank group")
    names = _window_keys(mine)
    if layout.rank != to:
        for name in names:
            dist.send(mine[name].contiguous(), dst=dist.get_global_rank(layout.group, to), group=layout.group)
        return None

    def shards():  # one rank's shard at a time, so at most one shard beside the full window
        for rank in range(layout.world):
            state = dict(mine, shard=layout.record(rank))
            if rank != to:
                for name in names:
                    cols = layout.shard_dims[rank] if name in ("window", "error") else shard_ks[rank]
                    shape = (cols,) if name == "error" else (mine["num_grads"], cols)
                    buf = torch.empty(shape, dtype=mine[name].dtype, device=layout.device)
                    dist.recv(buf, src=dist.get_global_rank(layout.group, rank), group=layout.group)
                    state[name] = buf
            yield {"mfac": state}

    return merge_shard_state_dicts(shards())["mfac"]


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


def check_loadable(saved: dict, layout: ShardLayout, shard_ks: Optional[list[int]]) -> None:
    """Raise a ValueError if the "mfac" entry ``saved`` cannot give this rank its columns."""
    record = saved.get("shard")
    if record is not None and (record["start"], record["stop"]) != (layout.start, layout.stop):
        raise ValueError(
            f"MFAC state dict holds columns {record['start']}:{record['stop']} (rank {record['rank']} of "
            f"{record['world_size']}) but this rank has {layout.start}:{layout.stop}; load a consolidated state "
            "dict (consolidate_state_dict or merge_shard_state_dicts) to change the number of ranks"
        )
    if shard_ks is not None:
        saved_ks = list(saved.get("shard_ks") or [saved["sparsity_k"]])
        if record is not None:
            saved_ks = saved_ks[record["rank"] : record["rank"] + 1]
            mine_ks = [shard_ks[layout.rank]]
        else:
            mine_ks = shard_ks
        if saved_ks != mine_ks:
            raise ValueError(
                f"MFAC top-k window was saved with per-rank k {saved_ks} but this run has {mine_ks}: top-k "
                "entries are selected per shard, so resume a sparse window with the same number of ranks"
            )


def local_columns(saved: dict, layout: ShardLayout, shard_ks: Optional[list[int]]) -> dict[str, torch.Tensor]:
    """This rank's window tensors (as GradientWindow.state() names them) from a loadable "mfac" entry."""
    if saved.get("shard") is not None:  # this rank's own shard
        return {key: saved[key] for key in _window_keys(saved)}
    start, stop = layout.start, layout.stop
    if shard_ks is None:
        return {"window": saved["window"][:, start:stop]}
    c0 = sum(shard_ks[: layout.rank])
    c1 = c0 + shard_ks[layout.rank]
    return {
        "values": saved["values"][:, c0:c1],
        "indices": saved["indices"][:, c0:c1] - start,
        "error": saved["error"][start:stop],
    }
