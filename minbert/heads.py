"""Task heads on pooled sentence embeddings (the CS224N report's baseline, §4.1 and §5.3).

Each head maps sentence embeddings to an output tensor, and knows its loss, how to turn outputs into
predictions, and its output kind ("logits" for a softmax over classes, "binary" for one logit, "score" for
a regression value); SMART uses the kind to pick its divergence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SSTHead(nn.Module):
    """Sentiment: dropout + linear to 5 classes, cross-entropy."""
    kind = "logits"

    def __init__(self, hidden: int, num_labels: int = 5, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(u))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


class ParaphraseHead(nn.Module):
    """Paraphrase: one logit from the two sentence embeddings [u; v], binary cross-entropy."""
    kind = "binary"

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden, 1)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.cat([u, v], dim=-1))).squeeze(-1)

    def loss(self, logit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logit, labels.float())

    def predict(self, logit: torch.Tensor) -> torch.Tensor:
        return (logit > 0).long()


class STSHead(nn.Module):
    """Similarity: linear on [u; v] -> score, MSE; predictions clipped to the 0-5 scale."""
    kind = "score"

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.regressor = nn.Linear(2 * hidden, 1)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.regressor(self.dropout(torch.cat([u, v], dim=-1))).squeeze(-1)

    def loss(self, score: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(score, labels.float())

    def predict(self, score: torch.Tensor) -> torch.Tensor:
        return score.clamp(0.0, 5.0)


STS_HEADS: dict[str, type[nn.Module]] = {"linear": STSHead}


def build_heads(hidden: int, tasks: list[str], sts_head: str = "linear", dropout: float = 0.1) -> nn.ModuleDict:
    heads = nn.ModuleDict()
    if "sst" in tasks:
        heads["sst"] = SSTHead(hidden, dropout=dropout)
    if "qqp" in tasks:
        heads["qqp"] = ParaphraseHead(hidden, dropout=dropout)
    if "sts" in tasks:
        if sts_head not in STS_HEADS:
            raise ValueError(f"unknown --sts_head {sts_head!r} (choose from {', '.join(STS_HEADS)})")
        heads["sts"] = STS_HEADS[sts_head](hidden, dropout=dropout)
    return heads
