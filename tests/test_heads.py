"""STS heads of the report's §5.3.3 (shapes, losses on hand-made inputs, 0..5 predictions) and pooling."""
import math

import pytest
import torch
from torch import nn

from minbert.model.encoder import BertOutput
from minbert.model.heads import (STS_HEADS, Cosine2d1Head, CosineEmbeddingHead, CosineHead, CosineRegressionHead,
                                 STSHead, build_heads)
from minbert.model.pooling import pool


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# Two pairs: orthogonal (cos 0) and identical (cos 1).
U = t([1.0, 0.0], [1.0, 1.0])
V = t([0.0, 1.0], [1.0, 1.0])


def test_registry_and_builder():
    assert set(STS_HEADS) == {"linear", "cosine_embedding", "cosine", "cosine_2d1", "cosine_regression"}
    for name, cls in STS_HEADS.items():
        heads = build_heads(8, ["sts"], sts_head=name)
        assert isinstance(heads["sts"], cls) and heads["sts"].kind == "score"
    with pytest.raises(ValueError, match="unknown --sts_head"):
        build_heads(8, ["sts"], sts_head="nope")


def test_cosine_embedding_head_is_torch_cosine_embedding_loss_with_2p5_threshold():
    head = CosineEmbeddingHead(2)
    assert list(head.parameters()) == []  # no layer
    out = head(U, V)
    assert out.shape == (2, 2, 2)
    # labels 4.0 (> 2.5: target +1, loss 1 - cos = 1) and 1.0 (target -1, loss max(0, cos) = 1)
    assert head.loss(out, t(4.0, 1.0)).item() == pytest.approx(1.0)
    # labels 1.0 (target -1, cos 0: loss 0) and 5.0 (target +1, cos 1: loss 0); 2.5 itself is "not similar"
    assert head.loss(out, t(1.0, 5.0)).item() == pytest.approx(0.0)
    assert head.loss(out, t(2.5, 2.5)).item() == pytest.approx(0.5)  # targets -1, -1: (0 + 1) / 2
    expected = nn.CosineEmbeddingLoss()(U, V, t(1.0, -1.0))
    assert head.loss(out, t(3.0, 0.0)).item() == pytest.approx(expected.item())
    # prediction: (cos + 1) * 2.5
    torch.testing.assert_close(head.predict(out), t(2.5, 5.0))
    torch.testing.assert_close(head.predict(head(t([1.0, 0.0]), t([-1.0, 0.0]))), t(0.0))


def test_cosine_head_d_features():
    head = CosineHead(2)
    assert head.proj.weight.shape == (2, 2)  # d -> d
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(2))
        head.proj.bias.zero_()
    score = head(U, V)
    assert score.shape == (2,)
    # 5 * sigmoid(20 * cos): cos 0 -> 2.5, cos 1 -> 5 * sigmoid(20)
    torch.testing.assert_close(score, t(2.5, 5 / (1 + math.exp(-20))))
    # MSE against labels 0 and 5: (2.5^2 + (5 sigmoid(20) - 5)^2) / 2
    assert head.loss(score, t(0.0, 5.0)).item() == pytest.approx(3.125, abs=1e-6)
    torch.testing.assert_close(head.predict(score), score)


def test_cosine_2d1_head():
    head = Cosine2d1Head(2, dropout=0.5).eval()  # eval: no dropout
    assert head.regressor.in_features == 5  # 2d + 1
    with torch.no_grad():
        head.regressor.weight.copy_(t([0.0, 0.0, 0.0, 0.0, 2.0]))  # only the cosine feature
        head.regressor.bias.fill_(1.0)
    score = head(U, V)
    torch.testing.assert_close(score, t(1.0, 3.0))  # 1 + 2 cos
    assert head.loss(score, t(1.0, 5.0)).item() == pytest.approx(2.0)  # (0 + 4) / 2
    torch.testing.assert_close(head.predict(t(-3.0, 2.0, 7.0)), t(0.0, 2.0, 5.0))
    # [u; v; cos] reaches the layer: a weight on u's first coordinate moves the score
    with torch.no_grad():
        head.regressor.weight[0, 0] = 1.0
    torch.testing.assert_close(head(U, V), t(2.0, 4.0))


def test_cosine_regression_head_is_five_times_cosine():
    head = CosineRegressionHead(2)
    assert not list(head.parameters())
    u, v = t([1.0, 0.0], [1.0, 1.0], [1.0, 0.0]), t([2.0, 0.0], [1.0, 0.0], [-1.0, 0.0])
    score = head(u, v)
    torch.testing.assert_close(score, t(5.0, 5.0 / math.sqrt(2.0), -5.0))
    assert head.loss(score[:1], t(4.0)).item() == pytest.approx(1.0)
    torch.testing.assert_close(head.predict(score), t(5.0, 5.0 / math.sqrt(2.0), 0.0))


def test_dropout_is_applied_in_training_mode_only():
    torch.manual_seed(0)
    head = Cosine2d1Head(64, dropout=0.5)
    u, v = torch.randn(8, 64), torch.randn(8, 64)
    assert not torch.equal(head.train()(u, v), head.train()(u, v))
    assert torch.equal(head.eval()(u, v), head.eval()(u, v))


@pytest.mark.parametrize("name", sorted(STS_HEADS))
def test_predictions_within_0_and_5(name):
    torch.manual_seed(0)
    head = STS_HEADS[name](16).eval()
    for scale in (0.01, 1.0, 100.0):
        u, v = scale * torch.randn(64, 16), scale * torch.randn(64, 16)
        v[:8] = u[:8]  # identical pairs: cos = 1 exactly or by rounding
        v[8:16] = -u[8:16]
        pred = head.predict(head(u, v))
        assert pred.shape == (64,)
        assert pred.min() >= 0.0 and pred.max() <= 5.0
    loss = head.loss(head(u, v), torch.rand(64) * 5)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_linear_head_unchanged():
    head = STSHead(4)
    assert head.regressor.in_features == 8


# --------------------------------------------------------------------------------------------------- pooling

def test_mean_and_max_pooling_ignore_padding():
    h = torch.tensor([
        [[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]],   # last token is padding
        [[2.0, 2.0], [-50.0, 100.0], [-60.0, 90.0]],  # two padding tokens
    ])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = BertOutput(last_hidden_state=h, pooler_output=torch.zeros(2, 2))
    torch.testing.assert_close(pool(out, mask, "mean"), torch.tensor([[2.0, 1.0], [2.0, 2.0]]))
    torch.testing.assert_close(pool(out, mask, "max"), torch.tensor([[3.0, 4.0], [2.0, 2.0]]))
    # changing what sits at padded positions changes nothing
    h2 = h.clone()
    h2[mask == 0] = torch.randn(3, 2) * 1e3
    out2 = BertOutput(last_hidden_state=h2, pooler_output=None)
    for mode in ("mean", "max"):
        torch.testing.assert_close(pool(out2, mask, mode), pool(out, mask, mode))
    # cls: the pooler output when there is one, else the first token's state
    torch.testing.assert_close(pool(out, mask, "cls"), torch.zeros(2, 2))
    torch.testing.assert_close(pool(out2, mask, "cls"), h[:, 0])


def test_pooling_padding_invariance_through_the_encoder():
    """Padding a sentence with extra [PAD] tokens leaves its mean/max embedding unchanged (keys are masked)."""
    from minbert.model.config import BertConfig
    from minbert.model.encoder import BertModel

    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11]])
    mask = (padded != 0).long()
    mask[1] = 1
    for mode in ("mean", "max"):
        alone = pool(enc(ids), torch.ones_like(ids), mode)
        batched = pool(enc(padded, attention_mask=mask), mask, mode)
        torch.testing.assert_close(batched[0:1], alone, atol=1e-5, rtol=1e-5)
