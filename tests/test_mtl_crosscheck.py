"""minbert's combiners against torchjd 0.18's reference implementations on the same per-task gradients:
PCGrad (Yu et al. 2020, Algorithm 1) against torchjd's PCGrad, under the same (sum) reduction and task order;
``sum`` and ``mean`` against torchjd's Sum and Mean; the aggregator plumbing (the Jacobian minbert builds) against
torchjd's UPGrad on the same Jacobian; uncertainty weighting (Kendall et al. 2018) against its closed form."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn
from torchjd.aggregation import PCGrad, Mean, Sum, UPGrad

from minbert.methods.combiners import StepContext, build_combiner, pcgrad

from .test_combiners import tiny_multitask_bert


def minbert_pcgrad_sum(grads: list[torch.Tensor]) -> torch.Tensor:
    """minbert's projection summed over tasks, asked for explicitly where the function takes a reduction."""
    params = inspect.signature(pcgrad).parameters
    kwargs = {"reduction": "sum"} if "reduction" in params else {}
    return pcgrad(grads, torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_matches_torchjd_pcgrad_in_the_same_task_order(order, seed, monkeypatch):
    """Both visit the other tasks in a random order (minbert: a permutation of the others from its generator;
    torchjd: torch.randperm over all tasks, skipping i). With the permutation fixed to ascending or descending
    order, both must project identically."""
    g = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(3, 40, generator=g, dtype=torch.float64)
    jacobian[1] = -0.7 * jacobian[0] + 0.3 * jacobian[1]  # make conflicts certain
    real = torch.randperm

    def fixed(n, *args, **kwargs):
        p = torch.arange(n)
        return p if order == "ascending" else p.flip(0)

    monkeypatch.setattr(torch, "randperm", fixed)
    ours = minbert_pcgrad_sum(list(jacobian))
    theirs = PCGrad()(jacobian)
    monkeypatch.setattr(torch, "randperm", real)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ours, jacobian.sum(0))  # the projection did something: a plain sum would fail


def tiny_bert():
    return tiny_multitask_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def step_gradients(name: str, options: str | None = None):
    """The .grad of every parameter when ``name`` calls optimizer_step (the step itself is not taken), and the
    tasks' Jacobian of the shared parameters computed directly with autograd."""
    model, batches = tiny_bert()
    model.eval()  # no dropout: every forward pass is the same function
    shared = [p for p in model.shared_parameters()]
    seen = {}

    def task_loss(task):
        return model.loss(task, model(task, batches[task]), batches[task])

    def optimizer_step():
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
        return True

    ctx = StepContext(["sst", "qqp", "sts"], task_loss, optimizer_step, shared, model)
    build_combiner(name, seed=0, options=options).step(ctx)
    rows = []
    for task in ctx.tasks:
        grads = torch.autograd.grad(task_loss(task), shared, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, shared)]))
    names = {id(p): n for n, p in model.named_parameters()}
    flat = torch.cat([seen.get(names[id(p)], torch.zeros_like(p)).reshape(-1) for p in shared])
    return flat, torch.stack(rows), seen


@pytest.mark.parametrize("name, reference", [("sum", Sum()), ("mean", Mean()), ("upgrad", UPGrad())])
def test_shared_gradient_matches_torchjd_on_the_same_jacobian(name, reference):
    flat, jacobian, _ = step_gradients(name)
    torch.testing.assert_close(flat, reference(jacobian), rtol=1e-4, atol=1e-7)


def test_heads_keep_their_own_task_gradient_under_an_aggregator():
    _, _, upgrad = step_gradients("upgrad")
    _, _, plain = step_gradients("sum")  # under sum each head's gradient is its own task's alone, too
    for key in ("heads.sst.classifier.weight", "heads.qqp.classifier.weight"):
        torch.testing.assert_close(upgrad[key], plain[key], rtol=1e-5, atol=1e-8)


class ConstantLosses(nn.Module):
    """L_i = c_i * (1 + w): the model never moves (its optimizer_step only clears grads), so the losses stay c_i."""

    def __init__(self, c):
        super().__init__()
        self.c = torch.tensor(c, dtype=torch.float32)
        self.w = nn.Parameter(torch.zeros(()))


def test_uncertainty_weighting_reaches_its_closed_form():
    """Kendall et al. 2018, Eq. 7 (as in torchjd): S = sum_i (exp(-s_i) L_i + s_i) / 2. Its minimum over s_i is
    at s_i = log L_i, and the model's gradient is sum_i exp(-s_i) / 2 * dL_i/dw = sum_i exp(-s_i) c_i / 2."""
    c = [0.5, 2.0, 4.0]
    model = ConstantLosses(c)
    tasks = ["sst", "qqp", "sts"]
    seen = []

    def optimizer_step():
        seen.append(model.w.grad.item())
        model.w.grad = None
        return True

    ctx = StepContext(tasks, lambda t: model.c[tasks.index(t)] * (1 + model.w), optimizer_step, [model.w], model)
    combiner = build_combiner("uw", seed=0, options={"weights_lr": 0.05})
    s = combiner.fn.log_var
    for step in range(1500):
        expected = float((torch.exp(-s.detach()) * model.c).sum() / 2)
        combiner.step(ctx)
        assert seen[-1] == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(s.detach(), torch.tensor([math.log(v) for v in c]), rtol=0, atol=2e-3)
