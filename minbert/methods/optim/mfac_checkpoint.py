"""What a checkpoint holds of the M-FAC optimizer: the ``state_dict`` / ``load_state_dict`` half of
:class:`minbert.methods.optim.mfac.MFAC`, which mixes this class in before ``torch.optim.Optimizer``.

Besides torch's param groups and (empty) per-parameter state, a checkpoint has an ``"mfac"`` entry: the window,
the Gram matrix, the error accumulator, momentum, ring position and step. It lives outside ``self.state``
because torch's loader would cast the float64 Gram matrix and a bf16 window to the parameter dtype. Sharded
layouts, their consolidation and per-rank loading: mfac_shards.py.

The methods read the optimizer's buffers (``_gram``, ``_storage``, ``_shards``, ``_shard_ks``, ``_pos``,
``_step``, ``_momentum_buffer``, ``_consolidated``) that MFAC.__init__ allocates; loading copies into them in
place, so their device, dtype and views stay.
"""

from __future__ import annotations

from typing import Iterable

import torch

from minbert.methods.optim import mfac_shards


class MFACCheckpoint:
    """The checkpoint methods of :class:`~minbert.methods.optim.mfac.MFAC` (see the module's docstring)."""

    def _mfac_state(self) -> dict:
        state = {
            "num_grads": self.num_grads,
            "dim": self.dim,
            "sparsity_k": self.sparsity_k,
            "pos": self._pos,
            "step": self._step,
            "gram": self._gram,
            "momentum_buffer": self._momentum_buffer,
            **self._storage.state(),
        }
        if self.sparsity_k is not None:
            state["shard_ks"] = self._shard_ks
        if self.sharded:
            state["shard"] = self._shards.record(self._shards.rank)
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
                f"MFAC's window is sharded over {self._shards.world} ranks: call consolidate_state_dict(to=...) "
                "on every rank and then state_dict() on that rank, or save shard_state_dict() on every rank"
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
        if self.sharded:
            self._consolidated = mfac_shards.consolidate(self._mfac_state(), self._shards, to, self._shard_ks)

    @staticmethod
    def merge_shard_state_dicts(shards: Iterable[dict]) -> dict:
        """One full (world-size independent) state dict, on CPU, from the
        ``shard_state_dict()`` of every rank (any order). Top-k windows keep their
        per-shard layout (``shard_ks``) with global indices."""
        return mfac_shards.merge_shard_state_dicts(shards)

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
        mfac_shards.check_loadable(saved, self._shards, self._shard_ks)
        super().load_state_dict(state_dict)
        if any("dampening" not in g for g in self.param_groups):  # written before 2026-12: that run's own form
            self.decoupled_weight_decay = True
            for g in self.param_groups:
                g.setdefault("dampening", 0.0)
        # Copy in place: keeps the preallocated (device, dtype) buffers and their views.
        self._gram.copy_(saved["gram"])
        self._storage.load_state(mfac_shards.local_columns(saved, self._shards, self._shard_ks))
        if saved["momentum_buffer"] is not None:
            if self._momentum_buffer is None:
                self._new_momentum_buffer()
            self._momentum_buffer.copy_(saved["momentum_buffer"])
        else:
            self._momentum_buffer = None
        self._pos = int(saved["pos"])
        self._step = int(saved["step"])
        self._consolidated = None
