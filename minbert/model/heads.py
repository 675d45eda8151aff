"""Task heads on pooled sentence embeddings (the CS224N report's baseline, §4.1 and §5.3), and on the pooled joint
sequence of a cross-encoded pair (run_glue's BertForSequenceClassification).

Each head maps sentence embeddings to an output tensor, and knows its loss, how to turn outputs into
predictions, and its output kind ("logits" for a softmax over classes, "binary" for one logit, "score" for
a regression value); SMART uses the kind to pick its divergence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minbert.tasks.registry import TASKS, head_order


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


class BinaryLogitHead(nn.Module):
    """Shared by the paraphrase heads: one logit per pair, binary cross-entropy, prediction logit > 0."""
    kind = "binary"

    def loss(self, logit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logit, labels.float())

    def predict(self, logit: torch.Tensor) -> torch.Tensor:
        return (logit > 0).long()


class ParaphraseHead(BinaryLogitHead):
    """Paraphrase: one logit from the two sentence embeddings, binary cross-entropy.

    ``features="uv"`` is the report's baseline, a linear layer on [u; v]. ``features="sbert"`` uses
    [u; v; |u - v|; u * v] (Reimers & Gurevych 2019, §3 classification objective): a linear layer on [u; v]
    alone cannot compare the two sentences, the element-wise terms can."""

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


PAIR_FEATURES = {"uv": 2, "sbert": 4}  # name -> number of d-sized blocks
PARA_HEADS = tuple(PAIR_FEATURES)  # --para_head's choices


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


# --------------------------------------------------------------------------------------------------------------
# Cross-encoded pairs (--pair_encoding cross): the pair is one sequence [CLS] a [SEP] b [SEP] and attention compares
# the two sentences token by token inside the encoder, so the head reads one pooled vector of the joint sequence.


class CrossParaphraseHead(BinaryLogitHead):
    """Paraphrase of a cross-encoded pair: dropout + linear on the pooled joint sequence -> one logit, binary
    cross-entropy. This is run_glue's BertForSequenceClassification (dropout + linear on the pooled output) with
    one logit instead of a softmax over two classes: a two-class softmax only depends on the difference of its two
    logits, so one logit is the same model."""

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x)).squeeze(-1)


class CrossSTSHead(ScoreRegressionHead):
    """Similarity of a cross-encoded pair: dropout + linear on the pooled joint sequence -> the 0..5 score, MSE,
    predictions clipped to 0..5. This is run_glue's STS-B model, BertForSequenceClassification with num_labels=1
    (regression, MSE loss)."""

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.regressor = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.regressor(self.dropout(x)).squeeze(-1)


# The head of each head family (tasks.TaskSpec.head) for a pair read as one sequence.
CROSS_HEAD_OF_FAMILY: dict[str, type[nn.Module]] = {"paraphrase": CrossParaphraseHead, "similarity": CrossSTSHead}
# train_multitask.py's bi-encoder heads when --sts_head / --para_head are not given (measured: docs/results.md)
DEFAULT_STS_HEAD, DEFAULT_PARA_HEAD = "cosine_regression", "sbert"
# The head flag of each pair task, and its value that is a plain linear layer on what the encoder gives (the
# report's baselines): for a cross-encoded task that is the cross head. The other values compare two sentence
# embeddings (|u - v|, u * v, cosines), which a pair read as one sequence does not have.
# Built-in tasks only: a task of the user's own has no head flag (minbert.tasks.user_tasks).
PAIR_HEAD_FLAGS = {t: s.head_flag for t, s in TASKS.items() if s.head_flag}


# --------------------------------------------------------------------------------------------------------------
# Tasks of the user's own (minbert.tasks.user_tasks): one family for classes, one for a score. A single sentence or a
# cross-encoded pair gives one pooled vector; a bi-encoded pair gives [u; v; |u - v|; u * v] (SBERT's features).


def _user_features(pooled: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if len(pooled) == 1:
        return pooled[0]
    u, v = pooled
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


class UserClassHead(SSTHead):
    """Classes of a user's task: dropout + linear on the features to ``num_labels`` logits, cross-entropy."""

    def __init__(self, hidden: int, num_labels: int, blocks: int = 1, dropout: float = 0.1):
        super().__init__(blocks * hidden, num_labels=num_labels, dropout=dropout)

    def forward(self, *pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(_user_features(pooled)))


class UserScoreHead(ScoreRegressionHead):
    """A user's regression task: dropout + linear on the features to one score, MSE; predictions clipped to the
    task's score range."""

    def __init__(self, hidden: int, score_range: tuple[float, float], blocks: int = 1, dropout: float = 0.1):
        super().__init__()
        self.low, self.high = score_range
        self.dropout = nn.Dropout(dropout)
        self.regressor = nn.Linear(blocks * hidden, 1)

    def forward(self, *pooled: torch.Tensor) -> torch.Tensor:
        return self.regressor(self.dropout(_user_features(pooled))).squeeze(-1)

    def predict(self, score: torch.Tensor) -> torch.Tensor:
        return score.clamp(self.low, self.high)


def pair_head_conflict(pair_encoding: dict[str, str], tasks, given: dict[str, tuple[str, str]]) -> str | None:
    """The one-line error for a comparison head asked for a cross-encoded task, else None. ``given`` maps a head
    flag (``sts_head``, ``para_head``) to (its value, its default): a default value is the bi-encoder's and just
    does not apply to a cross task; an explicitly chosen comparison head contradicts it."""
    for task, (flag, linear) in PAIR_HEAD_FLAGS.items():
        value, default = given[flag]
        if task in tasks and pair_encoding.get(task) == "cross" and value not in (default, linear):
            return (f"--{flag} {value} compares two sentence embeddings, but --pair_encoding reads {task} as one "
                    f"sequence (cross), whose head is a linear layer on the pooled pair; drop --{flag} "
                    f"(or pass --{flag} {linear}), or encode {task} with bi")
    return None


def build_heads(hidden: int, tasks: list[str], sts_head: str = "linear", dropout: float = 0.1,
                para_head: str = "uv", pair_encoding: dict[str, str] | None = None) -> nn.ModuleDict:
    """One head per task. A pair task in ``pair_encoding`` as ``cross`` gets its cross head (``sts_head`` and
    ``para_head`` choose the bi-encoder's heads and do not apply to it)."""
    cross = {t for t, e in (pair_encoding or {}).items() if e == "cross"}
    if sts_head not in STS_HEADS:
        raise ValueError(f"unknown --sts_head {sts_head!r} (choose from {', '.join(STS_HEADS)})")
    heads = nn.ModuleDict()
    for task in head_order(tasks):  # a fixed order: each head draws its initial weights from the seeded generator
        spec = TASKS[task]
        blocks = 4 if spec.is_pair and task not in cross else 1  # user heads: [u; v; |u - v|; u * v] or one vector
        if spec.head == "classify":
            heads[task] = UserClassHead(hidden, spec.num_labels, blocks, dropout=dropout)
        elif spec.head == "regress":
            heads[task] = UserScoreHead(hidden, spec.score_range, blocks, dropout=dropout)
        elif task in cross:
            heads[task] = CROSS_HEAD_OF_FAMILY[spec.head](hidden, dropout=dropout)
        elif spec.head == "sentiment":
            heads[task] = SSTHead(hidden, num_labels=spec.num_labels, dropout=dropout)
        elif spec.head == "paraphrase":
            heads[task] = ParaphraseHead(hidden, dropout=dropout, features=para_head)
        else:
            heads[task] = STS_HEADS[sts_head](hidden, dropout=dropout)
    return heads
