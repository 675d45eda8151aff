"""Multitask combiners: PCGrad's projection (Yu et al. 2020, Algorithm 1) on hand-computed gradients, and each
combiner's parameter updates on toy models whose gradients are known in closed form."""
import pytest
import torch
from torch import nn

from minbert.methods.combiners import COMBINERS, StepContext, build_combiner, pcgrad


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ pcgrad()

def test_two_conflicting_gradients_are_projected_onto_each_others_normal_plane():
    g1, g2 = t(1, 0), t(-1, 1)  # g1 . g2 = -1 < 0
    # g1 - (g1.g2 / |g2|^2) g2 = (1, 0) + 1/2 (-1, 1) = (0.5, 0.5); g2 - (g2.g1 / |g1|^2) g1 = (-1, 1) + (1, 0) = (0, 1)
    out = pcgrad([g1, g2], torch.Generator().manual_seed(0), "sum")  # Algorithm 1's sum
    torch.testing.assert_close(out, t(0.5, 1.5))
    out = pcgrad([g1, g2], torch.Generator().manual_seed(0))  # the default: Pytorch-PCGrad's mean
    torch.testing.assert_close(out, t(0.25, 0.75))
    # each projected gradient is orthogonal to the other task's original gradient
    assert torch.dot(t(0.5, 0.5), g2) == 0 and torch.dot(t(0, 1), g1) == 0


def test_non_conflicting_gradients_are_summed_unchanged():
    out = pcgrad([t(1, 2), t(3, 1)], reduction="sum")  # dot 5 > 0
    torch.testing.assert_close(out, t(4, 3))
    out = pcgrad([t(1, 0), t(0, 1)], reduction="sum")  # orthogonal: dot 0, not a conflict
    torch.testing.assert_close(out, t(1, 1))
    with pytest.raises(ValueError, match="unknown reduction"):
        pcgrad([t(1, 0)], reduction="max")


# Three tasks: g1 = (1, 0), g2 = (-1, 1), g3 = (-1, -2); every pair conflicts (dots -1, -1, -1), and the result of
# each task depends on the order in which the other two are visited. Hand-computed, always projecting against
# the ORIGINAL g_j:
#   g1 via (g2, g3): (1,0) + 1/2 (-1,1) = (.5,.5); (.5,.5).g3 = -1.5 -> + 1.5/5 (-1,-2) = (.2, -.1)
#   g1 via (g3, g2): (1,0) + 1/5 (-1,-2) = (.8,-.4); (.8,-.4).g2 = -1.2 -> + 1.2/2 (-1,1) = (.2, .2)
#   g2 via (g1, g3): (-1,1) + (1,0) = (0,1); (0,1).g3 = -2 -> + 2/5 (-1,-2) = (-.4, .2)
#   g2 via (g3, g1): (-1,1) + 1/5 (-1,-2) = (-1.2,.6); (-1.2,.6).g1 = -1.2 -> + 1.2 (1,0) = (0, .6)
#   g3 via (g1, g2): (-1,-2) + (1,0) = (0,-2); (0,-2).g2 = -2 -> + 2/2 (-1,1) = (-1, -1)
#   g3 via (g2, g1): (-1,-2) + 1/2 (-1,1) = (-1.5,-1.5); (-1.5,-1.5).g1 = -1.5 -> + 1.5 (1,0) = (0, -1.5)
THREE = [t(1, 0), t(-1, 1), t(-1, -2)]
HAND = {
    (0, (1, 2)): t(0.2, -0.1), (0, (2, 1)): t(0.2, 0.2),
    (1, (0, 2)): t(-0.4, 0.2), (1, (2, 0)): t(0.0, 0.6),
    (2, (0, 1)): t(-1.0, -1.0), (2, (1, 0)): t(0.0, -1.5),
}


def _orders(seed: int) -> list[tuple[int, ...]]:
    """The visiting orders pcgrad draws: for task i, the other tasks permuted by torch.randperm (documented)."""
    g = torch.Generator().manual_seed(seed)
    orders = []
    for i in range(3):
        others = [j for j in range(3) if j != i]
        orders.append(tuple(others[k] for k in torch.randperm(2, generator=g).tolist()))
    return orders


@pytest.mark.parametrize("seed", range(6))
def test_three_tasks_match_hand_computed_projections(seed):
    expected = sum(HAND[(i, order)] for i, order in enumerate(_orders(seed)))
    out = pcgrad(THREE, torch.Generator().manual_seed(seed), "sum")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(pcgrad(THREE, torch.Generator().manual_seed(seed)), expected / 3)


def test_random_order_is_reproducible_from_the_seed_and_does_vary():
    a = pcgrad(THREE, torch.Generator().manual_seed(3))
    b = pcgrad(THREE, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    results = {tuple(pcgrad(THREE, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(results) > 1  # the order is random, and here it matters
    assert all(torch.equal(g, h) for g, h in zip(THREE, [t(1, 0), t(-1, 1), t(-1, -2)]))  # inputs untouched


# ------------------------------------------------------------------------------------------------ combiners

class LinearTasks(nn.Module):
    """Toy multitask model with known gradients: L_t = a_t . w + c_t * h_t, so dL_t/dw = a_t (shared) and
    dL_t/dh_t = c_t (task head). Losses are linear, so gradients do not change when parameters move."""

    def __init__(self, a: dict[str, torch.Tensor], c: dict[str, float]):
        super().__init__()
        self.a, self.c = a, c
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.heads = nn.ParameterDict({k: nn.Parameter(torch.zeros((), dtype=torch.float64)) for k in a})

    def loss(self, task: str) -> torch.Tensor:
        return torch.dot(self.a[task], self.w) + self.c[task] * self.heads[task]


def _context(model: LinearTasks, lr: float = 0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    calls = {"steps": 0, "losses": 0}

    def task_loss(task):
        calls["losses"] += 1
        return model.loss(task)

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=True)
        calls["steps"] += 1
        return True

    ctx = StepContext(list(model.a), task_loss, optimizer_step, [model.w], model)
    return ctx, calls


def _two_conflicting_tasks():
    return LinearTasks({"sst": t(1, 0), "qqp": t(-1, 1)}, {"sst": 2.0, "qqp": -3.0})


def test_individual_steps_once_per_task():
    model = _two_conflicting_tasks()
    ctx, calls = _context(model)
    build_combiner("individual").step(ctx)
    torch.testing.assert_close(model.w.detach(), -0.1 * (t(1, 0) + t(-1, 1)))
    assert calls["steps"] == 2
    torch.testing.assert_close(model.heads["sst"].detach(), torch.tensor(-0.2, dtype=torch.float64))
    torch.testing.assert_close(model.heads["qqp"].detach(), torch.tensor(0.3, dtype=torch.float64))


def test_sum_steps_once_on_the_summed_gradient():
    model = _two_conflicting_tasks()
    ctx, calls = _context(model)
    losses = build_combiner("sum").step(ctx)
    torch.testing.assert_close(model.w.detach(), -0.1 * t(0, 1))
    assert calls["steps"] == 1 and set(losses) == {"sst", "qqp"}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pcgrad_steps_on_projected_mean_or_sum_and_heads_keep_their_own_gradients(reduction):
    model = _two_conflicting_tasks()
    ctx, calls = _context(model)
    combiner = build_combiner("pcgrad", seed=0)
    assert combiner.reduction == "mean"  # the default (Pytorch-PCGrad e987ac6)
    combiner.reduction = reduction
    losses = combiner.step(ctx)
    scale = 0.5 if reduction == "mean" else 1.0
    torch.testing.assert_close(model.w.detach(), -0.1 * scale * t(0.5, 1.5))  # the hand-computed projection above
    torch.testing.assert_close(model.heads["sst"].detach(), torch.tensor(-0.2, dtype=torch.float64))
    torch.testing.assert_close(model.heads["qqp"].detach(), torch.tensor(0.3, dtype=torch.float64))
    assert calls["steps"] == 1 and losses == {"sst": 0.0, "qqp": 0.0}  # losses before the update


def test_gse_steps_twice_projected_mean_then_plain_sum():
    model = _two_conflicting_tasks()
    ctx, calls = _context(model)
    losses = build_combiner("gse", seed=0).step(ctx)
    # step 1: w -= 0.1 * mean of projected gradients = 0.1 * (0.5, 1.5) / 2; step 2: w -= 0.1 * (a_sst + a_qqp)
    torch.testing.assert_close(model.w.detach(), -0.1 * t(0.25, 0.75) - 0.1 * t(0, 1))
    # each head: its own gradient in both steps
    torch.testing.assert_close(model.heads["sst"].detach(), torch.tensor(-0.4, dtype=torch.float64))
    torch.testing.assert_close(model.heads["qqp"].detach(), torch.tensor(0.6, dtype=torch.float64))
    assert calls["steps"] == 2 and calls["losses"] == 4  # every task's loss is recomputed for the second step
    assert losses == {"sst": 0.0, "qqp": 0.0}


def test_gse_second_step_uses_the_updated_parameters():
    """With a quadratic loss the second gradient depends on where the first step landed."""
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.25)
    seen = []

    def task_loss(task):
        seen.append(w.item())
        return (w ** 2).sum()  # gradient 2w, the same for both tasks (no conflict)

    def optimizer_step():
        opt.step()
        opt.zero_grad()
        return True

    ctx = StepContext(["sst", "qqp"], task_loss, optimizer_step, [w], None)
    build_combiner("gse").step(ctx)
    # step 1: mean of (2, 2) = 2 -> w = 1 - 0.25 * 2 = 0.5; step 2 at w = 0.5: sum = 2 + 2 -> w = 0.5 - 0.25 * 2 = 0
    assert seen == [1.0, 1.0, 0.5, 0.5]
    assert w.item() == 0.0



def tiny_multitask_bert(**config):
    """A 1-layer MultitaskBert on the three tasks and one small batch per task (``config``: BertConfig overrides)."""
    from minbert.model.config import BertConfig
    from minbert.model.encoder import BertModel
    from minbert.model.multitask import MultitaskBert, MultitaskConfig

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     **config)
    model = MultitaskBert(BertModel(cfg), MultitaskConfig(tasks=["sst", "qqp", "sts"], pooling="mean"))
    g = torch.Generator().manual_seed(1)
    ids = lambda: torch.randint(1, 50, (4, 6), generator=g)  # noqa: E731
    ones = torch.ones(4, 6, dtype=torch.long)
    batches = {
        "sst": {"input_ids": ids(), "attention_mask": ones, "labels": torch.tensor([0, 1, 2, 4])},
        "qqp": {"input_ids": ids(), "attention_mask": ones, "input_ids_b": ids(), "attention_mask_b": ones,
                "labels": torch.tensor([0, 1, 1, 0])},
        "sts": {"input_ids": ids(), "attention_mask": ones, "input_ids_b": ids(), "attention_mask_b": ones,
                "labels": torch.tensor([0.5, 2.0, 3.5, 5.0])},
    }
    return model, batches


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_every_combiner_updates_a_multitask_bert(name):
    model, batches = tiny_multitask_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps, pooler_grads = [], []

    def optimizer_step():
        pooler_grads.append(model.encoder.pooler.weight.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(1)
        return True

    def task_loss(task):
        return model.loss(task, model(task, batches[task]), batches[task])

    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = StepContext(["sst", "qqp", "sts"], task_loss, optimizer_step, model.shared_parameters(), model)
    losses = build_combiner(name, seed=0).step(ctx)
    assert set(losses) == {"sst", "qqp", "sts"} and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert len(steps) == {"individual": 3, "sum": 1, "pcgrad": 1, "gse": 2}[name]
    after = model.state_dict()
    for key in ("encoder.layers.0.qkv.weight", "heads.sst.classifier.weight", "heads.qqp.classifier.weight",
                "heads.sts.regressor.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in model.parameters())  # nothing left over for the next step
    # mean pooling leaves the pooler unused: no gradient (not a zero one), so the optimizer skips it
    assert pooler_grads and all(g is None for g in pooler_grads)


# ------------------------------------------------------------------------------------------------ the reference

def _reference_project_conflicting(grads, has_grads, orders):
    """WeiChengTseng/Pytorch-PCGrad pcgrad.py at e987ac6, PCGrad._project_conflicting with its default
    reduction='mean', transcribed line by line; ``orders[i]`` replaces its random.shuffle(grads) for task i (the
    shuffle visits every task, itself included: its own original never conflicts here)."""
    shared = torch.stack(has_grads).prod(0).bool()
    pc_grad = [g.clone() for g in grads]
    for i, g_i in enumerate(pc_grad):
        for j in orders[i]:
            g_j = grads[j]
            g_i_g_j = torch.dot(g_i, g_j)
            if g_i_g_j < 0:
                g_i -= (g_i_g_j) * g_j / (g_j.norm() ** 2)
    merged_grad = torch.zeros_like(grads[0])
    merged_grad[shared] = torch.stack([g[shared] for g in pc_grad]).mean(dim=0)
    merged_grad[~shared] = torch.stack([g[~shared] for g in pc_grad]).sum(dim=0)
    return merged_grad


@pytest.mark.parametrize("seed", range(4))
def test_default_matches_the_reference_transcription(seed):
    torch.manual_seed(seed)
    grads = [torch.randn(7, dtype=torch.float64) for _ in range(3)]
    orders = [order + (i,) for i, order in enumerate(_orders(seed))]  # minbert's draw, then the task itself
    expected = _reference_project_conflicting(grads, [torch.ones(7)] * 3, orders)
    torch.testing.assert_close(pcgrad(grads, torch.Generator().manual_seed(seed)), expected, rtol=1e-12, atol=1e-12)


def test_combiner_means_where_every_task_reaches_and_sums_elsewhere_as_the_reference():
    """A shared parameter that only one task reaches (``v``: sst only) gets that task's gradient summed, the
    others the mean (Pytorch-PCGrad's has_grad mask, at parameter granularity)."""
    model = _two_conflicting_tasks()
    model.v = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    a_v = {"sst": 4.0}
    ctx, _ = _context(model, lr=1.0)
    ctx.task_loss = lambda task: model.loss(task) + (a_v[task] * model.v).sum() if task in a_v else model.loss(task)
    ctx.shared_params = [model.w, model.v]
    grads = [torch.cat([model.a["sst"], torch.tensor([4.0], dtype=torch.float64)]),
             torch.cat([model.a["qqp"], torch.zeros(1, dtype=torch.float64)])]
    has = [torch.ones(3), torch.tensor([1.0, 1.0, 0.0])]
    expected = _reference_project_conflicting(grads, has, [(1, 0), (0, 1)])
    build_combiner("pcgrad", seed=0).step(ctx)
    torch.testing.assert_close(torch.cat([model.w.detach(), model.v.detach()]), -expected)


def test_gse_is_unchanged_by_the_default():
    """GSE's PCGrad half was the mean before --pcgrad_reduction existed; the default keeps it bit for bit:
    the mean is the same multiplication by 1/n of the same sum."""
    grads = [torch.randn(50, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    old = pcgrad(grads, torch.Generator().manual_seed(1), "sum").mul_(1.0 / 3)
    assert torch.equal(pcgrad(grads, torch.Generator().manual_seed(1)), old)
