"""Sentence embeddings from token states: CLS, mean or max pooling (Reimers & Gurevych 2019, §3)."""
from __future__ import annotations

import torch

from minbert.model.encoder import BertOutput

POOLING_MODES = ("cls", "mean", "max")


def pool(out: BertOutput, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``cls``: the pooler output (tanh(dense(h[CLS])), as in the CS224N minBERT) or h[CLS] without a pooler;
    ``mean``/``max``: over real tokens only, padding excluded."""
    h = out.last_hidden_state
    if mode == "cls":
        return out.pooler_output if out.pooler_output is not None else h[:, 0]
    mask = attention_mask.unsqueeze(-1).to(h.dtype)
    if mode == "mean":
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if mode == "max":
        return h.masked_fill(mask == 0, torch.finfo(h.dtype).min).amax(1)
    raise ValueError(f"unknown pooling {mode!r} (choose from {', '.join(POOLING_MODES)})")
