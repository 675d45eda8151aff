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
    """Paraphrase: one logit from the two sentence embeddings, binary cross-entropy.

    ``features="uv"`` is the report's baseline, a linear layer on [u; v]. ``features="sbert"`` uses
    [u; v; |u - v|; u * v] (Reimers & Gurevych 2019, §3 classification objective): a linear layer on [u; v]
    alone cannot compare the two sentences, the element-wise terms can."""
    kind = "binary"

    def __init__(self, hidden: int, dropout: float = 0.1, features: str = "uv"):
        super().__init__()
        if features not in PAIR_FEATURES:
            raise ValueError(f"unknown paraphrase features {features!r} (choose from {', '.join(PAIR_FEATURES)})")
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(PAIR_FEATURES[features] * hidden, 1)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = [u, v] if self.features == "uv" else [u, v, (u - v).abs(), u * v]
        return self.classifier(self.dropout(torch.cat(x, dim=-1))).squeeze(-1)

    def loss(self, logit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logit, labels.float())

    def predict(self, logit: torch.Tensor) -> torch.Tensor:
        return (logit > 0).long()


PAIR_FEATURES = {"uv": 2, "sbert": 4}  # name -> number of d-sized blocks


class ScoreRegressionHead(nn.Module):
    """Shared by the STS heads that regress the 0..5 score directly: MSE loss, predictions clipped to 0..5."""
    kind = "score"

    def loss(self, score: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(score, labels.to(score.dtype))

    def predict(self, score: torch.Tensor) -> torch.Tensor:
        return score.clamp(0.0, 5.0)


class STSHead(ScoreRegressionHead):
    """Similarity: linear on [u; v] -> score, MSE; predictions clipped to the 0-5 scale."""

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.regressor = nn.Linear(2 * hidden, 1)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.regressor(self.dropout(torch.cat([u, v], dim=-1))).squeeze(-1)


class CosineEmbeddingHead(nn.Module):
    """The report's §5.3.3 2a: no layer at all; torch's CosineEmbeddingLoss on the two pooled embeddings, with
    target +1 when the gold similarity is above 2.5 and -1 otherwise. The output is the pair (u, v) stacked,
    shape (batch, 2, d); the prediction is the cosine mapped onto 0..5, (cos + 1) * 2.5. (The constructor takes
    ``dropout`` for a uniform signature; the report's head has none.)"""
    kind = "score"  # SMART's divergence: mean squared change of the stacked embeddings

    def __init__(self, hidden: int, dropout: float = 0.1, threshold: float = 2.5):
        super().__init__()
        self.threshold = threshold

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.stack([u, v], dim=1)

    def loss(self, uv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = torch.where(labels > self.threshold, 1.0, -1.0).to(uv.dtype)
        return F.cosine_embedding_loss(uv[:, 0], uv[:, 1], target)

    def predict(self, uv: torch.Tensor) -> torch.Tensor:
        return ((F.cosine_similarity(uv[:, 0], uv[:, 1], dim=-1) + 1) * 2.5).clamp(0.0, 5.0)  # rounding


class CosineHead(ScoreRegressionHead):
    """The report's §5.3.3 2bi ("d features"): one d -> d linear layer applied to each embedding, then
    5 * sigmoid(20 * cos(u', v')) as the 0..5 score, MSE. (No dropout in the report's head; the constructor
    takes ``dropout`` for a uniform signature.)"""

    def __init__(self, hidden: int, dropout: float = 0.1, scale: float = 20.0):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.scale = scale

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(self.proj(u), self.proj(v), dim=-1)
        return 5.0 * torch.sigmoid(self.scale * cos)


class Cosine2d1Head(ScoreRegressionHead):
    """The report's §5.3.3 2bii ("2d + 1 features"): [u; v; cos(u, v)], dropout, linear (2d + 1 -> 1), MSE;
    predictions clipped to 0..5."""

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.regressor = nn.Linear(2 * hidden + 1, 1)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(u, v, dim=-1).unsqueeze(-1)
        return self.regressor(self.dropout(torch.cat([u, v, cos], dim=-1))).squeeze(-1)


class CosineRegressionHead(ScoreRegressionHead):
    """SBERT's regression objective (Reimers & Gurevych 2019, §3): the score is 5 * cos(u, v), trained with MSE
    against the 0..5 similarity; no extra layer, so the pretrained geometry of a sentence encoder is used from the
    first step (a linear layer on [u; v; cos] must first learn to scale the one cos feature). Predictions clipped
    to 0..5."""

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return 5.0 * F.cosine_similarity(u, v, dim=-1)


STS_HEADS: dict[str, type[nn.Module]] = {
    "linear": STSHead,
    "cosine_embedding": CosineEmbeddingHead,
    "cosine": CosineHead,
    "cosine_2d1": Cosine2d1Head,
    "cosine_regression": CosineRegressionHead,
}


def build_heads(hidden: int, tasks: list[str], sts_head: str = "linear", dropout: float = 0.1,
                para_head: str = "uv") -> nn.ModuleDict:
    heads = nn.ModuleDict()
    if "sst" in tasks:
        heads["sst"] = SSTHead(hidden, dropout=dropout)
    if "sst2" in tasks:
        heads["sst2"] = SSTHead(hidden, num_labels=2, dropout=dropout)
    if "qqp" in tasks:
        heads["qqp"] = ParaphraseHead(hidden, dropout=dropout, features=para_head)
    if "sts" in tasks:
        if sts_head not in STS_HEADS:
            raise ValueError(f"unknown --sts_head {sts_head!r} (choose from {', '.join(STS_HEADS)})")
        heads["sts"] = STS_HEADS[sts_head](hidden, dropout=dropout)
    return heads
